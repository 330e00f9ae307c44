"""Whether a config's seeds can train together, as one stack (engine/vectorized.py), decided once
before anything is written: every reason they cannot, from the settings and the model, then a
one-batch trial of the real step on a stack of the first seeds' own models (and on CUDA, whether
all of them would fit). run() prints the reasons in one line; --preflight shows them too.

    reasons = why_not(config, settings, device, world, train_set, val_set, models)  # []: they can
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import TensorDataset

from engine.errors import first_line
from engine.settings import Settings
from engine.trainer import Trainer
from engine.vectorized import SeedStack

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
    """Why one batch of the real step, and its validation, fail on a stack of `models`; [] if they run.
    On CUDA the trial also measures what a seed adds to the stack: all of them must fit."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
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
    except torch.cuda.OutOfMemoryError:
        return [f"a stack of {len(models)} seeds does not fit on {device}"]
    except Exception as e:  # data-dependent Python control flow, .item() in the model, ...
        return [f"the model's step cannot be mapped over seeds: {first_line(e)}"]
    if cuda:
        per_seed = (torch.cuda.max_memory_allocated(device) - base) / len(models)
        # What is free once the trial's own tensors are gone.
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device) - base
        if not fits(per_seed, len(config.seeds), free):
            need = per_seed * len(config.seeds) / 2**30
            return [f"a stack of {len(config.seeds)} seeds would need about {need:.1f} GiB on {device}, "
                    f"where {free / 2**30:.1f} GiB are free"]
    changed = any(not torch.equal(b, a) for b, a in zip(before, stack.buffers.values()))
    return ["the model updates its buffers while training"] if changed else []


def fits(per_seed: float, seeds: int, free: float) -> bool:
    """Whether `seeds` seeds of `per_seed` bytes each (weights, optimizer state, activations) fit in
    `free` bytes, with a fifth to spare: where they would not, one by one needs a Kth of it."""
    return per_seed * seeds <= 0.8 * free
