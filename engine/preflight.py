"""Pre-flight check: build data, model, optimizer, scheduler and criterion, run one batch
through the Trainer's own training step (the loss step, backward, optimizer step) on the
chosen device, check it, and print a short table. Nothing is written: no run folder, no
wandb run.

    python main.py --run_config configs/run_template.yaml --preflight

Exit status 0 when every check passes, 1 when one fails (it is named), 2 for a bad config.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import TYPE_CHECKING

import torch

from engine.reproducibility import set_seed
from engine.run import build
from engine.trainer import Trainer, has_own_loss

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


def describe(tensor: torch.Tensor | None) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}" if tensor is not None else "-"


def preflight(config: RunConfig) -> int:
    """One checked training step of `config`; prints the table, returns the exit status."""
    started = time.perf_counter()
    config.check_device()
    device = config.device
    train_set, _ = config.load_data()
    set_seed(config.seeds[0])
    model, optimizer, scheduler, criterion = build(config, device)
    trainer = Trainer(model, optimizer, config.trainer_settings(), scheduler=scheduler, criterion=criterion,
                      device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    x, y = next(trainer.batches(trainer.on_device(train_set), config.batch_size,
                                torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in model.parameters()]
    failures: list[str] = []
    pred, loss, grad_norm = None, None, None
    own_loss = has_own_loss(model)
    stage = "training step"
    try:  # user code runs here: a crash is a failed check with its name, not a traceback
        model.train()
        step_error = None
        try:
            loss, pred = trainer.train_step(x, y)  # the training step itself: the loss step, backward
        except Exception as e:
            step_error = e
            if not own_loss:  # was the output's shape the cause? A forward pass alone tells
                with contextlib.suppress(Exception), torch.no_grad(), trainer.autocast():
                    pred = model(x)
        # A model with its own loss decides itself how its output meets the target.
        shape_problem = check_shapes(pred, y) if pred is not None and not own_loss else None
        if shape_problem:
            failures.append(f"output shape: {shape_problem}")
        if step_error is not None:
            raise step_error
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
    except Exception as e:
        failures.append(f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if pred is None and own_loss:  # only for the table: the output's shape, without training
        with contextlib.suppress(Exception), torch.inference_mode(), trainer.autocast():
            pred = model.eval()(x)

    rows = [
        ("config", config.source),
        ("device", device),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("batch", f"x {describe(x)}, y {describe(y)}"),
        ("output", describe(pred)),
        ("loss", f"{loss.item():.6g}" if loss is not None else "-"),
        ("gradient norm", f"{grad_norm:.6g}" if grad_norm is not None else "-"),
        ("peak memory", peak_memory(device)),
        ("seconds", f"{time.perf_counter() - started:.2f}"),
    ]
    for name, value in rows:
        print(f"  {name:<14} {value}")
    for failure in failures:
        print(f"FAIL {failure}")
    print("preflight: all checks passed" if not failures else f"preflight: {len(failures)} check(s) failed")
    return 1 if failures else 0
