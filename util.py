"""The shipped data and `run()`, which trains one model per seed with the `Trainer`
and writes runs/<project>/<group>/<seed>/ (metrics.csv, checkpoints, result.json, wandb).

    from config import RunConfig
    from util import run
    result = run(RunConfig.from_yaml("configs/run_template.yaml"))

The loop itself is in trainer.py (`Trainer.train_epoch`: forward, loss, backward, step).
What you may change: `load_data` (or point `data:` at your own function), and the step
in `Trainer.train_epoch` if your model needs more than `criterion(model(x), y)`.
Seeding and the deterministic switch are in reproducibility.py.
"""
from __future__ import annotations

import csv
import json
import math
import os
import secrets
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

import checkpoint
import distributed
import provenance
from config import RUN_ONLY_KEYS, ConfigError, RunConfig
from reproducibility import determinism, set_seed  # noqa: F401  (util.set_seed: the seed helper)
from trainer import EpochCallback, Trainer, TrainResult  # noqa: F401  (util.Trainer: the loop)

RUNS_DIR = Path("runs")
FINISHED = ("completed", "early_stopped", "diverged")


# --------------------------------------------------------------------------- data and seeds

def load_data(n: int = 10_000, noise: float = 0.1, val_fraction: float = 0.2,
              seed: int = 0) -> tuple[Dataset, Dataset]:
    """The shipped task: y = sin(4πx) + 0.5 sin(10πx) + 1.5x² + noise, x ~ U[0, 1].

    Seeded by its own `seed`, so every training seed sees the same data.
    """
    if n < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"need n >= 2 and 0 < val_fraction < 1, got n={n}, val_fraction={val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator)
    y = (torch.sin(4 * math.pi * x) + 0.5 * torch.sin(10 * math.pi * x) + 1.5 * x**2
         + noise * torch.randn(n, 1, generator=generator))
    n_train = n - max(1, int(round(n * val_fraction)))
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def load_spirals(n: int = 3000, classes: int = 3, noise: float = 0.2, val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """A classification task that needs no download: `classes` interleaved 2-D spirals.
    Targets are class indices (int64), as torch.nn.CrossEntropyLoss expects."""
    if n < classes or classes < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"need n >= classes >= 2 and 0 < val_fraction < 1, got n={n}, classes={classes}")
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (n,), generator=generator)
    radius = torch.rand(n, generator=generator)
    angle = 6.0 * radius + 2 * math.pi * label / classes + noise * torch.randn(n, generator=generator)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    n_train = n - max(1, int(round(n * val_fraction)))
    return TensorDataset(x[:n_train], label[:n_train]), TensorDataset(x[n_train:], label[n_train:])


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of samples whose highest-scoring class is the target (class-index targets)."""
    return (pred.argmax(dim=-1) == target).float().mean()


# --------------------------------------------------------------------------- runs

@dataclass
class SeedResult:
    seed: int
    status: str        # completed | early_stopped | diverged
    best_value: float
    best_epoch: int
    epochs_run: int
    run_dir: str


@dataclass
class RunResult:
    group_dir: Path
    monitor: str
    seeds: list[SeedResult]

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
        lines.append(f"files: {self.group_dir}/")
        return "\n".join(lines)


def run(config: RunConfig, *, group: str | None = None, tags: tuple[str, ...] = (),
        first_seed_callbacks: list[EpochCallback] = (), resume: bool = False,
        overrides: list[str] = ()) -> RunResult:
    """Train one model per seed; write runs/<project>/<group>/<seed>/.

    Everything that can fail on bad input (device, data, model, optimizer, results or
    files already on disk, an unwritable runs/) is checked before anything is written.
    With `resume`, finished seeds are kept and unfinished ones continue from their
    checkpoints. `first_seed_callbacks` lets a search report the first seed's curve.
    """
    rank, world, device = distributed.setup(config.resolve_device())  # torchrun: one process per rank
    # Before the data is built: a deterministic run builds it on one thread too.
    with determinism(config.trainer.deterministic, device):
        if config.batch_size < world:
            raise ConfigError(config.source, "batch_size", f"is the global batch: at least one sample per rank "
                                                           f"({world}), got {config.batch_size}")
        train_set, val_set = config.load_data()
        set_seed(config.seeds[0])
        _build(config, device)  # a throwaway build: a bad net_config fails before any file exists
        group = group or config.group_name()
        group_dir = RUNS_DIR / config.project / group
        _check_group(config, group_dir, resume)  # every rank reads the same files, so all agree
        record = None
        if rank == 0:  # only rank 0 writes
            try:
                group_dir.mkdir(parents=True, exist_ok=True)
                comment = f"merged from {config.source}" + (f"\noverrides: {' '.join(overrides)}" if overrides else "")
                config.with_overrides({"group": group}).to_yaml(group_dir / "config.yaml", comment=comment)
                record = provenance.start(group_dir, config.config_hash(), device, list(overrides))
            except OSError as e:
                raise ConfigError(str(group_dir), "", f"cannot write the run folder: {e.strerror or e}") from None
        distributed.barrier()
        results, status = [], "failed"
        try:
            for index, seed in enumerate(config.seeds):
                callbacks = list(first_seed_callbacks) if index == 0 else []
                results.append(_run_seed(config, group, group_dir / str(seed), seed, device,
                                         (train_set, val_set), callbacks, tags))
            status = "finished"
        except BaseException as e:  # interrupted, pruned or crashed: the record says which
            status = type(e).__name__
            raise
        finally:
            if record is not None:
                provenance.finish(group_dir, record, status)
        return RunResult(group_dir, config.monitor, results)


def _run_seed(config: RunConfig, group: str, run_dir: Path, seed: int, device: str, data: tuple,
              callbacks: list[EpochCallback], tags: tuple[str, ...]) -> SeedResult:
    """Train (or continue, or just report) one seed in run_dir."""
    done = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    if done.get("status") in FINISHED and not (done["status"] == "completed" and done["epochs_run"] < config.epochs):
        return SeedResult(**done)  # finished before: kept as it is
    state = checkpoint.load(run_dir / "checkpoint.pt", device) if (run_dir / "checkpoint.pt").exists() else None
    set_seed(seed)
    model, optimizer, scheduler, criterion = _build(config, device)
    if distributed.rank() != 0:  # other ranks train their share and write nothing
        trainer = Trainer(model, optimizer, scheduler, criterion, config, device=device, callbacks=callbacks)
        result = trainer.train(*data, seed, resume_from=state)
        distributed.barrier()  # rank 0 has written this seed's files
        return SeedResult(seed, result.status, result.best_value, result.best_epoch, result.epochs_run, str(run_dir))
    run_dir.mkdir(exist_ok=True)
    history = state["history"] if state else []
    columns = config.columns()
    with open(run_dir / "metrics.csv", "w", newline="") as f:  # rows after the checkpoint are redone
        csv.writer(f).writerows([columns] + [[m[k] for k in columns] for m in history])
    saved_best = [None]  # a new process writes best.pt at its first checkpoint: the last one may have died first

    def save_checkpoint(full_state: dict) -> None:
        # best.pt before checkpoint.pt: a kill between the two never leaves a checkpoint
        # that claims a best epoch whose weights best.pt does not hold.
        if full_state["best_state"] is not None and full_state["best_epoch"] != saved_best[0]:
            checkpoint.save(run_dir / "best.pt", full_state["best_state"])
            saved_best[0] = full_state["best_epoch"]
        checkpoint.save(run_dir / "checkpoint.pt", full_state)

    logger = _start_wandb(config, group, seed, tags, run_dir)
    with open(run_dir / "metrics.csv", "a", newline="") as csv_file:
        writer = csv.writer(csv_file)

        def write_row(epoch: int, metrics: dict) -> None:
            writer.writerow([metrics[k] for k in columns])
            csv_file.flush()  # a crash keeps every finished epoch

        log = [lambda epoch, metrics: logger.log(metrics, step=epoch)] if logger else []
        trainer = Trainer(model, optimizer, scheduler, criterion, config, device=device,
                          callbacks=[write_row, *log, *callbacks], on_checkpoint=save_checkpoint)
        outcome = "failed"
        try:
            result = trainer.train(*data, seed, desc=f"{group} seed {seed}", resume_from=state)
            outcome = result.status
        except BaseException as e:  # pruned, interrupted or crashed: say so on disk
            outcome = "pruned" if type(e).__name__ == "TrialPruned" else \
                "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            _write_json(run_dir / "result.json", {"seed": seed, "status": outcome, "error": repr(e)})
            raise
        finally:
            if logger is not None:  # always close the wandb run, whatever happened
                logger.summary.update({"status": outcome})
                logger.finish(exit_code=0 if outcome not in ("failed", "interrupted") else 1)
    checkpoint.save(run_dir / "model.pt", model.state_dict())  # the best epoch's weights
    seed_result = SeedResult(seed, result.status, result.best_value, result.best_epoch,
                             result.epochs_run, str(run_dir))
    _write_json(run_dir / "result.json", asdict(seed_result))
    distributed.barrier()
    return seed_result


def _build(config: RunConfig, device: str) -> tuple:
    model = config.build_model(device)
    optimizer = config.build_optimizer(model)
    return model, optimizer, config.build_scheduler(optimizer), config.build_criterion()


def _check_group(config: RunConfig, group_dir: Path, resume: bool) -> None:
    """Results on disk are never overwritten, and a resume never mixes two configs:
    refuse before writing anything."""
    if group_dir.exists() and not group_dir.is_dir():
        raise ConfigError(config.source, "project", f"{group_dir} exists and is not a folder")
    for parent in (RUNS_DIR, RUNS_DIR / config.project):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(str(parent), "", "exists and is not a folder, so runs cannot be written there")
    started = [str(s) for s in config.seeds if (group_dir / str(s)).exists()]
    saved = group_dir / "config.yaml"
    if not resume:
        if started:
            raise ConfigError(config.source, "seeds",
                              f"{group_dir}/ already holds seed(s) {', '.join(started)}; results are never "
                              "overwritten: pass --resume to continue unfinished seeds (finished ones are "
                              "kept), or delete that folder to train again")
    elif not saved.exists():
        nearest = _nearest_group(config, group_dir.parent)
        hint = f"; the nearest, {nearest[0]}, differs in {', '.join(nearest[1])}" if nearest else ""
        raise ConfigError(config.source, "group", f"nothing to resume at {group_dir}/{hint}")
    if saved.exists():
        differing = RunConfig.from_yaml(saved).differences(config)
        if differing:
            raise ConfigError(config.source, differing[0],
                              f"{group_dir}/ was trained with a different config (differs in "
                              f"{', '.join(differing)}); only {', '.join(RUN_ONLY_KEYS)} may change")


def _nearest_group(config: RunConfig, project_dir: Path) -> tuple[str, list[str]] | None:
    candidates = []
    for saved in sorted(project_dir.glob("*/config.yaml")):
        try:
            candidates.append((saved.parent.name, RunConfig.from_yaml(saved).differences(config)))
        except ConfigError:
            continue
    return min(candidates, key=lambda c: len(c[1])) if candidates else None


def _write_json(path: Path, data: dict) -> None:
    checkpoint.write_text(path, json.dumps(data, indent=2) + "\n")


def _wandb_mode(mode: str) -> str:
    """auto = online only when credentials exist, so that wandb never prompts or hangs."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _start_wandb(config: RunConfig, group: str, seed: int, tags: tuple[str, ...], run_dir: Path) -> Any:
    mode = _wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return None
    import wandb  # imported only when used: it costs start-up time
    # One wandb run per seed for its whole life: a resumed seed continues the same run.
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return wandb.init(
        project=config.project, entity=config.wandb.entity, group=group, name=f"{group}/{seed}",
        id=id_file.read_text().strip(), resume="allow",
        tags=[config.net.rsplit(".", 1)[-1], *config.wandb.tags, *tags],
        config={**config.to_dict(), "seed": seed, "config_hash": config.config_hash()}, mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(run_dir.parent),  # offline files sit beside the run
        settings=wandb.Settings(silent=True, console="off"),
    )
