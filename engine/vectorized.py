"""Many seeds as one model: a config's seeds train at once, their weights stacked along a new
first dimension and the one loss step (trainer.LossStep) mapped over it with torch.func.vmap.
On a small model a step is mostly per-call overhead, so five seeds cost little more than one.

    reason = why_not(config, settings, world, train_set, val_set)  # None: they can train together
    stack = SeedStack(models, config, settings, device, seeds, callbacks, on_checkpoint)
    results = stack.train(train_set, val_set, states, desc)

Per seed, everything is as on the sequential path (engine/trainer.py): its own initialisation,
data order (its own generator) and dropout draws; its own early stopping, best weights,
NaN/inf detection and gradient-norm clipping; and checkpoints in the Trainer's own format,
so that a run resumes on either path. The seeds share one optimizer over the stacked tensors,
which is exact for optimizers that update each weight on its own (ELEMENTWISE), and one
learning rate (a ReduceLROnPlateau, which needs one per seed, trains seeds one by one).

A seed that stops (early, or diverged) stays in the stack until the run ends: its slice goes
on computing, but nothing of it is read again, and no slice ever mixes with another (vmap
maps each seed's computation on its own slice).
"""
from __future__ import annotations

import copy
import math
import time
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import TensorDataset
from tqdm import tqdm

from engine import checkpoint
from engine.settings import Settings
from engine.batches import Batches, epoch_order
from engine.trainer import (EpochCallback, LossStep, SeedResult, accumulation, autocast, improved,
                            stop_on_signals)

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig

# Optimizers whose update of a weight reads only that weight's own gradient and state: on
# stacked tensors they do for every seed exactly what they do for one.
ELEMENTWISE = {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
               torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam}


# On a CPU, a step whose batch_size x weights reaches this is arithmetic, not per-call overhead,
# and batched matrix products are slower than plain ones: seeds then train one by one. Where the
# figure comes from: README "Seeds together" (bench/seeds.py).
CPU_BUSY = 2 ** 24


def why_not(config: RunConfig, settings: Settings, device: str, world: int, train_set: Any,
            val_set: Any) -> str | None:
    """Why the seeds of `config` cannot train as one stack, or None. Decided once, before
    training: from the settings, then by a one-batch trial of the real step on two seeds."""
    from engine.resolve import resolve_key
    if world > 1:
        return "under DDP (torchrun, or srun tasks) every rank trains the seeds one after another"
    if settings.compile:
        return "trainer.compile compiles one model's step"
    if settings.precision == "fp16":
        return "fp16's gradient scaler would skip a step for every seed when one overflows"
    if config.scheduler and issubclass(resolve_key(config, "scheduler"),
                                       torch.optim.lr_scheduler.ReduceLROnPlateau):
        return "ReduceLROnPlateau needs a learning rate per seed"
    if resolve_key(config, "optimizer") not in ELEMENTWISE:
        return f"{config.optimizer} is not known to update each weight on its own"
    if not (isinstance(train_set, TensorDataset) and isinstance(val_set, TensorDataset)):
        return "the data is not in-memory tensors (a TensorDataset)"
    models = [config.create_model(device) for _ in range(2)]
    if any(getattr(m, "track_running_stats", False) for m in models[0].modules()):
        return "the model keeps running statistics while training (BatchNorm)"
    work = settings.batch_size * sum(p.numel() for p in models[0].parameters())
    if torch.device(device).type == "cpu" and work >= CPU_BUSY:
        return (f"each seed's step keeps the CPU busy on its own (batch_size x weights = {work:.2g} "
                f">= {CPU_BUSY:.2g}), where a stack only adds the cost of batched matrix products")
    stack = SeedStack(models, config, settings, device, [0, 1])
    before = [b.clone() for b in stack.buffers.values()]
    data = tuple(t[:settings.batch_size].to(device) for t in train_set.tensors)
    try:
        stack.train_epoch(data)
        stack.evaluate(data)
    except Exception as e:  # data-dependent Python control flow, .item() in the model, ...
        first_line = (str(e).splitlines() or [""])[0]
        return f"the model's step cannot be mapped over seeds: {type(e).__name__}: {first_line}"
    if any(not torch.equal(b, a) for b, a in zip(before, stack.buffers.values())):
        return "the model updates its buffers while training"
    return None


@dataclass
class _Seed:
    """Where one seed of the stack stands; the shared position (epoch, batch) is the stack's."""
    seed: int
    callbacks: list[EpochCallback]
    on_checkpoint: Callable[[dict], None] | None
    generator: torch.Generator = field(default_factory=torch.Generator)
    epoch_order_state: torch.Tensor | None = None
    best: float = math.nan
    best_epoch: int = 0
    best_state: dict | None = None
    status: str = "running"
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0
    result: SeedResult | None = None  # once it stopped


class SeedStack:
    """Trains `models` (one per seed, each built after seeding with its seed) as one stack."""

    def __init__(self, models: list[torch.nn.Module], config: RunConfig, settings: Settings, device: str,
                 seeds: list[int], callbacks: list[list[EpochCallback]] | None = None,
                 on_checkpoint: list[Callable[[dict], None]] | None = None,
                 on_done: Callable[[int, SeedResult, dict], None] | None = None):
        self.settings, self.device = settings, device
        self.state_keys = list(models[0].state_dict())
        params, buffers = stack_module_state([m.to(device) for m in models])
        self.params = {f"model.{k}": v for k, v in params.items()}  # named as inside LossStep
        self.buffers = {f"model.{k}": v for k, v in buffers.items()}
        # create_optimizer reads model.parameters() only: here, the stacked tensors.
        weights = types.SimpleNamespace(parameters=lambda: self.params.values())
        self.optimizer = config.create_optimizer(weights)
        self.scheduler = config.create_scheduler(self.optimizer)
        # The model's structure, without weights of its own: the stack's are passed in each call.
        self.step = LossStep(copy.deepcopy(models[0]).to("meta"), config.create_criterion())
        metrics = settings.metrics

        def seed_loss(params: dict, buffers: dict, x: Any, y: Any) -> torch.Tensor:
            return functional_call(self.step, (params, buffers), (x, y))[0]

        def seed_validation(params: dict, buffers: dict, x: Any, y: Any) -> list[torch.Tensor]:
            loss, pred = functional_call(self.step, (params, buffers), (x, y, bool(metrics)))
            return [loss, *(metric(pred, y) for metric in metrics.values())]

        # randomness="different": every seed draws its own dropout masks.
        self.losses = vmap(seed_loss, randomness="different")
        self.validation = vmap(seed_validation, in_dims=(0, 0, None, None), randomness="different")
        self.autocast = autocast(device, settings.precision)
        self.batches = Batches(device, settings)  # validation batches, in order, as the Trainer's
        self.seeds = [_Seed(seed, callbacks[i] if callbacks else [],
                            on_checkpoint[i] if on_checkpoint else None) for i, seed in enumerate(seeds)]
        self.on_done = on_done  # (index, result, the weights for model.pt) as each seed stops
        self.epoch, self.batch, self.loss_sums, self.loss_count = 0, 0, None, 0
        self.stop_requested = False

    # ---- one batch, one epoch

    def train_epoch(self, data: tuple) -> list[float] | None:
        """Each seed's per-sample mean training loss, or None when a signal stopped it part-way."""
        self.step.train()
        if self.batch == 0:
            for s in self.seeds:
                s.epoch_order_state = s.generator.get_state()
            self.loss_sums, self.loss_count = torch.zeros(len(self.seeds), device=self.device), 0
        else:  # resuming mid-epoch: draw the same orders again, then skip what was done
            for s in self.seeds:
                s.generator.set_state(s.epoch_order_state)
        n, batch_size, accumulate = len(data[0]), self.settings.batch_size, self.settings.grad_accum
        # Each seed's order, drawn as it is drawn for one seed alone: the same batches.
        orders = torch.stack([epoch_order(n, s.generator, self.device) for s in self.seeds])
        in_epoch = self.batches.count(data, batch_size)
        for start in range(self.batch * batch_size, n, batch_size):
            index = orders[:, start:start + batch_size]
            x, y = (t[index] for t in data)  # (seeds, batch, ...)
            micro_batches, steps = accumulation(self.batch, accumulate, in_epoch)
            with self.autocast():
                losses = self.losses(self.params, self.buffers, x, y)
            # Seeds share no weight: the sum's gradient in each slice is that seed's own.
            (losses.sum() if micro_batches == 1 else losses.sum() / micro_batches).backward()
            self.batch += 1
            if steps:
                self.optimizer_step()
            self.loss_sums += losses.detach() * index.shape[1]
            self.loss_count += index.shape[1]
            if self.stop_requested and steps:
                return None
        self.batch = 0
        return (self.loss_sums / self.loss_count).tolist()

    def optimizer_step(self) -> None:
        if self.settings.grad_clip is not None:  # a norm per seed, as clip_grad_norm_ takes one per model
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
            scale = (self.settings.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def evaluate(self, data: tuple) -> list[dict[str, float]]:
        """Per seed, {"val_loss": ..., "val_<metric>": ...}: per-sample means, as Trainer.evaluate."""
        self.step.eval()
        totals, count = None, 0
        for x, y in self.batches(data, self.settings.val_batch_size or self.settings.batch_size):
            with self.autocast():
                values = self.validation(self.params, self.buffers, x, y)
            batch = torch.stack([v.float() for v in values], dim=1) * len(y)  # (seeds, 1 + metrics)
            totals = batch if totals is None else totals + batch
            count += len(y)
        names = ["val_loss", *self.settings.metrics]
        return [dict(zip(names, row)) for row in (totals / count).tolist()]  # one host sync

    # ---- the loop

    def train(self, train_set: TensorDataset, val_set: TensorDataset, states: list[dict | None],
              desc: str = "") -> list[SeedResult]:
        """Each seed's result; `on_done` gets it as the seed stops, with its best weights."""
        settings = self.settings
        train_data, val_data = (tuple(t.to(self.device) for t in d.tensors) for d in (train_set, val_set))
        for s in self.seeds:
            s.generator.manual_seed(s.seed)
            s.best = math.inf if settings.mode == "min" else -math.inf
        if states[0] is not None:
            self.load_states(states)
        started, last_saved = time.perf_counter(), time.monotonic()
        bar = tqdm(range(self.epoch + 1, settings.epochs + 1), initial=self.epoch, total=settings.epochs,
                   desc=desc, unit="epoch", dynamic_ncols=True)
        with stop_on_signals(self.request_stop):
            for epoch in bar:
                lr = self.optimizer.param_groups[0]["lr"]
                train_losses = self.train_epoch(train_data)
                if train_losses is None:  # SIGINT/SIGTERM: save exactly where we are, then stop
                    self.save_checkpoints(started)
                    raise KeyboardInterrupt(f"stopped by a signal in epoch {epoch}; checkpoints saved")
                validations = self.evaluate(val_data)
                self.epoch = epoch
                for k, s in enumerate(self.seeds):
                    if s.status == "running":
                        self.end_epoch(k, s, train_losses[k], validations[k], lr, started)
                running = [s for s in self.seeds if s.status == "running"]
                if not running:
                    break
                bar.set_postfix(running=f"{len(running)}/{len(self.seeds)}", refresh=False)
                if self.scheduler is not None:
                    self.scheduler.step()
                if time.monotonic() - last_saved >= settings.checkpoint_every_s:
                    self.save_checkpoints(started)
                    last_saved = time.monotonic()
        bar.close()
        for k, s in enumerate(self.seeds):
            if s.status == "running":
                s.status = "completed"
                self.finish_seed(k, s, started)
        return [s.result for s in self.seeds]

    def end_epoch(self, k: int, s: _Seed, train_loss: float, validation: dict, lr: float,
                  started: float) -> None:
        """One seed's end of an epoch, in the Trainer's order: callbacks, NaN/inf, best, patience."""
        metrics = {"epoch": self.epoch, "train_loss": train_loss, **validation, "lr": lr,
                   "wall_time": s.elapsed + time.perf_counter() - started}
        s.history.append(metrics)
        for callback in s.callbacks:  # metrics.csv, wandb, Optuna (may raise TrialPruned)
            callback(self.epoch, metrics)
        value = metrics[self.settings.monitor]
        if not (math.isfinite(train_loss) and math.isfinite(validation["val_loss"])):
            s.status = "diverged"
        elif improved(self.settings, s.best, value):
            s.best, s.best_epoch, s.best_state = value, self.epoch, self.seed_weights(k)
        elif self.settings.patience is not None and self.epoch - s.best_epoch >= self.settings.patience:
            s.status = "early_stopped"
        if s.status != "running":
            self.finish_seed(k, s, started)

    def finish_seed(self, k: int, s: _Seed, started: float) -> None:
        """A seed stops: its last checkpoint, and its result with the weights for model.pt."""
        self.save_checkpoint(k, started)
        s.result = SeedResult(s.seed, s.status, s.best, s.best_epoch, self.epoch, history=s.history,
                              vectorized=True)
        if self.on_done is not None:
            self.on_done(k, s.result, s.best_state if s.best_state is not None else self.seed_weights(k))

    def request_stop(self) -> None:
        self.stop_requested = True

    # ---- per-seed checkpoints, in the Trainer's format

    def seed_weights(self, k: int) -> dict:
        stacked = {**self.params, **self.buffers}
        return {key: stacked[f"model.{key}"][k].detach().clone() for key in self.state_keys}

    def seed_optimizer_state(self, k: int) -> dict:
        full, shapes = self.optimizer.state_dict(), [p.shape for p in self.params.values()]
        return {"state": {i: {key: (v[k].clone() if torch.is_tensor(v) and v.shape == shapes[i] else v)
                              for key, v in entry.items()} for i, entry in full["state"].items()},
                "param_groups": full["param_groups"]}

    def save_checkpoints(self, started: float) -> None:
        for k, s in enumerate(self.seeds):
            if s.status == "running":
                self.save_checkpoint(k, started)

    def save_checkpoint(self, k: int, started: float) -> None:
        s = self.seeds[k]
        if s.on_checkpoint is None:
            return
        s.on_checkpoint({
            "model": self.seed_weights(k), "optimizer": self.seed_optimizer_state(k),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": {},  # fp16, the one precision with a scaler, trains seeds one by one
            "epoch": self.epoch, "batch": self.batch, "epoch_order_state": s.epoch_order_state,
            "loss_sum": self.loss_sums[k].clone() if self.loss_sums is not None else None,
            "loss_count": self.loss_count, "generator": s.generator.get_state(),
            "best": s.best, "best_epoch": s.best_epoch, "best_state": s.best_state, "status": s.status,
            "history": s.history, "elapsed": s.elapsed + time.perf_counter() - started,
            "rng": checkpoint.rng_states(),
        })

    def load_states(self, states: list[dict]) -> None:
        """Continue from one checkpoint per seed, all at the same position (run.py checks it)."""
        shapes = [p.shape[1:] for p in self.params.values()]
        with torch.no_grad():
            for name, stacked in {**self.params, **self.buffers}.items():
                stacked.copy_(torch.stack([st["model"][name.removeprefix("model.")] for st in states]))
        optimizer = {"param_groups": states[0]["optimizer"]["param_groups"], "state": {
            i: {key: (torch.stack([st["optimizer"]["state"][i][key] for st in states])
                      if torch.is_tensor(v) and v.shape == shapes[i] else v) for key, v in entry.items()}
            for i, entry in states[0]["optimizer"]["state"].items()}}
        self.optimizer.load_state_dict(optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(states[0]["scheduler"])
        self.epoch, self.batch, self.loss_count = (states[0][k] for k in ("epoch", "batch", "loss_count"))
        if self.batch:
            self.loss_sums = torch.stack([st["loss_sum"] for st in states]).to(self.device)
        for s, st in zip(self.seeds, states):
            for key in ("epoch_order_state", "best", "best_epoch", "best_state", "status", "history",
                        "elapsed"):
                setattr(s, key, st[key])
            s.generator.set_state(st["generator"])
            if s.status == "completed" and self.epoch < self.settings.epochs:
                s.status = "running"  # `epochs` was raised: train longer
        checkpoint.set_rng_states(states[0]["rng"])
