"""run(): train one model per seed, all seeds at once as one stack (engine/vectorized.py) where
the model allows it, else one after another with the Trainer (engine/trainer.py), and write
runs/<project>/<group>/<seed>/ (metrics.csv, checkpoint.pt, best.pt, model.pt, result.json,
a wandb run; engine/seed_files.py).

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
import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from engine import distributed, provenance, vectorized
from engine.errors import ConfigError
from engine.folders import RUNS_DIR, check_group, claim_seeds, lock
from engine.reproducibility import determinism, set_seed
from engine.seed_files import (SeedFiles, checkpoint_to_resume, finished, resume_state,
                               states_at_one_position)
from engine.trainer import EpochCallback, SeedResult, Trainer
from engine.vectorized import SeedStack

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
        labels: dict | None = None, first_seed_callbacks: list[EpochCallback] = (), resume: bool = False,
        overrides: list[str] = ()) -> RunResult:
    """Train one model per seed of `config`; write runs/<project>/<group>/<seed>/.

    With `resume`, finished seeds are kept and unfinished ones continue from their
    checkpoints. `first_seed_callbacks` lets a search report the first seed's curve; `tags`
    and `labels` (keys for the config) mark each seed's wandb run.
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
        vectorize = config.trainer.vectorize_seeds and len(config.seeds) > 1
        if vectorize:  # decided once, before anything is written: a one-batch trial of the real step
            reason = vectorized.why_not(config, config.trainer_settings(), device, world, train_set, val_set)
            if reason is not None and rank == 0:
                print(f"seeds train one after another: {reason}", file=sys.stderr)
            vectorize = reason is None
        else:
            reason = "trainer.vectorize_seeds is false" if len(config.seeds) > 1 else "one seed"
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
                record = provenance.start(group_dir, config.config_hash(), device, list(overrides),
                                          {"vectorized": vectorize, "one_by_one_because": reason})
            except OSError as e:
                raise ConfigError(str(group_dir), "",
                                  f"cannot write the run folder: {e.strerror or e}") from None
        distributed.barrier()
        results, busy, status = [], [], "failed"
        try:
            together = vectorize and run_together(config, group, group_dir, device, (train_set, val_set),
                                                  first_seed_callbacks, tags, labels)
            if together:
                results, busy = together
            for index, seed in enumerate(config.seeds if not together else ()):
                callbacks = list(first_seed_callbacks) if index == 0 else []
                with seed_lock(group_dir / str(seed)) as mine:
                    if not mine:  # another process (--resume) is training it
                        busy.append(seed)
                        continue
                    results.append(run_seed(config, group, group_dir / str(seed), seed, device,
                                            (train_set, val_set), callbacks, tags, labels))
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


def run_seed(config: RunConfig, group: str, run_dir: Path, seed: int, device: str, data: tuple,
             callbacks: list[EpochCallback], tags: tuple[str, ...], labels: dict | None = None) -> SeedResult:
    """Train (or continue, or just report) one seed in run_dir."""
    done = finished(config, run_dir)
    if done:
        return SeedResult(**done)  # finished before: kept as it is
    writer = distributed.rank() == 0  # other ranks train their share and write nothing
    state = resume_state(run_dir, seed, writer)
    set_seed(seed)
    model, optimizer, scheduler, criterion = build(config, device)
    files = SeedFiles(config, group, run_dir, seed, tags, labels, state) if writer else None
    trainer = Trainer(model, optimizer, config.trainer_settings(), scheduler=scheduler, criterion=criterion,
                      device=device, callbacks=[*(files.callbacks if files else []), *callbacks],
                      on_checkpoint=files.save_checkpoint if files else None)
    try:
        result = trainer.train(*data, seed, desc=f"{group} seed {seed}", resume_from=state)
    except BaseException as e:
        if files:
            files.fail(e)
        raise
    result = (files.finish(result, model.state_dict()) if files else
              dataclasses.replace(result, run_dir=str(run_dir)))
    distributed.barrier()  # rank 0 has written this seed's files
    return result


def run_together(config: RunConfig, group: str, group_dir: Path, device: str, data: tuple,
                 first_seed_callbacks: list[EpochCallback], tags: tuple[str, ...],
                 labels: dict | None) -> tuple[list[SeedResult], list[int]] | None:
    """Train the unfinished seeds as one stack (engine/vectorized.py): (results, seeds another
    process is training), or None when their checkpoints do not stand at one position."""
    with contextlib.ExitStack() as held:
        mine, busy = [], []
        for seed in config.seeds:
            (mine if held.enter_context(seed_lock(group_dir / str(seed))) else busy).append(seed)
        results = {seed: SeedResult(**kept) for seed in mine
                   if (kept := finished(config, group_dir / str(seed)))}
        todo = [seed for seed in mine if seed not in results]
        states = states_at_one_position([group_dir / str(seed) for seed in todo], todo, writer=True)
        if isinstance(states, str):
            print(f"seeds train one after another: {states}", file=sys.stderr)
            return None
        if todo:
            models = []
            for seed in todo:
                set_seed(seed)  # each seed's initialisation, as when it trains on its own
                models.append(config.create_model(device))
            files = [SeedFiles(config, group, group_dir / str(seed), seed, tags, labels, state)
                     for seed, state in zip(todo, states)]
            callbacks = [f.callbacks + (list(first_seed_callbacks) if f.seed == config.seeds[0] else [])
                         for f in files]

            def done(index: int, result: SeedResult, weights: dict) -> None:  # as each seed stops
                results[todo[index]] = files[index].finish(result, weights)

            stack = SeedStack(models, config, config.trainer_settings(), device, todo, callbacks,
                              [f.save_checkpoint for f in files], done)
            try:
                stack.train(*data, states, desc=f"{group} seeds {','.join(map(str, todo))}")
            except BaseException as e:
                for index, f in enumerate(files):
                    if todo[index] not in results:
                        f.fail(e)
                raise
    return [results[seed] for seed in mine], busy
