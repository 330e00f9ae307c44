"""Many seeds as one model: their weights stacked along a new first dimension, and the one loss
step (engine/contract.py) mapped over it with torch.func.vmap. On a small model a step is
mostly per-call overhead, so five seeds cost little more than one.

    reasons = why_not(config, settings, device, world, train_set, val_set)  # []: they can
    stack = SeedStack(models, config, settings, device, seeds)
    trainer = Trainer(stack, stack.optimizer, settings, scheduler=stack.scheduler, ...)

SeedStack is the step object the loop (engine/trainer.py) drives for K seeds; each keeps its
own initialisation, data order, dropout draws and gradient-norm clipping. The seeds share one
optimizer over the stacked tensors, exact for optimizers that update each weight on its own
(ELEMENTWISE), and one learning rate. A seed that stops leaves the stack; vmap never mixes one
seed's slice with another's.
"""
from __future__ import annotations

import copy
import types
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import TensorDataset

from engine.contract import LossStep, loss_and_metrics
from engine.errors import first_line
from engine.settings import Settings
from engine.trainer import Trainer

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig

# Optimizers whose update of a weight reads only that weight's own gradient and state: on
# stacked tensors they do for every seed exactly what they do for one.
ELEMENTWISE = {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
               torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam}

# On a CPU, a step whose batch_size x weights reaches this is arithmetic, not per-call overhead,
# and batched matrix products are slower than plain ones (docs/speed.md, bench/seeds.py).
CPU_BUSY = 2 ** 24


def why_not(config: RunConfig, settings: Settings, device: str, world: int, train_set: Any,
            val_set: Any, models: list[torch.nn.Module]) -> list[str]:
    """Every reason the seeds of `config` cannot train as one stack; none: they can. Decided
    before training, from the settings, and by a one-batch trial of the real step on a stack of
    `models` (the seeds' own: the stack copies their weights, and leaves them as they are)."""
    from engine.resolve import resolve_key
    scheduler = resolve_key(config, "scheduler") if config.scheduler else None
    tensors = isinstance(train_set, TensorDataset) and isinstance(val_set, TensorDataset)
    work = settings.batch_size * sum(p.numel() for p in models[0].parameters())
    batchnorm = any(getattr(m, "track_running_stats", False) for m in models[0].modules())
    reasons = [reason for applies, reason in [
        (world > 1, "under DDP (torchrun, or srun tasks) every rank trains the seeds one after another"),
        (settings.compile, "trainer.compile compiles one model's step"),
        (settings.precision == "fp16",
         "fp16's gradient scaler would skip a step for every seed when one overflows"),
        (scheduler is not None and issubclass(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
         "ReduceLROnPlateau needs a learning rate per seed"),
        (resolve_key(config, "optimizer") not in ELEMENTWISE,
         f"{config.optimizer} is not known to update each weight on its own"),
        (not tensors, "the data is not in-memory tensors (a TensorDataset)"),
        (batchnorm, "the model keeps running statistics while training (BatchNorm)"),
        (torch.device(device).type == "cpu" and work >= CPU_BUSY,
         f"each seed's step keeps the CPU busy on its own (batch_size x weights = {work:.2g} >= "
         f"{CPU_BUSY:.2g}), where a stack only adds the cost of batched matrix products")] if applies]
    return reasons + (trial(config, settings, device, train_set, models) if world == 1 and tensors
                      and not batchnorm else [])


def trial(config: RunConfig, settings: Settings, device: str, train_set: Any, models: list) -> list[str]:
    """Why one batch of the real step, and its validation, fail on a stack of `models`; [] if they run."""
    try:
        stack = SeedStack(models, config, settings, device, list(range(len(models))))
    except Exception as e:  # a create_optimizer that reads more of the model than parameters(), ...
        return [f"the optimizer cannot be built over the stacked weights: {first_line(e)}"]
    trainer = Trainer(stack, stack.optimizer, settings, scheduler=stack.scheduler,
                      callbacks=[[]] * len(models), on_checkpoint=[None] * len(models))
    before = [b.clone() for b in stack.buffers.values()]
    data = tuple(t[:settings.batch_size].to(device) for t in train_set.tensors)
    try:
        trainer.train_epoch(data)
        trainer.validate(data)
    except Exception as e:  # data-dependent Python control flow, .item() in the model, ...
        return [f"the model's step cannot be mapped over seeds: {first_line(e)}"]
    changed = any(not torch.equal(b, a) for b, a in zip(before, stack.buffers.values()))
    return ["the model updates its buffers while training"] if changed else []


class SeedStack:
    """The step object for K seeds: `models` (one per seed, each built after seeding with its
    seed) as one stack, their optimizer over the stacked tensors, and one seed's slice of each."""

    def __init__(self, models: list[torch.nn.Module], config: RunConfig, settings: Settings, device: str,
                 seeds: list[int]):
        self.device, self.seeds, self.state_keys = device, list(seeds), list(models[0].state_dict())
        self.ddp = None  # never under torchrun (why_not)
        params, buffers = stack_module_state([m.to(device) for m in models])
        self.params = {f"model.{k}": v for k, v in params.items()}  # named as inside LossStep
        self.buffers = {f"model.{k}": v for k, v in buffers.items()}
        # create_optimizer reads model.parameters() only: here, the stacked tensors.
        self.optimizer = config.create_optimizer(types.SimpleNamespace(parameters=self.params.values))
        self.scheduler = config.create_scheduler(self.optimizer)
        # The model's structure, without weights of its own: the stack's are passed in each call.
        self.step = LossStep(copy.deepcopy(models[0]).to("meta"), config.create_criterion())
        self.own_loss = self.step.own_loss

        def step(params: dict, buffers: dict, *args: Any) -> Any:  # one seed's, its weights passed in
            return functional_call(self.step, (params, buffers), args)

        # vmap maps it over the seeds; randomness="different": each seed draws its own dropout masks.
        self.losses = vmap(lambda p, b, x, y: step(p, b, x, y)[0], randomness="different")
        metrics = settings.metrics
        self.validation = vmap(lambda p, b, x, y: loss_and_metrics(partial(step, p, b), x, y, metrics),
                               in_dims=(0, 0, None, None), randomness="different")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each seed's loss of its own batch: x and y are (seeds, batch, ...)."""
        return self.losses(self.params, self.buffers, x, y)

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(seeds, 1 + metrics): each seed's loss and metric means on one shared batch."""
        return self.validation(self.params, self.buffers, x, y)

    def clip_gradients(self, max_norm: float) -> None:
        """A norm per seed, as clip_grad_norm_ takes one per model."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads]).norm(dim=0)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def keep(self, slots: list[int]) -> None:
        """Only the seeds at `slots` stay (the others stopped): each stacked tensor shrinks to their
        slices in place, so that the optimizer keeps its tensors, and its state is theirs."""
        full = self.optimizer.state_dict()
        for tensor in (*self.params.values(), *self.buffers.values()):
            tensor.data = tensor.data[slots]
        states = [self.optimizer_state(full, k) for k in slots]
        self.optimizer.load_state_dict(self.stacked_optimizer_state(states))

    # ---- one seed's slice, in the format of one model's state_dict and optimizer state

    def weights(self, k: int) -> dict:
        stacked = {**self.params, **self.buffers}
        return {key: stacked[f"model.{key}"][k].detach().clone() for key in self.state_keys}

    @torch.no_grad()
    def load_weights(self, k: int, weights: dict) -> None:
        stacked = {**self.params, **self.buffers}  # buffers that are not saved (persistent=False) stay
        for key in self.state_keys:
            stacked[f"model.{key}"][k].copy_(weights[key])

    def optimizer_state(self, full: dict, k: int) -> dict:
        return {"param_groups": full["param_groups"], "state": {
            i: {key: v[k].clone() if per_seed(key, v) else v for key, v in entry.items()}
            for i, entry in full["state"].items()}}

    def stacked_optimizer_state(self, states: list[dict]) -> dict:
        return {"param_groups": states[0]["param_groups"], "state": {
            i: {key: torch.stack([st["state"][i][key] for st in states]) if per_seed(key, v) else v
                for key, v in entry.items()} for i, entry in states[0]["state"].items()}}


# Optimizer state kept once per parameter, for every seed alike (all seeds step together), not
# per weight: told apart by name, as a 0-dimensional parameter's own state has its shape too.
SHARED_STATE = {"step", "mu_product"}


def per_seed(key: str, value: Any) -> bool:
    return torch.is_tensor(value) and key not in SHARED_STATE
