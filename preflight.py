"""Pre-flight check: build data, model, optimizer, scheduler and criterion, run one
batch forward, backward and optimizer step on the chosen device, check it, and
print a short table. Nothing is written: no run folder, no wandb run.

    python main.py --run_config configs/run_template.yaml --preflight

Exit status 0 when every check passes, 1 when one fails (it is named), 2 for a bad config.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from config import RunConfig
from reproducibility import set_seed
from trainer import Trainer
from util import _build


def check_shapes(pred: torch.Tensor, target: torch.Tensor) -> str | None:
    """None when the model's output fits the target; otherwise what is wrong."""
    if target.is_floating_point():  # regression: the same shape, or the loss broadcasts silently
        if pred.shape != target.shape:
            return f"output {tuple(pred.shape)} vs target {tuple(target.shape)}: a loss would broadcast them"
    elif pred.ndim != target.ndim + 1 or pred.shape[0] != target.shape[0]:  # class indices
        return f"output {tuple(pred.shape)} vs class-index target {tuple(target.shape)}: expected (batch, classes)"
    return None


def preflight(config: RunConfig) -> int:
    started = time.perf_counter()
    device = config.resolve_device()
    train_set, _ = config.load_data()
    set_seed(config.seeds[0])
    model, optimizer, scheduler, criterion = _build(config, device)
    trainer = Trainer(model, optimizer, scheduler, criterion, config, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    x, y = next(trainer.batches(trainer.on_device(train_set), config.batch_size, torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in model.parameters()]
    failures: list[str] = []
    pred, loss, grad_norm = None, None, None
    stage = "forward"
    try:  # user code runs here: a crash is a failed check with its name, not a traceback
        model.train()
        with trainer.autocast():  # the same precision as the training step
            pred = trainer.forward(x)
            shape_problem = check_shapes(pred, y)
            if shape_problem:
                failures.append(f"output shape: {shape_problem}")
            stage = "loss"
            loss = criterion(pred, y)
        if not math.isfinite(loss.item()):
            failures.append(f"loss finite: the loss is {loss.item()}")
        stage = "backward"
        trainer.scaler.scale(loss).backward()
        trainer.scaler.unscale_(optimizer)  # true gradients (a no-op without fp16)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else 0.0
        if not math.isfinite(grad_norm):
            failures.append(f"gradients finite: the gradient norm is {grad_norm}")
        elif grad_norm == 0.0:
            failures.append("gradients non-zero: every gradient is zero (or missing)")
        stage = "optimizer step"
        optimizer.step()
        if all(torch.equal(b, p) for b, p in zip(before, model.parameters())):
            failures.append("optimizer step: no parameter changed")
    except Exception as e:
        failures.append(f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    if device.startswith("cuda"):
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, peak allocated)"
    elif sys.platform != "win32":
        import resource  # Unix only; ru_maxrss is in KiB on Linux, in bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        memory = f"{peak:.0f} MiB (process, peak resident)"
    else:
        memory = "-"
    rows = [
        ("config", config.source),
        ("device", device),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("batch", f"x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}, "
                  f"y {tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}"),
        ("output", f"{tuple(pred.shape)} {str(pred.dtype).removeprefix('torch.')}" if pred is not None else "-"),
        ("loss", f"{loss.item():.6g}" if loss is not None else "-"),
        ("gradient norm", f"{grad_norm:.6g}" if grad_norm is not None else "-"),
        ("peak memory", memory),
        ("seconds", f"{time.perf_counter() - started:.2f}"),
    ]
    for name, value in rows:
        print(f"  {name:<14} {value}")
    for failure in failures:
        print(f"FAIL {failure}")
    print("preflight: all checks passed" if not failures else f"preflight: {len(failures)} check(s) failed")
    return 1 if failures else 0
