"""The training loop: one model, one seed, read top to bottom.

    settings = Settings(epochs=20, batch_size=64)        # engine.settings; or run_config.trainer_settings()
    trainer = Trainer(model, optimizer, settings, criterion=torch.nn.MSELoss())  # on the model's device
    result = trainer.train(train_set, val_set, seed=42)  # a SeedResult: status, best value, history

Per batch: the loss step, backward, optimizer step. Per epoch: validate, call the callbacks
(metrics.csv, wandb, Optuna), keep the best weights, stop early or on NaN/inf, step the
scheduler, and hand a checkpoint to `on_checkpoint` at most every `checkpoint_every_s`
seconds (always after the last epoch, and on SIGINT/SIGTERM). Everything the loop needs to
continue is in `state_dict()`, so a resumed run continues bit for bit, even mid-epoch.

The loss of a batch is computed in one place, `LossStep`: `model.loss(x, y, criterion)` when
your model defines it (in model.py), else `criterion(model(x), y)`. Training, validation and
--preflight all use it, so a loss with extra terms never needs an edit here.

A config's seeds usually train together, as one stacked model (engine/vectorized.py, the same
steps in the same order for every seed at once); this loop is the one they take one by one,
and the one a notebook builds. What you change in LossStep or your model holds for both.
"""
from __future__ import annotations

import inspect
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from engine import checkpoint, distributed
from engine.batches import Batches
from engine.settings import Settings

EpochCallback = Callable[[int, dict], None]  # (epoch, metrics) after each epoch; may raise to stop


@dataclass
class SeedResult:
    seed: int
    status: str                  # completed | early_stopped | diverged
    best_value: float            # of the monitored metric, at best_epoch
    best_epoch: int
    epochs_run: int
    run_dir: str | None = None   # where run() wrote it
    vectorized: bool = False     # trained with the config's other seeds as one stack (engine/vectorized.py)
    # One metrics dict per epoch; empty for a seed that finished before and was read back.
    history: list[dict] = field(default_factory=list, repr=False)


def has_own_loss(model: torch.nn.Module) -> bool:
    """Whether the model's class defines `loss(self, x, y, criterion)`."""
    return inspect.isfunction(getattr(type(model), "loss", None))


class LossStep(torch.nn.Module):
    """The loss of one batch, the one place it is computed: `model.loss(x, y, criterion)` when
    the model defines it, else `criterion(model(x), y)`. A module, so that DDP and
    torch.compile wrap the whole step. Returns (loss, model(x)); with the model's own loss
    the prediction costs a second forward pass, so it comes only when `prediction` asks
    (metrics need it), and is None otherwise."""

    def __init__(self, model: torch.nn.Module, criterion: Callable):
        super().__init__()
        self.model, self.criterion, self.own_loss = model, criterion, has_own_loss(model)

    def forward(self, x: Any, y: Any, prediction: bool = False) -> tuple[torch.Tensor, Any]:
        if self.own_loss:
            return self.model.loss(x, y, self.criterion), (self.model(x) if prediction else None)
        pred = self.model(x)
        return self.criterion(pred, y), pred


class Trainer:
    """Trains one model; see the module docstring. A plain class: no base, no hooks by type."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, settings: Settings, *,
                 scheduler: Any = None, criterion: Callable | None = None, device: str | None = None,
                 callbacks: list[EpochCallback] = (), on_checkpoint: Callable[[dict], None] | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.criterion = criterion if criterion is not None else torch.nn.MSELoss()
        self.settings = settings
        # By default, where the model's weights are: a notebook need not say it twice.
        self.device = device = device or next((str(p.device) for p in model.parameters()), "cpu")
        self.val_batch_size = settings.val_batch_size or settings.batch_size
        self.callbacks, self.on_checkpoint = list(callbacks), on_checkpoint
        # Under torchrun each rank trains on its share of every global batch (DDP averages
        # the gradients); without it there is no process group and nothing changes.
        self.rank, self.world = (distributed.rank(),
                                 distributed.world_size() if distributed.initialized() else 1)
        step = LossStep(model, self.criterion)
        self.ddp = None  # the DDP wrapper under torchrun (its no_sync skips all-reduces while accumulating)
        if self.world > 1:
            step = self.ddp = DistributedDataParallel(step, device_ids=[device] if device.startswith("cuda")
                                                      else None)
        self.loss_step = torch.compile(step) if settings.compile else step
        # How batches are drawn (in-memory tensors by index, anything else by DataLoader): batches.py
        self.batches = Batches(device, settings, self.rank, self.world)
        self.on_device = self.batches.on_device
        self.autocast = autocast(device, settings.precision)
        # fp16 gradients underflow without loss scaling; when disabled the scaler is a pass-through.
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=settings.precision == "fp16")
        # Where training stands. All of it goes into a checkpoint.
        self.generator = torch.Generator()   # the shuffling order
        self.epoch = 0                       # epochs finished
        self.batch = 0                       # batches finished in the current epoch (after an interrupt)
        self.epoch_order_state = None        # generator state when the current epoch drew its order
        self.loss_sum, self.loss_count = None, 0
        self.best = math.inf if settings.mode == "min" else -math.inf
        self.best_epoch, self.best_state = 0, None
        self.status = "running"
        self.history: list[dict] = []
        self.elapsed = 0.0                   # training seconds before this process took over
        self.stop_requested = False          # set by SIGINT/SIGTERM, checked between batches

    # ---- one batch, one epoch

    def train_step(self, x: Any, y: Any, micro_batches: int = 1) -> tuple[torch.Tensor, Any]:
        """Forward, loss and backward of one batch, one of `micro_batches` whose gradients the
        next optimizer step sums (so each counts 1/micro_batches). Returns the batch's loss
        and the prediction LossStep gave (None with the model's own loss)."""
        with self.autocast():
            loss, pred = self.loss_step(x, y)
        self.scaler.scale(loss if micro_batches == 1 else loss / micro_batches).backward()
        return loss, pred

    def optimizer_step(self) -> None:
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def train_epoch(self, data: Any) -> float | None:
        """The per-sample mean training loss, or None when a signal stopped it part-way."""
        self.model.train()
        if self.batch == 0:
            self.epoch_order_state = self.generator.get_state()
            # Summed on the device and read once per epoch: no host sync per step.
            self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
        else:  # resuming mid-epoch: draw the same order again, then skip what was done
            self.generator.set_state(self.epoch_order_state)
        accumulate, batch_size = self.settings.grad_accum, self.settings.batch_size
        in_epoch = self.batches.count(data, batch_size)
        for x, y in self.batches(data, batch_size, self.generator, skip=self.batch):
            micro_batches, steps = accumulation(self.batch, accumulate, in_epoch)
            # Under DDP, gradients are all-reduced only before a step, not after every batch.
            with self.ddp.no_sync() if self.ddp is not None and not steps else nullcontext():
                loss, _ = self.train_step(x, y, micro_batches)
            self.batch += 1
            if steps:
                self.optimizer_step()
            self.loss_sum += loss.detach() * len(y)  # weight by batch size: a per-sample mean
            self.loss_count += len(y)
            if self.stop_requested and steps and self.world == 1:
                return None  # stop only where no gradient is half-accumulated (under DDP: at epoch end)
        self.batch = 0
        if self.world > 1:  # one reduction per epoch: the global per-sample mean
            count = self.loss_sum.new_tensor(self.loss_count)
            total = distributed.sum_across_ranks(torch.stack([self.loss_sum, count]))
            return (total[0] / total[1]).item()
        return (self.loss_sum / self.loss_count).item()

    @torch.inference_mode()
    def evaluate(self, data: Any) -> dict[str, float]:
        """{"val_loss": ..., "val_<metric>": ...}: per-sample means over the validation data."""
        self.model.eval()
        metrics = self.settings.metrics
        totals, count = torch.zeros(1 + len(metrics), device=self.device), 0
        for x, y in self.batches(data, self.val_batch_size):
            with self.autocast():
                loss, pred = self.loss_step(x, y, bool(metrics))
                values = [loss] + [metric(pred, y) for metric in metrics.values()]
            totals += torch.stack([v.float() for v in values]) * len(y)
            count += len(y)
        if self.world > 1:  # every rank saw a share: add them up
            summed = distributed.sum_across_ranks(torch.cat([totals, totals.new_tensor([count])]))
            totals, count = summed[:-1], summed[-1]
        means = (totals / count).tolist()  # one host sync per evaluation
        return dict(zip(["val_loss", *metrics], means))


    # ---- the loop

    def train(self, train_set: Dataset, val_set: Dataset, seed: int, desc: str = "",
              resume_from: dict | None = None) -> SeedResult:
        settings = self.settings
        train_data, val_data = self.on_device(train_set), self.on_device(val_set)
        self.generator.manual_seed(seed)
        if resume_from is not None:
            self.load_state_dict(resume_from)
        started, last_saved = time.perf_counter(), time.monotonic()
        # A checkpoint of a seed that already stopped (early, or diverged) has nothing left to run.
        remaining = range(self.epoch + 1, settings.epochs + 1) if self.status == "running" else range(0)
        # Only rank 0 draws a bar. `disable` is not passed otherwise, so that tqdm's own
        # TQDM_DISABLE=1 (tqdm reads TQDM_* defaults from the environment) still hides it.
        hidden = {"disable": True} if self.rank != 0 else {}
        # leave=None: a bar stays on screen when it is the only one, and goes when it sits
        # below a search's bar over trials (which it would otherwise overwrite).
        bar = tqdm(remaining, initial=self.epoch, total=settings.epochs, desc=desc, unit="epoch",
                   dynamic_ncols=True, leave=None, **hidden)
        with stop_on_signals(self.request_stop):
            for epoch in bar:
                lr = self.optimizer.param_groups[0]["lr"]
                train_loss = self.train_epoch(train_data)
                if train_loss is None or (self.world > 1 and self.stop_agreed()):
                    self.save_checkpoint(started)  # SIGINT/SIGTERM: save exactly where we are, then stop
                    raise KeyboardInterrupt(f"stopped by a signal in epoch {epoch}; checkpoint saved")
                validation = self.evaluate(val_data)
                val_loss = validation["val_loss"]
                self.epoch = epoch
                metrics = {"epoch": epoch, "train_loss": train_loss, **validation, "lr": lr,
                           "wall_time": self.elapsed + time.perf_counter() - started}
                self.history.append(metrics)
                # refresh=False: the bar redraws on its next step anyway; no extra write per epoch
                bar.set_postfix(train_loss=f"{train_loss:.4g}", val_loss=f"{val_loss:.4g}", refresh=False)
                for callback in self.callbacks:  # metrics.csv, wandb, Optuna (may raise TrialPruned)
                    callback(epoch, metrics)
                value = metrics[settings.monitor]
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    self.status = "diverged"
                    break
                if improved(settings, self.best, value):
                    self.best, self.best_epoch = value, epoch
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                elif settings.patience is not None and epoch - self.best_epoch >= settings.patience:
                    self.status = "early_stopped"
                    break
                if self.scheduler is not None:
                    if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.scheduler.step(value)
                    else:
                        self.scheduler.step()
                if time.monotonic() - last_saved >= settings.checkpoint_every_s:
                    self.save_checkpoint(started)
                    last_saved = time.monotonic()
        bar.close()
        if self.status == "running":
            self.status = "completed"
        self.save_checkpoint(started)  # always after the last epoch
        if self.best_state is not None:  # hand back the best weights, not the last ones
            self.model.load_state_dict(self.best_state)
        return SeedResult(seed, self.status, self.best, self.best_epoch, self.epoch, history=self.history)

    # ---- checkpoints and signals

    def save_checkpoint(self, started: float) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state_dict(self.elapsed + time.perf_counter() - started))

    def state_dict(self, elapsed: float) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch": self.batch, "epoch_order_state": self.epoch_order_state,
            "loss_sum": self.loss_sum, "loss_count": self.loss_count, "generator": self.generator.get_state(),
            "best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "status": self.status, "history": self.history, "elapsed": elapsed,
            "rng": checkpoint.rng_states(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "batch", "epoch_order_state", "loss_sum", "loss_count", "best", "best_epoch",
                    "best_state", "status", "history", "elapsed"):
            setattr(self, key, state[key])
        if self.loss_sum is not None:  # checkpoints load on the CPU; the epoch's running sum lives here
            self.loss_sum = self.loss_sum.to(self.device)
        self.generator.set_state(state["generator"])
        checkpoint.set_rng_states(state["rng"])
        if self.status == "completed" and self.epoch < self.settings.epochs:
            self.status = "running"  # `epochs` was raised: train longer

    def stop_agreed(self) -> bool:
        """Under DDP ranks stop together: any rank's signal stops all, at an epoch's end."""
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return distributed.sum_across_ranks(flag).item() > 0

    def request_stop(self) -> None:
        self.stop_requested = True


def autocast(device: str, precision: str) -> Callable[[], Any]:
    """The context each step's forward runs in. A disabled torch.autocast still costs ~3.5 µs
    to enter and leave, every step: fp32 runs use no context at all."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return (lambda: torch.autocast(torch.device(device).type, dtype)) if dtype is not None else nullcontext


def accumulation(batch: int, accumulate: int, in_epoch: int) -> tuple[int, bool]:
    """(micro_batches, steps) for batch number `batch` of an epoch of `in_epoch` batches: the
    optimizer step it counts towards sums `micro_batches` of them (grad_accum, or fewer for the
    epoch's last, shorter accumulation; each counts 1/micro_batches), and whether it steps."""
    first = batch - batch % accumulate
    micro_batches = min(accumulate, in_epoch - first)
    return micro_batches, batch + 1 == first + micro_batches


def improved(settings: Settings, best: float, value: float) -> bool:
    """Whether `value` beats `best` by more than min_delta, in the direction of `mode`."""
    return value < best - settings.min_delta if settings.mode == "min" else value > best + settings.min_delta


@contextmanager
def stop_on_signals(request_stop: Callable[[], None]):
    """SIGINT/SIGTERM call `request_stop` (handlers must do nothing heavy): the loop then
    stops after the current step, saves a checkpoint and raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Also any signal set to raise KeyboardInterrupt, as Ctrl-C does (a Slurm job's warning signal)
    stops = {signal.SIGINT, signal.SIGTERM, *(s for s in signal.valid_signals()
                                              if signal.getsignal(s) is signal.default_int_handler)}
    previous = {s: signal.signal(s, lambda signum, frame: request_stop()) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
