"""The loop's settings: all the Trainer reads, checked when they are built, so that a mistake
fails at once and not after an epoch. A notebook builds them by hand,

    Settings(epochs=20, batch_size=256, patience=5)

and RunConfig.trainer_settings() builds them from a config (whose `trainer:` and
`early_stopping:` sections config.py describes). Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.resolve import did_you_mean


class SettingsError(ValueError):
    """A setting the loop cannot run with; `name` is the Settings field."""

    def __init__(self, name: str, message: str):
        self.name, self.message = name, message
        super().__init__(f"{name}: {message}")


@dataclass(frozen=True)
class Settings:
    epochs: int
    batch_size: int                      # per optimizer step (the global batch under torchrun)
    monitor: str = "val_loss"            # train_loss, val_loss or val_<metric>: picks the best weights
    mode: str = "min"                    # min | max
    patience: int | None = None          # early stopping: epochs without improvement; None = never
    min_delta: float = 0.0               # an improvement must beat the best by more than this
    checkpoint_every_s: float = 10.0     # hand over a checkpoint at most this often (0: every epoch)
    metrics: dict[str, Callable] = field(default_factory=dict)  # {"val_<name>": fn(pred, target)}
    precision: str = "fp32"              # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    compile: bool = False                # torch.compile the loss step
    grad_clip: float | None = None       # clip the gradient norm to this
    grad_accum: int = 1                  # micro-batches per optimizer step
    val_batch_size: int | None = None    # None: batch_size
    num_workers: int = 0                 # DataLoader settings, for datasets that are not
    pin_memory: bool = False             # in-memory tensors
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise SettingsError(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.mode not in ("min", "max"):
            raise SettingsError("mode", f"must be 'min' or 'max', got {self.mode!r}")
        monitors = ["train_loss", "val_loss", *self.metrics]
        if self.monitor not in monitors:
            raise SettingsError("monitor", f"must be one of {', '.join(monitors)}, got {self.monitor!r}"
                                           f"{did_you_mean(self.monitor, monitors)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise SettingsError("precision", f"must be fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("grad_clip", "grad_accum", "val_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SettingsError(name, f"must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise SettingsError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.persistent_workers and self.num_workers == 0:
            raise SettingsError("persistent_workers", "needs num_workers > 0")
        if self.checkpoint_every_s < 0:
            raise SettingsError("checkpoint_every_s", f"must be >= 0, got {self.checkpoint_every_s}")
        if self.patience is not None and self.patience < 1:
            raise SettingsError("patience", "must be a positive integer or null")
        if self.min_delta < 0:
            raise SettingsError("min_delta", "must be >= 0")


def improved(settings: Settings, best: float, value: float) -> bool:
    """Whether `value` beats `best` by more than min_delta, in the direction of `mode`."""
    return value < best - settings.min_delta if settings.mode == "min" else value > best + settings.min_delta
