"""Pre-flight check: build data, model, optimizer, scheduler and criterion, then run what the
first epoch runs, through the Trainer's own code on the chosen device: one training step (the
loss step, backward, optimizer step), one validation batch through the real validation path,
with every metric; and, for several seeds, the trial that decides whether they train together.
Each check that fails is one line naming its stage. Nothing is written: no run folder, no wandb.

    python main.py --run_config configs/run_template.yaml --preflight

Exit status 0 when every check passes, 1 when one fails (it is named), 2 for a bad config.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Subset, TensorDataset

from engine import stacking
from engine.contract import has_own_loss, predict
from engine.errors import first_line
from engine.reproducibility import set_seed
from engine.trainer import Trainer

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig


def check_shapes(pred: torch.Tensor, target: torch.Tensor) -> str | None:
    """None when the model's output fits the target; otherwise what is wrong."""
    if target.is_floating_point():  # regression: the same shape, or the loss broadcasts silently
        if pred.shape != target.shape:
            return f"output {tuple(pred.shape)} vs target {tuple(target.shape)}: a loss would broadcast them"
    elif pred.ndim != target.ndim + 1 or pred.shape[0] != target.shape[0]:  # class indices
        return (f"output {tuple(pred.shape)} vs class-index target {tuple(target.shape)}: "
                "expected (batch, classes)")
    return None


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, peak allocated)"
    if sys.platform == "win32":
        return "-"
    import resource  # Unix only; ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return f"{peak:.0f} MiB (process, peak resident)"


def describe(value: Any) -> str:
    """A tensor's shape and dtype; a tuple's, element by element; anything else's type."""
    if isinstance(value, (tuple, list)):
        return f"({', '.join(describe(v) for v in value)})"
    if torch.is_tensor(value):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return "-" if value is None else type(value).__name__


def first_samples(dataset: Any, n: int) -> Any:
    """The first n samples, as the same kind of dataset (in-memory tensors stay tensors)."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[:n] for t in dataset.tensors))
    return Subset(dataset, range(min(n, len(dataset))))


def val_size(settings: Any) -> int:
    return settings.val_batch_size or settings.batch_size


def preflight(config: RunConfig) -> int:
    """What the first epoch of `config` runs, checked; prints the table, returns the exit status."""
    started = time.perf_counter()
    config.check_device()
    device, settings = config.device, config.trainer_settings()
    train_set, val_set = config.load_data()
    set_seed(config.seeds[0])
    model = config.create_model(device)
    optimizer = config.create_optimizer(model)
    trainer = Trainer(model, optimizer, settings, scheduler=config.create_scheduler(optimizer),
                      criterion=config.create_criterion(), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    x, y = next(trainer.batches(trainer.on_device(train_set), config.batch_size,
                                torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in model.parameters()]
    failures: list[str] = []
    loss, grad_norm, validation, pred = None, None, None, None
    stage = "training step"
    try:  # user code runs here: a crash is a failed check with its stage, not a traceback
        loss = trainer.train_step(x, y)  # the training step itself: the loss step, backward
        if not math.isfinite(loss.item()):
            failures.append(f"loss finite: the loss is {loss.item()}")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # The gradients are still scaled under fp16 (the scaler unscales inside the step).
        norms = torch.stack([g.float().norm() for g in grads]) if grads else torch.zeros(1)
        grad_norm = torch.linalg.vector_norm(norms).item() / trainer.scaler.get_scale()
        if not math.isfinite(grad_norm):
            failures.append(f"gradients finite: the gradient norm is {grad_norm}")
        elif grad_norm == 0.0:
            failures.append("gradients non-zero: every gradient is zero (or missing)")
        stage = "optimizer step"
        trainer.optimizer_step()
        if all(torch.equal(b, p) for b, p in zip(before, model.parameters())):
            failures.append("optimizer step: no parameter changed")
        stage = "validation"  # one batch, through the real validation path, with every metric
        validation = trainer.evaluate(trainer.on_device(first_samples(val_set, val_size(settings))))
    except Exception as e:
        failures.append(f"{stage}{failing_metric(trainer, val_set) if stage == 'validation' else ''}: "
                        f"{first_line(e)}")
    with contextlib.suppress(Exception), torch.no_grad(), trainer.autocast():  # the output, for the table
        pred = predict(model.eval(), x)
    # A model with its own loss decides itself how its output meets the target.
    shape_problem = check_shapes(pred, y) if torch.is_tensor(pred) and torch.is_tensor(y) and \
        not has_own_loss(model) else None
    if shape_problem:
        failures.append(f"output shape: {shape_problem}")
    seeds = seeds_row(config, device, train_set, val_set, model.train())
    rows = [
        ("config", config.source), ("device", device),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("batch", f"x {describe(x)}, y {describe(y)}"), ("output", describe(pred)),
        ("loss", f"{loss.item():.6g}" if loss is not None else "-"),
        ("gradient norm", f"{grad_norm:.6g}" if grad_norm is not None else "-"),
        *((name, f"{value:.6g} (one batch)") for name, value in (validation or {}).items()),
        ("seeds", seeds), ("peak memory", peak_memory(device)),
        ("seconds", f"{time.perf_counter() - started:.2f}"),
    ]
    for name, value in rows:
        print(f"  {name:<14} {value}")
    for failure in failures:
        print(f"FAIL {failure}")
    print("preflight: all checks passed" if not failures else f"preflight: {len(failures)} check(s) failed")
    return 1 if failures else 0


def failing_metric(trainer: Trainer, val_set: Any) -> str:
    """' (metric val_<name>)' when validation failed in a metric rather than in the loss."""
    x, y = next(trainer.batches(trainer.on_device(first_samples(val_set, val_size(trainer.settings))),
                                val_size(trainer.settings)))
    for name, metric in trainer.settings.metrics.items():
        try:
            with torch.no_grad():
                metric(predict(trainer.models.model, x), y)
        except Exception:
            return f" (metric {name})"
    return ""


def seeds_row(config: RunConfig, device: str, train_set: Any, val_set: Any, model: torch.nn.Module) -> str:
    """How the config's seeds would train: together, or one by one and why (the same trial run() makes)."""
    if len(config.seeds) == 1 or not config.trainer.vectorize_seeds:
        return "one" if len(config.seeds) == 1 else "one after another (trainer.vectorize_seeds is false)"
    try:
        set_seed(config.seeds[1])
        reasons = stacking.why_not(config, config.trainer_settings(), device, 1, train_set, val_set,
                                     [model, config.create_model(device)])
    except Exception as e:
        reasons = [first_line(e)]
    together = f"{len(config.seeds)}, together in one stack"
    return f"one after another: {'; '.join(reasons)}" if reasons else together
