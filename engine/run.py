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

import torch

from engine import checkpoint, distributed, provenance, stacking
from engine.errors import ConfigError
from engine.folders import RUNS_DIR, check_group, claim_seeds
from engine.locks import lock
from engine.reproducibility import determinism, set_seed
from engine.seed_files import SeedFiles, checkpoint_to_resume, finished, states_at_one_position
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
        built: dict = {}  # each seed's model, built once: the first now (a bad net_config fails here)
        vectorize = config.trainer.vectorize_seeds and len(config.seeds) > 1
        # The first seed's model now, and the second's too for the trial of stacking them.
        models = [seed_model(config, seed, device, built)[0] for seed in config.seeds[:2 if vectorize else 1]]
        optimizer = config.create_optimizer(models[0])  # thrown away: a bad *_config fails here too
        config.create_scheduler(optimizer), config.create_criterion()
        if vectorize:  # decided once, before anything is written: a one-batch trial of the real step
            reason = "; ".join(stacking.why_not(config, config.trainer_settings(), device, world, train_set,
                                                  val_set, models)) or None
            vectorize = reason is None
        else:
            reason = "trainer.vectorize_seeds is false" if len(config.seeds) > 1 else "one seed"
        group = group or config.group_name()
        group_dir = RUNS_DIR / config.project / group
        check_group(config, group_dir, resume)  # every rank reads the same files, so all agree
        loaded: dict = {}  # the checkpoints read here, each read once (seed_files.read_once)
        for seed in config.seeds if resume else ():  # a seed that cannot resume stops us before any write
            if not finished(config, group_dir / str(seed)):
                checkpoint_to_resume(group_dir / str(seed), seed, loaded)
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

        def say(line: str) -> None:  # one line, always: how the seeds train, and why
            if rank == 0 and len(config.seeds) > 1:
                print(line, file=sys.stderr)

        if not vectorize:
            say(f"seeds train one after another: {reason}")
        results, busy, status = [], [], "failed"
        try:
            # Groups of seeds that train at once: all of them together, or each on its own.
            queue = [(config.seeds, True)] if vectorize else [([seed], False) for seed in config.seeds]
            while queue:
                seeds, together = queue.pop(0)
                with contextlib.ExitStack() as held:
                    mine = [s for s in seeds if held.enter_context(seed_lock(group_dir / str(s)))]
                    busy += [s for s in seeds if s not in mine]  # another process (--resume) trains them
                    kept = {s: finished(config, group_dir / str(s)) for s in mine}
                    results += [SeedResult(**kept[s]) for s in mine if kept[s]]
                    todo = [s for s in mine if not kept[s]]
                    folders = [group_dir / str(s) for s in todo]
                    states = states_at_one_position(folders, todo, rank == 0, loaded)
                    if isinstance(states, str):  # their checkpoints stand at different positions
                        say(f"seeds train one after another: {states}")
                        queue += [([s], False) for s in todo]
                        if record is not None:  # provenance.json says what ran, not what was planned
                            record.update(vectorized=False, one_by_one_because=states)
                        continue
                    if together:  # said once their checkpoints are known to stand together
                        caveat = "; with dropout, a seed's draws depend on the seeds beside it"
                        say(f"seeds {','.join(map(str, config.seeds))} train together as one stacked model"
                            + caveat * has_dropout(models[0]))
                    if todo:
                        results += train_seeds(config, group, group_dir, todo, states, device,
                                               (train_set, val_set), first_seed_callbacks, tags, labels,
                                               built, together=together)
            results.sort(key=lambda r: config.seeds.index(r.seed))
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


def seed_model(config: RunConfig, seed: int, device: str, built: dict) -> tuple:
    """(seed's model, the RNG states right after building it), built once and kept in `built`:
    after seeding with the seed, so its initialisation is its own, whatever trains beside it."""
    if seed not in built:
        set_seed(seed)
        built[seed] = (config.create_model(device), checkpoint.rng_states())
    return built[seed]


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())


def train_seeds(config: RunConfig, group: str, group_dir: Path, seeds: list[int], states: list[dict | None],
                device: str, data: tuple, first_seed_callbacks: list[EpochCallback], tags: tuple[str, ...],
                labels: dict | None, built: dict, together: bool = False) -> list[SeedResult]:
    """Train (or continue) `seeds`, each from its state: one seed alone, or `together` as one
    stack (engine/vectorized.py). Only rank 0 writes (SeedFiles); other ranks train their share."""
    writer = distributed.rank() == 0
    models, rngs = zip(*(seed_model(config, seed, device, built) for seed in seeds))
    for seed in seeds:
        del built[seed]
    checkpoint.set_rng_states(rngs[-1])  # as if the models had just been built
    files = [SeedFiles(config, group, group_dir / str(seed), seed, tags, labels, state) if writer else None
             for seed, state in zip(seeds, states)]
    callbacks = [(f.callbacks if f else []) + (list(first_seed_callbacks) if seed == config.seeds[0] else [])
                 for f, seed in zip(files, seeds)]
    savers = [f.save_checkpoint if f else None for f in files]
    results: dict[int, SeedResult] = {}

    def done(k: int, result: SeedResult, weights: dict) -> None:  # as each seed stops
        results[k] = (files[k].finish(result, weights) if files[k] else
                      dataclasses.replace(result, run_dir=str(group_dir / str(seeds[k]))))

    settings, desc = config.trainer_settings(), f"{group} seed{'s' * together} {','.join(map(str, seeds))}"
    if together:
        stack = SeedStack(list(models), config, settings, device, seeds)
        trainer = Trainer(stack, stack.optimizer, settings, scheduler=stack.scheduler, callbacks=callbacks,
                          on_checkpoint=savers)
        train = dict(resume_from=states)
    else:
        optimizer = config.create_optimizer(models[0])
        trainer = Trainer(models[0], optimizer, settings, scheduler=config.create_scheduler(optimizer),
                          criterion=config.create_criterion(), device=device, callbacks=callbacks[0],
                          on_checkpoint=savers[0])
        train = dict(seed=seeds[0], resume_from=states[0])
    try:
        trainer.train(*data, desc=desc, on_done=done, **train)
    except BaseException as e:
        for k, f in enumerate(files):
            if f is not None and k not in results:
                f.fail(e)
        raise
    distributed.barrier()  # rank 0 has written these seeds' files
    return [results[k] for k in range(len(seeds))]
