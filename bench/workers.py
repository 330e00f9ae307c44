"""Benchmark: what do several worker processes on one Optuna study buy, and which
storage should they share on one machine?

    python bench/workers.py

Run it from anywhere; it measures two things.

1. `--workers 2` against one worker, through the real command line. It runs
   `python main.py --run_config RUN --optimize_config OPT [--workers 2]` in a
   subprocess, in a temporary working folder (runs/ lands there), twice: 1 worker
   with OMP_NUM_THREADS set to the core count (the template's default of one process
   using every core), then 2 workers (the template gives each cores // 2 threads).
   RUN is configs/run_template.yaml with one seed, wandb disabled and 10 epochs
   (cosine T_max 10); OPT is the search space of configs/optimize_template.yaml with
   16 trials, no pruner (so both runs train every epoch of every trial), a fixed
   sampler seed and a study name of its own per run. Printed: wall seconds of each
   command, the speed-up, and the work each did (epochs and optimizer steps, read
   back from the study: the two runs sample different batch sizes, so the speed-up
   per optimizer step is printed too).

2. Optuna's journal file storage against SQLite under 4 concurrent processes on one
   study, with plain Optuna (no template code): each process calls
   `optuna.create_study(load_if_exists=True)` and `study.optimize(n_trials=25)` with
   a TPE sampler and an objective that sleeps 20 ms. Storages:
   `JournalStorage(JournalFileBackend(path))` and `RDBStorage("sqlite:///path",
   heartbeat_interval=10)`, as the template opens its default SQLite study. The
   processes import Optuna first and start together on a signal, so the wall time
   is the search alone. A storage error ("database is locked", ...) is counted, with
   where it happened (create_study or optimize), and the process carries on with its
   remaining trials.
   Each storage is run 3 times, alternating; the medians are printed.

Nothing is written to the repository: everything goes to temporary folders that are
removed at the end. It took about a minute on two CPU cores.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the workers' logs
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RUN_TEMPLATE = REPO_ROOT / "configs" / "run_template.yaml"
OPTIMIZE_TEMPLATE = REPO_ROOT / "configs" / "optimize_template.yaml"
SEARCH_TRIALS = 16
SEARCH_EPOCHS = 10
SEARCH_SEED = 42
STORAGE_PROCESSES = 4
STORAGE_TRIALS_EACH = 25
STORAGE_SLEEP_S = 0.02
STORAGE_REPEATS = 3
STORAGE_KINDS = ("journal", "sqlite")
MAX_RETRIES = 20  # storage errors one process tolerates before it gives up


# --- 1. one worker against two, through main.py ----------------------------------------

def write_configs(folder: Path, study_name: str) -> tuple[Path, Path, dict]:
    """The shrunk run config and the 16-trial, unpruned optimize config, as YAML files."""
    import yaml

    from config import load_yaml

    run = load_yaml(RUN_TEMPLATE)
    overrides = {"seeds": run["seeds"][:1], "epochs": SEARCH_EPOCHS,
                 "scheduler_config.T_max": SEARCH_EPOCHS, "wandb.mode": "disabled"}
    run["seeds"] = overrides["seeds"]
    run["epochs"] = SEARCH_EPOCHS
    run["scheduler_config"]["T_max"] = SEARCH_EPOCHS
    run["wandb"] = {**(run.get("wandb") or {}), "mode": "disabled"}
    template = load_yaml(OPTIMIZE_TEMPLATE)
    optimize = {"search_space": template["search_space"], "trials": SEARCH_TRIALS, "seed": SEARCH_SEED,
                "study_name": study_name, "pruner": None}
    run_path, optimize_path = folder / "run.yaml", folder / "optimize.yaml"
    run_path.write_text(yaml.safe_dump(run, sort_keys=False))
    optimize_path.write_text(yaml.safe_dump(optimize, sort_keys=False))
    return run_path, optimize_path, overrides


def study_work(db: Path, study_name: str, train_size: int) -> dict:
    """Trials by state, epochs trained and optimizer steps, read back from the study."""
    import math

    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    epochs = sum(len(t.intermediate_values) for t in done)
    steps = sum(len(t.intermediate_values) * math.ceil(train_size / t.params["batch_size"]) for t in done)
    return {"complete": len(done), "failed": sum(t.state == TrialState.FAIL for t in trials),
            "epochs": epochs, "steps": steps}


def run_search(workers: int, workdir: Path, cores: int) -> dict:
    study_name = f"bench_workers{workers}"
    folder = workdir / study_name
    folder.mkdir()
    run_path, optimize_path, _ = write_configs(folder, study_name)
    command = [sys.executable, str(REPO_ROOT / "main.py"), "--run_config", str(run_path),
               "--optimize_config", str(optimize_path)]
    if workers > 1:
        command += ["--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    start = time.perf_counter()
    with open(folder / "output.log", "w") as log:
        code = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = (folder / "output.log").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{tail}")
    from config import RunConfig
    data = RunConfig.from_yaml(run_path).data_config
    train_size = round(data["n"] * (1 - data["val_fraction"]))
    db = folder / "runs" / RunConfig.from_yaml(run_path).project / "optuna.db"
    return {"workers": workers, "wall_s": wall, **study_work(db, study_name, train_size)}


def bench_search(workdir: Path) -> None:
    cores = os.cpu_count() or 1
    _, _, overrides = write_configs(workdir, "preview")
    print(f"1. {SEARCH_TRIALS}-trial search through main.py, 1 worker vs 2 ({cores} cores)")
    print(f"   run config: {RUN_TEMPLATE.name} with {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    print(f"   optimize config: search space of {OPTIMIZE_TEMPLATE.name}, trials={SEARCH_TRIALS}, "
          f"pruner=null, seed={SEARCH_SEED}, one study_name per run")
    print(f"   threads: 1 worker OMP_NUM_THREADS={cores}; 2 workers {max(1, cores // 2)} each "
          "(set by the template)", flush=True)
    results = [run_search(workers, workdir, cores) for workers in (1, 2)]
    print(f"   {'workers':>7} {'wall s':>7} {'complete':>8} {'failed':>6} {'epochs':>6} {'steps':>6}"
          f" {'steps/s':>8}")
    for r in results:
        print(f"   {r['workers']:>7} {r['wall_s']:>7.1f} {r['complete']:>8} {r['failed']:>6} {r['epochs']:>6}"
              f" {r['steps']:>6} {r['steps'] / r['wall_s']:>8.0f}")
    one, two = results
    print(f"   speed-up, 2 workers over 1 (wall time): {one['wall_s'] / two['wall_s']:.2f}x")
    print(f"   speed-up per optimizer step (steps/s):  "
          f"{(two['steps'] / two['wall_s']) / (one['steps'] / one['wall_s']):.2f}x", flush=True)


# --- 2. journal file against SQLite, 4 processes on one study ------------------------

def open_storage(kind: str, path: str):
    import warnings

    import optuna
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(f"sqlite:///{path}", heartbeat_interval=10)


def storage_worker(kind: str, path: str, index: int) -> int:
    """One process: wait for the go signal, then run its trials; print a JSON report."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        time.sleep(STORAGE_SLEEP_S)
        return (x - 2) ** 2

    print("ready", flush=True)
    sys.stdin.readline()  # the go signal: every process starts at once
    start = time.perf_counter()
    errors, done, study = [], 0, None

    def count(study: optuna.Study, trial) -> None:
        nonlocal done
        done += 1

    while done < STORAGE_TRIALS_EACH and len(errors) <= MAX_RETRIES:
        phase = "create_study" if study is None else "optimize"
        try:  # a storage error is counted, then the process goes on with its remaining trials
            if study is None:
                study = optuna.create_study(storage=open_storage(kind, path), study_name="bench",
                                            sampler=optuna.samplers.TPESampler(seed=index),
                                            load_if_exists=True)
            study.optimize(objective, n_trials=STORAGE_TRIALS_EACH - done, callbacks=[count])
        except Exception as e:
            errors.append(f"in {phase}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    print(json.dumps({"done": done, "errors": errors, "seconds": time.perf_counter() - start}), flush=True)
    return 0


def run_storage(kind: str, folder: Path) -> dict:
    path = folder / f"{kind}.{'log' if kind == 'journal' else 'db'}"
    procs = [subprocess.Popen([sys.executable, __file__, "--storage-worker", kind, str(path), str(i)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(STORAGE_PROCESSES)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{kind} worker did not start: {p.communicate()[1][-2000:]}")
    start = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    reports = []
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0 or not out.strip():
            raise RuntimeError(f"{kind} worker exited {p.returncode}: {err[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))

    import optuna
    from optuna.trial import TrialState
    trials = optuna.load_study(study_name="bench",
                               storage=open_storage(kind, str(path))).get_trials(deepcopy=False)
    return {"wall_s": wall, "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "not_complete": sum(t.state != TrialState.COMPLETE for t in trials),
            "errors": [e for r in reports for e in r["errors"]]}


def bench_storage(workdir: Path) -> None:
    total = STORAGE_PROCESSES * STORAGE_TRIALS_EACH
    print(f"2. journal file vs SQLite: {STORAGE_PROCESSES} processes x {STORAGE_TRIALS_EACH} trials "
          f"on one study (TPE, objective sleeps {STORAGE_SLEEP_S * 1000:.0f} ms), {STORAGE_REPEATS} repeats",
          flush=True)
    results = {kind: [] for kind in STORAGE_KINDS}
    for repeat in range(STORAGE_REPEATS):
        for kind in STORAGE_KINDS:  # alternating, so a slow spell on the machine hits both
            folder = workdir / f"storage_{kind}_{repeat}"
            folder.mkdir()
            result = run_storage(kind, folder)
            results[kind].append(result)
            print(f"   {kind:<8} repeat {repeat + 1}: {result['wall_s']:5.2f} s, "
                  f"{result['complete']}/{total} complete, {len(result['errors'])} errors", flush=True)
    print(f"   {'storage':<8} {'median wall s':>13} {'median complete':>15} {'errors (all repeats)':>21}")
    for kind in STORAGE_KINDS:
        rs = results[kind]
        print(f"   {kind:<8} {statistics.median(r['wall_s'] for r in rs):>13.2f}"
              f" {statistics.median(r['complete'] for r in rs):>15g} {sum(len(r['errors']) for r in rs):>21}")
        for message, count in Counter(e for r in rs for e in r["errors"]).most_common():
            print(f"      {count} x {message}")
    journal = statistics.median(r["wall_s"] for r in results["journal"])
    sqlite = statistics.median(r["wall_s"] for r in results["sqlite"])
    print(f"   SQLite/journal median wall time: {sqlite / journal:.2f}x", flush=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    start = time.perf_counter()
    try:
        bench_search(workdir)
        bench_storage(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"bench wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--storage-worker":
        sys.exit(storage_worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(main())
