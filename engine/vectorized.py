"""Many seeds as one model: their weights stacked along a new first dimension, and the one loss
step (engine/contract.py) mapped over it with torch.func.vmap. On a small model a step is
mostly per-call overhead, so five seeds cost little more than one.

    stack = SeedStack(models, config, settings, device, seeds)  # where engine/stacking.py allows
    trainer = Trainer(stack, stack.optimizer, settings, scheduler=stack.scheduler, ...)

SeedStack is the step object the loop (engine/trainer.py) drives for K seeds; each keeps its
own initialisation, data order, dropout draws and gradient-norm clipping. The seeds share one
optimizer over the stacked tensors, exact for optimizers that update each weight on its own
(ELEMENTWISE in engine/stacking.py), and one learning rate. A seed that stops leaves the stack;
vmap never mixes one seed's slice with another's.
"""
from __future__ import annotations

import copy
import types
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from engine.contract import LossStep, loss_and_metrics
from engine.settings import Settings

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig

class SeedStack:
    """The step object for K seeds: `models` (one per seed, each built after seeding with its
    seed) as one stack, their optimizer over the stacked tensors, and one seed's slice of each."""

    def __init__(self, models: list[torch.nn.Module], config: RunConfig, settings: Settings, device: str,
                 seeds: list[int]):
        self.device, self.seeds, self.state_keys = device, list(seeds), list(models[0].state_dict())
        self.ddp = None  # never under torchrun (engine/stacking.py)
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
