"""Hyperparameter search: an Optuna study whose trials are ordinary `engine.run.run` calls.

    python main.py --run_config configs/run_template.yaml \\
                   --optimize_config configs/optimize_template.yaml

Each trial copies the base RunConfig with the sampled keys overridden (the base
is never mutated), trains it into runs/<project>/<study>_t<NNNN>/, and reports
the first seed's monitored metric every epoch, so that the pruner and Optuna's
own plots see the same metric the study optimises. Rerunning the same command
continues the study until it holds `trials` finished (complete or pruned) trials.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from engine import distributed
from engine.checkpoint import disk_full
from engine.errors import ConfigError
from engine.folders import RUNS_DIR, TEMPLATE_DIR
from engine.locks import LockUnavailable
from engine.run import run
from engine.search_space import suggest
from engine.studies import storage_at

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import OptimizeConfig, RunConfig

# Trials that count towards `trials`; failed ones do not, so a rerun tops them up.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_KILLED = 3  # tries of one configuration whose process was killed outright each time


def open_storage(run_config: RunConfig, opt_config: OptimizeConfig) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats on every kind (SQLite, a server, a journal file): a
    trial whose process was killed outright (out of memory, a failed node) stops beating, and
    after the grace period it is failed and its parameters are queued again (retry_killed)."""
    url = opt_config.storage
    if url is None:
        path = RUNS_DIR / run_config.project / "optuna.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.endswith(".journal"):  # Optuna's journal file: no server, and safe on a shared filesystem (NFS)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
    return storage_at(url, heartbeat_interval=opt_config.heartbeat_interval,
                      grace_period=opt_config.grace_period, stale_trial_callback=retry_killed)


def retry_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's heartbeat found `trial` dead and has failed it: queue its parameters again, so
    that the retry continues its folder from the checkpoint, as after a signal. A configuration
    whose process dies every time (out of memory) is given up after MAX_KILLED tries."""
    first = trial.user_attrs.get("retry_of", trial.number)
    killed = trial.user_attrs.get("killed", 0) + 1
    if killed >= MAX_KILLED:
        print(f"trial {trial.number} stopped beating: its process died {killed} times with these "
              "parameters, which are not tried again", file=sys.stderr)
        return
    print(f"trial {trial.number} stopped beating (its process died); its parameters run again",
          file=sys.stderr)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": first, "killed": killed})


def wait_for_silent_trials(study: optuna.Study, opt_config: OptimizeConfig) -> int:
    """While trials running elsewhere hold all of the study's remaining places, wait until they
    end or their silence shows them dead (then Optuna fails them and retry_killed queues them),
    at most one grace period: a trial still beating after that has a live worker, and is left
    to it. Returns the number of trials finished or running anywhere."""
    deadline = time.monotonic() + (opt_config.grace_period or 2 * opt_config.heartbeat_interval) + 1
    while True:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and stable for years
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if not finished < opt_config.trials <= finished + running or time.monotonic() > deadline:
            return finished + running
        time.sleep(0.5)


def make_objective(run_config: RunConfig, opt_config: OptimizeConfig, study_name: str):
    def objective(trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, spec) for key, spec in opt_config.search_space.items()}
        config = run_config.with_overrides(params, source=f"{opt_config.source} (trial {trial.number})")
        # A retry of a trial that a signal stopped continues that trial's folder from its checkpoint.
        first = trial.user_attrs.get("retry_of", trial.number)
        group = f"{study_name}_t{first:04d}"
        resume = first != trial.number and (RUNS_DIR / config.project / group / "config.yaml").exists()
        if resume:  # the curve so far, for the pruner
            for step, value in earlier_curve(trial, first).items():
                trial.report(value, step)
        trial.set_user_attr("epochs", config.epochs)  # read by the pruner: where the curve ends
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # whose death it was
        trial.set_user_attr("run_dir", str(RUNS_DIR / config.project / group))

        def report(epoch: int, metrics: dict) -> None:
            trial.report(metrics[config.monitor], epoch)
            prune = trial.should_prune()
            if distributed.initialized():  # under torchrun the other ranks stop with rank 0
                distributed.broadcast_from_rank0([prune])
            if prune:
                trial.set_user_attr("reason", f"pruned at epoch {epoch}")
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        if distributed.initialized():  # the other ranks train this same trial (follow_rank0)
            distributed.broadcast_from_rank0([(params, group)])
        result = run(config, group=group, tags=("search", study_name),
                     labels={"study": study_name, "trial": trial.number}, first_seed_callbacks=[report],
                     resume=resume)
        trial.set_user_attr("seed_values", {str(s.seed): s.best_value for s in result.seeds})
        diverged = [s.seed for s in result.seeds if s.status == "diverged"]
        if diverged:  # a diverging configuration is an answer, not a crash: prune it
            trial.set_user_attr("reason", f"diverged (NaN/inf) on seed(s) {diverged}")
            raise optuna.TrialPruned(f"diverged on seed(s) {diverged}")
        return result.mean

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # a signal (Ctrl-C, a cluster's preemption): not counted, tried again
            first = trial.user_attrs.get("retry_of", trial.number)
            trial.set_user_attr("reason", "stopped by a signal; its parameters are tried again")
            trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": first})
            raise
        except Exception as e:  # recorded as FAIL with the reason; the study goes on
            trial.set_user_attr("reason", f"{type(e).__name__}: {e}")
            raise

    return guarded


def earlier_curve(trial: optuna.Trial, first: int) -> dict[int, float]:
    """The values reported by the longest earlier try of trial `first` (itself or a retry)."""
    tries = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
             if t.user_attrs.get("retry_of", t.number) == first]
    return max(tries, key=lambda t: len(t.intermediate_values)).intermediate_values if tries else {}


def open_study(run_config: RunConfig, opt_config: OptimizeConfig) -> optuna.Study:
    """Create the study, or load it when it exists (a rerun, or another worker)."""
    pruner = opt_config.create_pruner()
    return optuna.create_study(
        storage=open_storage(run_config, opt_config), study_name=opt_config.name_for(run_config),
        sampler=opt_config.create_sampler(), pruner=pruner or optuna.pruners.NopPruner(),
        direction=run_config.direction, load_if_exists=True)


def run_study(run_config: RunConfig, opt_config: OptimizeConfig, worker: bool = False) -> optuna.Study:
    """Create or continue the study and run it until it has `trials` finished trials.
    Several processes may run this on one study at once (see run_workers); a `worker`, like
    a Slurm job, draws no bar over the trials: its output goes to a log."""
    study = open_study(run_config, opt_config)
    wait_for_silent_trials(study, opt_config)  # a killed worker's trial, failed and queued again
    finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    remaining = opt_config.trials - finished
    if remaining > 0:
        objective = make_objective(run_config, opt_config, study.study_name)
        # Errors that every later trial would meet too: a full disk, a file system without locks.
        # The study stops at the first, and it is reported once, as main.py reports it (exit 1, 2).
        fatal: list[Exception] = []

        def claimed(trial: optuna.Trial) -> float:
            # Workers check before asking for a trial (below), but two can ask at once:
            # the trials beyond the first `trials` live ones step back, so none is extra.
            live = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
            if sum(t.number < trial.number for t in live) >= opt_config.trials:
                trial.set_user_attr("reason", "surplus: other workers already hold the study's trials")
                study.stop()
                raise RuntimeError("surplus trial")  # recorded as failed; it does not count
            try:
                return objective(trial)
            except Exception as e:
                error = e if isinstance(e, LockUnavailable) else disk_full(e)
                if error is None:
                    raise
                fatal.append(error)
                study.stop()
                return math.nan  # a failed trial, without Optuna's traceback of it

        def stop_when_full(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # Finished or running anywhere: what every worker sees, so they stop together; but
            # not while a dead worker's trial holds a place that a retry should take.
            if wait_for_silent_trials(study, opt_config) >= opt_config.trials:
                study.stop()

        # The bar over trials opens first, so tqdm draws each seed's epoch bar below it.
        # `disable` is passed only to hide it, so that TQDM_DISABLE=1 still hides it too.
        hidden = {"disable": True} if worker or "SLURM_JOB_ID" in os.environ else {}
        bar = tqdm(total=opt_config.trials, initial=finished, desc=f"study {study.study_name}",
                   unit="trial", dynamic_ncols=True, **hidden)

        def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
            done = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))  # other workers' too
            bar.update(min(done, opt_config.trials) - bar.n)
            if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                bar.set_postfix(best=f"{study.best_value:.4g}")

        advance(study)
        # Optuna's log lines go above the bars instead of through them.
        with bar, logging_redirect_tqdm([optuna.logging.get_logger("optuna")]):
            study.optimize(claimed, n_trials=remaining, catch=(Exception,),
                           callbacks=[stop_when_full, advance])
        if fatal:
            raise fatal[0]
    return study


def follow_rank0(run_config: RunConfig, opt_config: OptimizeConfig) -> None:
    """Under torchrun, ranks other than 0 train each trial that rank 0's study sends them,
    and stop a trial when rank 0's pruner does. Only rank 0 talks to Optuna."""
    while True:
        (message,) = distributed.broadcast_from_rank0([None])
        if message is None:  # the study is done
            return
        params, group = message

        def follow(epoch: int, metrics: dict) -> None:
            (prune,) = distributed.broadcast_from_rank0([None])
            if prune:
                raise optuna.TrialPruned()

        try:
            run(run_config.with_overrides(params), group=group, first_seed_callbacks=[follow])
        except Exception:  # rank 0 met the same end (same config, same data) and records it
            continue


def run_study_distributed(run_config: RunConfig, opt_config: OptimizeConfig) -> optuna.Study | None:
    """A search under torchrun: every trial trains with all ranks; rank 0 runs the study."""
    run_config.check_device()
    distributed.setup(run_config.device)
    if distributed.rank() != 0:
        follow_rank0(run_config, opt_config)
        distributed.barrier()  # see below
        return None
    try:
        return run_study(run_config, opt_config)
    finally:
        distributed.broadcast_from_rank0([None])  # release the other ranks
        # Every rank done with that last collective before any tears the group down: a rank that
        # left while rank 0's broadcast was still in flight was once seen to abort (SIGABRT).
        distributed.barrier()


def run_workers(argv: list[str], workers: int, run_config: RunConfig,
                opt_config: OptimizeConfig) -> optuna.Study:
    """Start `workers` processes of this same command, each a worker of one study, and wait.

    CPU threads are divided between them, each gets one GPU (round robin) where there
    are GPUs, and each writes its output to runs/<project>/<study>_worker<i>.log.
    """
    study = open_study(run_config, opt_config)  # created once, before the workers race to create it
    threads = max(1, (os.cpu_count() or 1) // workers)
    gpus = torch.cuda.device_count()
    logs, procs = [], []
    for i in range(workers):
        # Not this process's wandb service (wandb exports WANDB_SERVICE): each worker runs its own.
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = RUNS_DIR / run_config.project / f"{study.study_name}_worker{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        logs.append(log)
        with open(log, "w") as out:
            # The same command as one worker: argparse takes the last --workers given.
            procs.append(subprocess.Popen([sys.executable, str(TEMPLATE_DIR / "main.py"), *argv,
                                           "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    print(f"{workers} workers on study {study.study_name}; logs: {', '.join(map(str, logs))}", flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()  # they got the same Ctrl-C: let them save their checkpoints
        raise
    for i, code in enumerate(codes):
        if code < 0:  # killed outright: the others retried its trial if they outlived its grace period
            name = next((s.name for s in signal.Signals if s == -code), f"signal {-code}")
            print(f"worker {i} was killed ({name}): the trial it ran does not count, and is tried again "
                  f"by the other workers or by the next run; see {logs[i]}", file=sys.stderr)
    for i, code in enumerate(codes):
        if code == 2:  # bad input or a file system without locks: the worker's one line, said here too
            said = [line[len("error: "):] for line in logs[i].read_text().splitlines()
                    if line.startswith("error: ")]
            raise ConfigError(f"worker {i} ({logs[i]})", "", said[-1] if said else "see its log")
    if any(code not in (0, 1) and code >= 0 for code in codes):
        raise RuntimeError(f"worker exit codes {codes}; see {', '.join(map(str, logs))}")
    return study


def report_best(study: optuna.Study, run_config: RunConfig) -> tuple[str, Path | None]:
    """A text summary of the study and the path of the exported best config."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    for t in trials:
        if t.state == TrialState.FAIL:
            # Only a trial failed by Optuna's heartbeat has no reason: its process could not write one.
            reason = t.user_attrs.get("reason", "no heartbeat: its process died (killed outright, out "
                                                "of memory, a failed node)")
            lines.append(f"  trial {t.number} failed: {reason}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    if not complete:
        lines.append("no trial completed, so there is no best configuration yet")
        return "\n".join(lines), None
    best = study.best_trial
    best_config = run_config.with_overrides({**best.params, "group": None},
                                            source=f"study {study.study_name}")
    path = RUNS_DIR / run_config.project / f"{study.study_name}_best.yaml"
    best_config.to_yaml(path)
    lines += [f"best trial {best.number}: {run_config.monitor} = {best.value:.6g}",
              *(f"  {k} = {v}" for k, v in best.params.items()),
              f"run folder: {best.user_attrs.get('run_dir')}",
              f"best config: {path}  (train it: python main.py --run_config {path})"]
    return "\n".join(lines), path

