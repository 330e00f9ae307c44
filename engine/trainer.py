"""The training loop, one for one model and for a stack of seeds, read top to bottom.

    settings = Settings(epochs=20, batch_size=64)        # engine.settings; or run_config.trainer_settings()
    trainer = Trainer(model, optimizer, settings, criterion=torch.nn.MSELoss())  # on the model's device
    result = trainer.train(train_set, val_set, seed=42)  # a SeedResult: status, best value, history

Per batch: the loss (engine/contract.py), backward, one optimizer step (`Trainer.optimizer_step`).
Per epoch: validate, callbacks (metrics.csv, wandb, Optuna), best weights, early stopping, NaN/inf,
the scheduler, and a checkpoint at most every `checkpoint_every_s` seconds (and as a seed stops, and
on SIGINT/SIGTERM), from which a resume continues bit for bit. The loop trains K >= 1 seeds: one
model (`OneModel`, a stack of one) or a stack (`SeedStack`, engine/vectorized.py). Only these step
objects differ: how a batch's losses are computed, and one seed's weights and optimizer state.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from engine import checkpoint, distributed
from engine.batches import Batches, accumulation
from engine.contract import LossStep, has_own_loss, loss_and_metrics
from engine.settings import Settings, improved
from engine.stopping import StopRequest

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


# Where a seed stands, as its checkpoint holds it (with its weights, optimizer state and position).
SEED_KEYS = ("epoch_order_state", "best", "best_epoch", "best_state", "status", "history", "elapsed")


@dataclass
class _Seed:
    seed: int
    callbacks: list[EpochCallback]
    on_checkpoint: Callable[[dict], None] | None
    generator: torch.Generator = field(default_factory=torch.Generator)  # its data order
    epoch_order_state: torch.Tensor | None = None  # the generator when this epoch drew its order
    best: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None  # on the CPU: K seeds' best weights must not fill an accelerator
    status: str = "running"
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0            # training seconds before this process took over
    result: SeedResult | None = None  # once it stopped


class Trainer:
    """Trains `model` (an nn.Module), or the K seeds of a SeedStack (engine/vectorized.py), whose
    `callbacks` and `on_checkpoint` are then per seed (K lists, K callables). A plain class."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer | None, settings: Settings, *,
                 scheduler: Any = None, criterion: Callable | None = None, device: str | None = None,
                 callbacks: list = (), on_checkpoint: Any = None):
        self.stacked = not isinstance(model, torch.nn.Module)
        self.optimizer, self.scheduler, self.settings = optimizer, scheduler, settings
        # Under torchrun each rank trains on its share of every global batch (DDP averages gradients).
        self.rank = distributed.rank()
        self.world = distributed.world_size() if distributed.initialized() else 1
        self.models = model if self.stacked else OneModel(  # one model trains where its weights are
            model, criterion if criterion is not None else torch.nn.MSELoss(), settings,
            device or next((str(p.device) for p in model.parameters()), "cpu"), self.world)
        self.device, self.loss_step = self.models.device, self.models.step  # (under DDP/compile, wrapped)
        self.hooks = list(zip(callbacks, on_checkpoint)) if self.stacked else [(callbacks, on_checkpoint)]
        # How batches are drawn (in-memory tensors by index, anything else by DataLoader): batches.py
        self.batches = Batches(self.device, settings, self.rank, self.world)
        self.on_device, self.autocast = self.batches.on_device, autocast(self.device, settings.precision)
        # fp16 gradients underflow without loss scaling; when disabled the scaler is a pass-through.
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0], enabled=settings.precision == "fp16")
        self.epoch, self.batch = 0, 0              # epochs finished; batches of the current one
        self.loss_sums, self.loss_count = None, 0  # the epoch's training loss so far, per seed
        self.started, self.on_done = 0.0, None     # when this process began training; train()'s on_done
        self.stop = StopRequest()                  # SIGINT/SIGTERM: checked between batches
        self.start()

    # ---- one batch, one epoch

    def train_step(self, x: Any, y: Any, micro_batches: int = 1) -> torch.Tensor:
        """Forward, loss and backward of one batch, one of `micro_batches` whose gradients the next
        optimizer step sums (so each counts 1/micro_batches). Returns each seed's loss."""
        with self.autocast():
            losses = self.models(x, y)
        # Seeds share no weight: each seed's loss sends its gradient to its own weights only.
        self.scaler.scale(losses).backward(torch.full_like(losses, 1 / micro_batches))
        return losses

    def optimizer_step(self) -> None:
        """One optimizer step, for every seed: clip each seed's gradient norm, step, clear."""
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
            self.models.clip_gradients(self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def train_epoch(self, data: Any) -> list[float] | None:
        """Each seed's per-sample mean training loss, or None when a signal stopped it part-way."""
        self.models.step.train()
        for s in self.seeds:  # a resumed epoch draws the same orders again, then skips what was done
            if self.batch == 0:
                s.epoch_order_state = s.generator.get_state()
            s.generator.set_state(s.epoch_order_state)
        if self.batch == 0:  # summed on the device and read once per epoch: no host sync per step
            self.loss_sums, self.loss_count = torch.zeros(len(self.seeds), device=self.device), 0
        in_epoch = self.batches.count(data, self.settings.batch_size)
        generators, steps_taken = [s.generator for s in self.seeds], 0  # a stack's: (seeds, batch, ...)
        for x, y in self.batches(data, self.settings.batch_size,
                                 generators if self.stacked else generators[0], skip=self.batch):
            samples = y.shape[1] if self.stacked else len(y)
            micro_batches, steps = accumulation(self.batch, self.settings.grad_accum, in_epoch)
            ddp = self.models.ddp  # under DDP, gradients are all-reduced only before a step
            with ddp.no_sync() if ddp is not None and not steps else nullcontext():
                losses = self.train_step(x, y, micro_batches)
            self.batch += 1
            if steps:
                self.optimizer_step()
                steps_taken += 1
            self.loss_sums += losses.detach() * samples  # weight by batch size: a per-sample mean
            self.loss_count += samples
            if steps and self.stop.now(steps_taken, self.world, self.device):
                self.loss_sums, self.loss_count = self.global_sums()  # rank 0's checkpoint holds all ranks'
                return None  # stopped where no gradient is half-accumulated
        self.batch = 0
        sums, count = self.global_sums()
        return (sums / count).tolist()

    def global_sums(self) -> tuple[torch.Tensor, int]:
        """The epoch's training loss sums (per seed) and samples so far, over all ranks under DDP."""
        if self.world == 1:
            return self.loss_sums, self.loss_count
        count = self.loss_sums.new_tensor([self.loss_count])
        summed = distributed.sum_across_ranks(torch.cat([self.loss_sums, count]))
        return summed[:-1], int(summed[-1].item())

    def validate(self, data: Any) -> list[dict[str, float]]:
        """Per seed, {"val_loss": ..., "val_<metric>": ...}: per-sample means over the validation data.
        With the model's own loss, gradients stay available (an input-gradient residual needs them)."""
        self.models.step.eval()
        totals, count = 0, 0
        for x, y in self.batches(data, self.settings.val_batch_size or self.settings.batch_size):
            with torch.enable_grad() if self.models.own_loss else torch.inference_mode(), self.autocast():
                totals = totals + self.models.validate(x, y).detach() * len(y)  # (seeds, 1 + metrics)
            count += len(y)
        # Under DDP every rank saw a share: add them up.
        summed = distributed.sum_across_ranks(torch.cat([totals.flatten(), totals.new_tensor([count])]))
        names = ["val_loss", *self.settings.metrics]
        return [dict(zip(names, row)) for row in (summed[:-1] / summed[-1]).view_as(totals).tolist()]

    def evaluate(self, data: Any) -> dict[str, float]:
        """validate() for one model: its dict."""
        return self.validate(data)[0]

    # ---- the loop

    def start(self, seed: int | None = None, resume_from: Any = None) -> None:
        """Each seed's state: fresh, or from `resume_from`, a checkpoint (a stack: one per seed)."""
        worst = math.inf if self.settings.mode == "min" else -math.inf
        seeds = self.models.seeds if self.stacked else [seed]
        # self.seeds: those in the stack, in its order; a seed that stops leaves it (stopped()).
        self.seeds = self.all = [_Seed(n, list(c), o, torch.Generator().manual_seed(n or 0), best=worst)
                                 for n, (c, o) in zip(seeds, self.hooks)]
        states = resume_from if self.stacked else [resume_from]
        if states is not None and states[0] is not None:
            self.load_state_dicts(states)

    def train(self, train_set: Dataset, val_set: Dataset, seed: int | None = None, desc: str = "",
              resume_from: Any = None, on_done: Callable | None = None) -> SeedResult | list[SeedResult]:
        """Train to `epochs`. `seed` orders one model's data (a stack's seeds are its own);
        on_done(k, result, best weights) is called as seed k stops."""
        settings = self.settings
        train_data, val_data = self.on_device(train_set), self.on_device(val_set)
        self.start(seed, resume_from)
        self.started, self.on_done, last_saved = time.perf_counter(), on_done, time.monotonic()
        self.stopped()  # seeds whose checkpoints say they stopped
        # Only rank 0 draws a bar; `disable` is passed only then, so that TQDM_DISABLE=1 still works.
        # leave=None: a bar goes when it sits below a search's bar over trials (it would overwrite it).
        bar = tqdm(range(self.epoch + 1, settings.epochs + 1) if self.seeds else (), initial=self.epoch,
                   total=settings.epochs, desc=desc, unit="epoch", dynamic_ncols=True, leave=None,
                   **({"disable": True} if self.rank != 0 else {}))
        with self.stop.on_signals():
            for epoch in bar:
                lr = self.optimizer.param_groups[0]["lr"]
                train_losses = self.train_epoch(train_data)
                if train_losses is None or (self.world > 1 and self.stop.agreed(self.device)):
                    self.save_running()  # SIGINT/SIGTERM: save exactly where we are, then stop
                    raise KeyboardInterrupt(f"stopped by a signal in epoch {epoch}; checkpoint saved")
                validations = self.validate(val_data)
                self.epoch = epoch
                for slot, (loss, validation) in enumerate(zip(train_losses, validations)):
                    self.end_epoch(slot, loss, validation, lr)
                if any(s.status != "running" for s in self.seeds):  # the others' checkpoints first: a
                    last_saved = self.save_running()                # resume finds them all at this epoch
                    self.stopped()
                if not self.seeds:
                    break
                bar.set_postfix_str(f"{len(self.seeds)}/{len(self.all)} running" if self.stacked else
                                    f"val_loss={validations[0]['val_loss']:.4g}", refresh=False)
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(self.seeds[0].history[-1][settings.monitor])  # one model only
                elif self.scheduler is not None:
                    self.scheduler.step()
                if time.monotonic() - last_saved >= settings.checkpoint_every_s:
                    last_saved = self.save_running()
        bar.close()
        for s in self.seeds:
            s.status = "completed"
        self.stopped()
        if not self.stacked and self.all[0].best_state is not None:  # the best weights, not the last
            self.models.load_weights(0, self.all[0].best_state)
        return [s.result for s in self.all] if self.stacked else self.all[0].result

    def end_epoch(self, slot: int, train_loss: float, validation: dict, lr: float) -> None:
        """One seed's end of an epoch: its callbacks, then NaN/inf, best weights, patience."""
        s, settings = self.seeds[slot], self.settings
        metrics = {"epoch": self.epoch, "train_loss": train_loss, **validation, "lr": lr,
                   "wall_time": s.elapsed + time.perf_counter() - self.started}
        s.history.append(metrics)
        for callback in s.callbacks:  # metrics.csv, wandb, Optuna (may raise TrialPruned)
            callback(self.epoch, metrics)
        if not (math.isfinite(train_loss) and math.isfinite(validation["val_loss"])):
            s.status = "diverged"
        elif improved(settings, s.best, metrics[settings.monitor]):
            s.best, s.best_epoch = metrics[settings.monitor], self.epoch
            s.best_state = {n: v.detach().to("cpu", copy=True) for n, v in self.models.weights(slot).items()}
        elif settings.patience is not None and self.epoch - s.best_epoch >= settings.patience:
            s.status = "early_stopped"

    def stopped(self) -> None:
        """Seeds that stopped: each one's last checkpoint, result, and on_done with its best weights.
        Then they leave the stack, so its size, and so each step's random draws (dropout), depend
        only on the seeds still training: a resume, which stacks just those, draws the same."""
        for slot, s in enumerate(self.seeds):
            if s.status != "running":
                self.save_checkpoint(slot)
                s.result = SeedResult(s.seed, s.status, s.best, s.best_epoch, self.epoch, history=s.history,
                                      vectorized=self.stacked)
                if self.on_done is not None:
                    self.on_done(self.all.index(s), s.result,
                                 s.best_state if s.best_state is not None else self.models.weights(slot))
        kept = [slot for slot, s in enumerate(self.seeds) if s.status == "running"]
        if self.stacked and 0 < len(kept) < len(self.seeds):
            self.models.keep(kept)
            self.loss_sums = self.loss_sums[kept] if self.loss_sums is not None else None
        self.seeds = [self.seeds[slot] for slot in kept]

    # ---- checkpoints: one per seed, one format for both step objects

    def save_running(self) -> float:
        """A checkpoint of every seed still training; returns when (time.monotonic)."""
        for slot, s in enumerate(self.seeds):
            if s.status == "running":
                self.save_checkpoint(slot)
        return time.monotonic()

    def save_checkpoint(self, slot: int) -> None:
        s = self.seeds[slot]
        if s.on_checkpoint is not None:
            s.on_checkpoint({
                **{key: getattr(s, key) for key in SEED_KEYS}, "model": self.models.weights(slot),
                "optimizer": self.models.optimizer_state(self.optimizer.state_dict(), slot),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch,
                "loss_sum": self.loss_sums[slot].clone() if self.loss_sums is not None else None,
                "loss_count": self.loss_count, "generator": s.generator.get_state(),
                "elapsed": s.elapsed + time.perf_counter() - self.started, "rng": checkpoint.rng_states()})

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from one checkpoint per seed, all at one position (run.py checks it)."""
        for k, (s, state) in enumerate(zip(self.seeds, states)):
            self.models.load_weights(k, state["model"])
            for key in SEED_KEYS:
                setattr(s, key, state[key])
            s.generator.set_state(state["generator"])
            if s.status == "completed" and state["epoch"] < self.settings.epochs:
                s.status = "running"  # `epochs` was raised: train longer
        self.optimizer.load_state_dict(self.models.stacked_optimizer_state([s["optimizer"] for s in states]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(states[0]["scheduler"])
        self.scaler.load_state_dict(states[0]["scaler"])
        self.epoch, self.batch, self.loss_count = (states[0][key] for key in ("epoch", "batch", "loss_count"))
        if self.batch:  # checkpoints load on the CPU; the epoch's running sums live on the device
            self.loss_sums = torch.stack([st["loss_sum"] for st in states]).to(self.device)
            if self.rank != 0:  # under DDP rank 0 carries on the sums of every rank so far
                self.loss_sums, self.loss_count = torch.zeros_like(self.loss_sums), 0
        checkpoint.set_rng_states(states[0]["rng"])


class OneModel:
    """One model as the loop's step object (a stack of one; SeedStack is the other). Seed 0's
    weights and optimizer state are the model's and the optimizer's own."""

    def __init__(self, model: torch.nn.Module, criterion: Callable, settings: Settings, device: str,
                 world: int):
        self.model, self.device, self.metrics = model, device, settings.metrics
        self.own_loss = has_own_loss(model)
        step = LossStep(model, criterion)
        if world > 1:  # DDP wraps the whole step; its no_sync skips all-reduces while accumulating
            step = DistributedDataParallel(step, device_ids=[device] if device.startswith("cuda") else None)
        self.ddp = step if world > 1 else None
        self.step = torch.compile(step) if settings.compile else step

    def __call__(self, x: Any, y: Any) -> torch.Tensor:
        return self.step(x, y)[0]

    def validate(self, x: Any, y: Any) -> torch.Tensor:
        return loss_and_metrics(self.step, x, y, self.metrics)[None]

    def clip_gradients(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def weights(self, k: int) -> dict:
        return self.model.state_dict()

    def load_weights(self, k: int, weights: dict) -> None:
        self.model.load_state_dict(weights)

    def optimizer_state(self, full: dict, k: int) -> dict:
        return full

    def stacked_optimizer_state(self, states: list[dict]) -> dict:
        return states[0]


def autocast(device: str, precision: str) -> Callable[[], Any]:
    """The context a step's forward runs in; for fp32 none (a disabled one costs ~3.5 µs a step)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.split(":")[0], dtype)) if dtype is not None else nullcontext
