"""run(): train one model per seed with the Trainer, and write runs/<project>/<group>/<seed>/
(metrics.csv, checkpoint.pt, best.pt, model.pt, result.json, a wandb run).

    from config import RunConfig
    from engine.run import run
    result = run(RunConfig.from_yaml("configs/run_template.yaml"))
    print(result.summary())

Everything that can fail on bad input (device, data, model, optimizer, results already on
disk, an unwritable runs/) is checked before anything is written. Under torchrun every rank
trains and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from engine import checkpoint, distributed, provenance, wandb_run
from engine.errors import ConfigError
from engine.folders import FINISHED_STATUSES, RUNS_DIR, check_group, claim_seeds, lock
from engine.reproducibility import determinism, set_seed
from engine.trainer import EpochCallback, SeedResult, Trainer

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig


@dataclass
class RunResult:
    group_dir: Path
    monitor: str
    seeds: list[SeedResult]
    busy: list[int] = dataclasses.field(default_factory=list)  # seeds another process was training

    @property
    def values(self) -> list[float]:
        """Best monitored values of the seeds that did not diverge."""
        return [s.best_value for s in self.seeds if s.status != "diverged"]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def summary(self) -> str:
        lines = [f"{'seed':>8}  {self.monitor:>12}  {'best epoch':>10}  status"]
        for s in self.seeds:
            lines.append(f"{s.seed:>8}  {s.best_value:>12.6g}  {s.best_epoch:>10}  {s.status}")
        lines.append(f"{self.monitor}: {self.mean:.6g} ± {self.std:.3g} over {len(self.values)} seed(s)")
        diverged = [s.seed for s in self.seeds if s.status == "diverged"]
        if diverged:
            lines.append(f"diverged (NaN/inf, left out of the mean): seeds {diverged}")
        if self.busy:
            lines.append(f"being trained by another process, so left to it: seeds {self.busy}")
        lines.append(f"files: {self.group_dir}/")
        return "\n".join(lines)


def run(config: RunConfig, *, group: str | None = None, tags: tuple[str, ...] = (),
        first_seed_callbacks: list[EpochCallback] = (), resume: bool = False,
        overrides: list[str] = ()) -> RunResult:
    """Train one model per seed of `config`; write runs/<project>/<group>/<seed>/.

    With `resume`, finished seeds are kept and unfinished ones continue from their
    checkpoints. `first_seed_callbacks` lets a search report the first seed's curve.
    """
    config.check_device()
    rank, world, device = distributed.setup(config.device)  # torchrun: one process per rank
    # Before the data is built: a deterministic run builds it on one thread too.
    with determinism(config.trainer.deterministic, device):
        if config.batch_size < world:
            raise ConfigError(config.source, "batch_size",
                              f"is the global batch: at least one sample per rank ({world}), "
                              f"got {config.batch_size}")
        train_set, val_set = config.load_data()
        set_seed(config.seeds[0])
        build(config, device)  # a throwaway build: a bad net_config fails before any file exists
        group = group or config.group_name()
        group_dir = RUNS_DIR / config.project / group
        check_group(config, group_dir, resume)  # every rank reads the same files, so all agree
        for seed in config.seeds if resume else ():  # a seed that cannot resume stops us before any write
            if not finished(config, group_dir / str(seed)):
                checkpoint_to_resume(group_dir / str(seed), seed)
        distributed.barrier()  # every rank has checked before rank 0 makes the seed folders
        record = None
        if rank == 0:  # only rank 0 writes
            try:
                group_dir.mkdir(parents=True, exist_ok=True)
                if not resume:
                    claim_seeds(config, group_dir)  # before writing: a refused process writes nothing
                comment = f"merged from {config.source}" + (f"\noverrides: {' '.join(overrides)}"
                                                            if overrides else "")
                config.with_overrides({"group": group}).to_yaml(group_dir / "config.yaml", comment=comment)
                record = provenance.start(group_dir, config.config_hash(), device, list(overrides))
            except OSError as e:
                raise ConfigError(str(group_dir), "",
                                  f"cannot write the run folder: {e.strerror or e}") from None
        distributed.barrier()
        results, busy, status = [], [], "failed"
        try:
            for index, seed in enumerate(config.seeds):
                callbacks = list(first_seed_callbacks) if index == 0 else []
                with seed_lock(group_dir / str(seed)) as mine:
                    if not mine:  # another process (--resume) is training it
                        busy.append(seed)
                        continue
                    results.append(run_seed(config, group, group_dir / str(seed), seed, device,
                                            (train_set, val_set), callbacks, tags))
            status = "finished"
        except BaseException as e:  # interrupted, pruned or crashed: the record says which
            status = type(e).__name__
            raise
        finally:
            if record is not None:
                with contextlib.suppress(OSError):  # a full disk: what failed first is what gets reported
                    provenance.finish(group_dir, record, status)
        return RunResult(group_dir, config.monitor, results, busy)


@contextlib.contextmanager
def seed_lock(run_dir: Path) -> Iterator[bool]:
    """Whether this process trains the seed: rank 0 holds its lock throughout, and every rank
    follows rank 0's answer."""
    if distributed.rank() != 0:
        yield distributed.broadcast_from_rank0([None])[0]
        return
    run_dir.mkdir(exist_ok=True)
    with lock(run_dir, wait=False) as mine:
        yield distributed.broadcast_from_rank0([mine])[0]


def build(config: RunConfig, device: str) -> tuple:
    """(model, optimizer, scheduler, criterion), built from the config on `device`."""
    model = config.create_model(device)
    optimizer = config.create_optimizer(model)
    return model, optimizer, config.create_scheduler(optimizer), config.create_criterion()


def finished(config: RunConfig, run_dir: Path) -> dict | None:
    """The seed's result.json when it has nothing left to train (unless `epochs` was raised)."""
    done = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    longer = done.get("status") == "completed" and done.get("epochs_run", 0) < config.epochs
    return done if done.get("status") in FINISHED_STATUSES and not longer else None


def checkpoint_to_resume(run_dir: Path, seed: int) -> tuple[Path | None, str | None]:
    """The checkpoint a seed resumes from, and why it is not checkpoint.pt: checkpoint.prev.pt when
    the newest is damaged, or missing (a kill between a save's two renames). Checksums only."""
    newest = run_dir / "checkpoint.pt"
    found = [p for p in (newest, checkpoint.previous_of(newest)) if p.exists()]
    problems = {}
    for path in found:
        problems[path] = checkpoint.damage(path)
        if problems[path] is None:
            return path, None if path == newest else f"{newest}: {problems.get(newest, 'missing')}"
    if not found:
        return None, None
    kept = ["best.pt"] if (run_dir / "best.pt").exists() else []
    with contextlib.suppress(OSError, csv.Error):
        with open(run_dir / "metrics.csv") as f:
            epochs = [row["epoch"] for row in csv.DictReader(f)]
        if epochs:
            kept.append(f"metrics.csv up to epoch {epochs[-1]}")
    names, kept = " and ".join(p.name for p in found), ", ".join(kept) or "nothing"
    raise checkpoint.Unreadable(str(found[0]), "", f"{problems[found[0]]}; kept: {kept}; delete {names} "
                                f"to train seed {seed} again from the start, or restore a copy")


def run_seed(config: RunConfig, group: str, run_dir: Path, seed: int, device: str, data: tuple,
             callbacks: list[EpochCallback], tags: tuple[str, ...]) -> SeedResult:
    """Train (or continue, or just report) one seed in run_dir."""
    done = finished(config, run_dir)
    if done:
        return SeedResult(**done)  # finished before: kept as it is
    path, note = checkpoint_to_resume(run_dir, seed)
    state = checkpoint.load(path) if path else None
    if note and distributed.rank() == 0:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # damaged: the next save must not keep it
        print(f"seed {seed}: {note}; resumed from {path.name} (epoch {state['epoch']})", file=sys.stderr)
    set_seed(seed)
    model, optimizer, scheduler, criterion = build(config, device)
    settings = config.trainer_settings()
    if distributed.rank() != 0:  # other ranks train their share and write nothing
        trainer = Trainer(model, optimizer, settings, scheduler=scheduler, criterion=criterion, device=device,
                          callbacks=callbacks)
        result = trainer.train(*data, seed, resume_from=state)
        distributed.barrier()  # rank 0 has written this seed's files
        return dataclasses.replace(result, run_dir=str(run_dir))
    run_dir.mkdir(exist_ok=True)
    history = state["history"] if state else []
    columns = config.columns()
    with open(run_dir / "metrics.csv", "w", newline="") as f:  # rows after the checkpoint are redone
        csv.writer(f).writerows([columns] + [[m[k] for k in columns] for m in history])
    # A new process writes best.pt at its first checkpoint: the last one may have died first.
    saved_best = [None]

    def save_checkpoint(full_state: dict) -> None:
        # best.pt before checkpoint.pt: a kill between the two never leaves a checkpoint
        # that claims a best epoch whose weights best.pt does not hold.
        if full_state["best_state"] is not None and full_state["best_epoch"] != saved_best[0]:
            checkpoint.save(run_dir / "best.pt", full_state["best_state"])
            saved_best[0] = full_state["best_epoch"]
        checkpoint.save(run_dir / "checkpoint.pt", full_state, keep_previous=True)

    logger = wandb_run.start(config, group, seed, tags, run_dir)
    with open(run_dir / "metrics.csv", "a", newline="") as csv_file:
        writer = csv.writer(csv_file)

        def write_row(epoch: int, metrics: dict) -> None:
            try:
                writer.writerow([metrics[k] for k in columns])
                csv_file.flush()  # a crash keeps every finished epoch
            except OSError as e:
                raise checkpoint.WriteError(e.errno, f"{run_dir / 'metrics.csv'}: cannot write the row of "
                                                     f"epoch {epoch}: {e.strerror}") from None

        log = [lambda epoch, metrics: logger.log(metrics, step=epoch)] if logger else []
        trainer = Trainer(model, optimizer, settings, scheduler=scheduler, criterion=criterion, device=device,
                          callbacks=[write_row, *log, *callbacks], on_checkpoint=save_checkpoint)
        outcome = "failed"
        try:
            result = trainer.train(*data, seed, desc=f"{group} seed {seed}", resume_from=state)
            outcome = result.status
        except BaseException as e:  # pruned, interrupted or crashed: say so on disk
            outcome = "pruned" if type(e).__name__ == "TrialPruned" else \
                "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            with contextlib.suppress(OSError):  # a full disk: what failed first is what gets reported
                checkpoint.write_json(run_dir / "result.json",
                                      {"seed": seed, "status": outcome, "error": repr(e)})
            raise
        finally:
            if logger is not None:  # always close the wandb run, whatever happened
                logger.summary.update({"status": outcome})
                logger.finish(exit_code=0 if outcome not in ("failed", "interrupted") else 1)
    checkpoint.save(run_dir / "model.pt", model.state_dict())  # the best epoch's weights
    result = dataclasses.replace(result, run_dir=str(run_dir))
    checkpoint.write_json(run_dir / "result.json", {k: v for k, v in dataclasses.asdict(result).items()
                                                    if k != "history"})
    # Finished: the safety copy goes, so a finished seed takes no more disk than before it existed.
    checkpoint.previous_of(run_dir / "checkpoint.pt").unlink(missing_ok=True)
    distributed.barrier()
    return result
