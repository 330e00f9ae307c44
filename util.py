"""Training: the shipped data, seeding, the `Trainer` loop and `run()`, which
trains one model per seed and writes runs/<project>/<group>/<seed>/.

    from config import RunConfig
    from util import run
    result = run(RunConfig.from_yaml("configs/run_template.yaml"))

What you may change: `load_data` (or point `data:` elsewhere), and the step in
`Trainer.train_epoch` if your model needs more than `criterion(model(x), y)`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from config import ConfigError, RunConfig

RUNS_DIR = Path("runs")
EpochCallback = Callable[[int, dict], None]  # (epoch, metrics) after each epoch; may raise to stop


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


def set_seed(seed: int) -> None:
    """Seed every generator a run draws from (CUDA included, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    status: str                  # completed | early_stopped | diverged
    best_value: float            # of the monitored metric, at best_epoch
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Trains one model: per batch forward, loss, backward, step; per epoch validate,
    keep the best weights, stop early or on NaN. Read it top to bottom."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 criterion: Callable, *, device: str, epochs: int, batch_size: int,
                 monitor: str = "val_loss", mode: str = "min", patience: int | None = None,
                 min_delta: float = 0.0, callbacks: list[EpochCallback] = ()):
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.device, self.epochs, self.batch_size = device, epochs, batch_size
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.callbacks = list(callbacks)

    def batches(self, data: Any, shuffle: bool, generator: torch.Generator) -> Iterator[tuple]:
        """In-memory tensors are sliced by index on the device (no per-sample Python
        work); any other dataset goes through a DataLoader."""
        if isinstance(data, tuple):
            n = len(data[0])
            order = torch.randperm(n, generator=generator).to(self.device) if shuffle else None
            for start in range(0, n, self.batch_size):
                index = order[start:start + self.batch_size] if shuffle else slice(start, start + self.batch_size)
                yield tuple(t[index] for t in data)
        else:
            loader = DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=generator)
            for batch in loader:
                yield tuple(t.to(self.device, non_blocking=True) for t in batch)

    def on_device(self, dataset: Dataset) -> Any:
        if isinstance(dataset, TensorDataset):
            return tuple(t.to(self.device) for t in dataset.tensors)
        return dataset

    def train_epoch(self, data: Any, generator: torch.Generator) -> float:
        self.model.train()
        # Summed on the device and read once per epoch: no host sync per step.
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self.batches(data, shuffle=True, generator=generator):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(y)  # weight by batch size: a per-sample mean
            count += len(y)
        return (total / count).item()

    @torch.inference_mode()
    def evaluate(self, data: Any) -> float:
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self.batches(data, shuffle=False, generator=None):
            total += self.criterion(self.model(x), y) * len(y)
            count += len(y)
        return (total / count).item()

    def improved(self, value: float, best: float) -> bool:
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    def train(self, train_set: Dataset, val_set: Dataset, seed: int, desc: str = "") -> TrainResult:
        train_data, val_data = self.on_device(train_set), self.on_device(val_set)
        generator = torch.Generator().manual_seed(seed)  # the shuffling order, per seed
        best = math.inf if self.mode == "min" else -math.inf
        best_epoch, best_state, status = 0, None, "completed"
        history: list[dict] = []
        start = time.perf_counter()
        bar = tqdm(range(1, self.epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
        for epoch in bar:
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch(train_data, generator)
            val_loss = self.evaluate(val_data)
            metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                       "lr": lr, "wall_time": time.perf_counter() - start}
            history.append(metrics)
            bar.set_postfix(train_loss=f"{train_loss:.4g}", val_loss=f"{val_loss:.4g}")
            for callback in self.callbacks:  # metrics.csv, wandb, Optuna (may raise TrialPruned)
                callback(epoch, metrics)
            value = metrics[self.monitor]
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                status = "diverged"
                break
            if self.improved(value, best):
                best, best_epoch = value, epoch
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            elif self.patience is not None and epoch - best_epoch >= self.patience:
                status = "early_stopped"
                break
            if self.scheduler is not None:
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(value)
                else:
                    self.scheduler.step()
        bar.close()
        if best_state is not None:  # hand back the best weights, not the last ones
            self.model.load_state_dict(best_state)
        return TrainResult(status, best, best_epoch, len(history), history)


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
        first_seed_callbacks: list[EpochCallback] = ()) -> RunResult:
    """Train one model per seed; write runs/<project>/<group>/<seed>/.

    Everything that can fail on bad input (device, data, model, optimizer, existing
    results) is checked before anything is written. `first_seed_callbacks` lets a
    search report the first seed's curve to Optuna.
    """
    device = config.resolve_device()
    train_set, val_set = config.load_data()
    set_seed(config.seeds[0])
    _build(config, device)  # a throwaway build: a bad net_config fails before any file exists
    group = group or config.group_name()
    group_dir = RUNS_DIR / config.project / group
    _refuse_existing(config, group_dir)

    group_dir.mkdir(parents=True, exist_ok=True)
    config.with_overrides({"group": group}).to_yaml(group_dir / "config.yaml")
    results = []
    for index, seed in enumerate(config.seeds):
        run_dir = group_dir / str(seed)
        run_dir.mkdir()
        set_seed(seed)
        model, optimizer, scheduler, criterion = _build(config, device)
        logger = _start_wandb(config, group, seed, tags, group_dir)
        with open(run_dir / "metrics.csv", "w", newline="") as csv_file:
            writer = csv.writer(csv_file)
            writer.writerow(["epoch", "train_loss", "val_loss", "lr", "wall_time"])

            def write_row(epoch: int, metrics: dict) -> None:
                writer.writerow([metrics[k] for k in ("epoch", "train_loss", "val_loss", "lr", "wall_time")])
                csv_file.flush()  # a crash keeps every finished epoch

            callbacks = [write_row] + ([lambda epoch, m: logger.log(m, step=epoch)] if logger else [])
            callbacks += list(first_seed_callbacks) if index == 0 else []
            trainer = Trainer(model, optimizer, scheduler, criterion, device=device,
                              epochs=config.epochs, batch_size=config.batch_size,
                              monitor=config.monitor, mode=config.mode,
                              patience=config.early_stopping.patience,
                              min_delta=config.early_stopping.min_delta, callbacks=callbacks)
            outcome = "failed"
            try:
                result = trainer.train(train_set, val_set, seed, desc=f"{group} seed {seed}")
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
        torch.save(model.state_dict(), run_dir / "model.pt")
        seed_result = SeedResult(seed, result.status, result.best_value, result.best_epoch,
                                 result.epochs_run, str(run_dir))
        _write_json(run_dir / "result.json", asdict(seed_result))
        results.append(seed_result)
    return RunResult(group_dir, config.monitor, results)


def _build(config: RunConfig, device: str) -> tuple:
    model = config.build_model(device)
    optimizer = config.build_optimizer(model)
    return model, optimizer, config.build_scheduler(optimizer), config.build_criterion()


def _refuse_existing(config: RunConfig, group_dir: Path) -> None:
    """Results on disk are never overwritten: refuse before writing anything."""
    if group_dir.exists() and not group_dir.is_dir():
        raise ConfigError(config.source, "project", f"{group_dir} exists and is not a folder")
    done = [str(s) for s in config.seeds if (group_dir / str(s)).exists()]
    if done:
        raise ConfigError(config.source, "seeds",
                          f"{group_dir}/ already holds seed(s) {', '.join(done)}; results are never "
                          "overwritten: delete that folder to train again, or set another `group`")
    saved = group_dir / "config.yaml"
    if saved.exists() and RunConfig.from_yaml(saved).with_overrides({"group": None}).to_dict() \
            != config.with_overrides({"group": None}).to_dict():
        raise ConfigError(config.source, "group", f"{group_dir}/ holds a different config; choose another group")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


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


def _start_wandb(config: RunConfig, group: str, seed: int, tags: tuple[str, ...], group_dir: Path) -> Any:
    mode = _wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return None
    import wandb  # imported only when used: it costs start-up time
    return wandb.init(
        project=config.project, entity=config.wandb.entity, group=group, name=f"{group}/{seed}",
        tags=[config.net.rsplit(".", 1)[-1], *config.wandb.tags, *tags],
        config={**config.to_dict(), "seed": seed}, mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(group_dir),  # offline files sit beside the run
        settings=wandb.Settings(silent=True, console="off"),
    )
