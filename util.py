"""Your data and your metrics: the functions a run config names by import path.

    data: util.load_data          # any function returning (train_dataset, val_dataset)
    metrics: [util.accuracy]      # any fn(pred, target) -> the batch mean, logged as val_accuracy

Write your own beside these (or in any module importable from where you run) and point the
config at it. A function returning TensorDatasets is batched by index on the training device
(no DataLoader); any other Dataset goes through a DataLoader (trainer.num_workers, ...).
The loop itself is in engine/trainer.py; a loss with extra terms goes in model.py.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, TensorDataset

# Imported for its side effect: it works around a oneMKL race in torch's CPU build before
# any data is built, also when a notebook calls these functions directly (README, Reproducibility).
import engine.reproducibility  # noqa: F401


def load_data(n: int = 10_000, noise: float = 0.1, val_fraction: float = 0.2,
              seed: int = 0) -> tuple[Dataset, Dataset]:
    """The shipped task: y = sin(4πx) + 0.5 sin(10πx) + 1.5x² + noise, x ~ U[0, 1].

    Seeded by its own `seed`, so every training seed sees the same data.
    """
    if n < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"need n >= 2 and 0 < val_fraction < 1, got n={n}, val_fraction={val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator)
    y = (torch.sin(4 * math.pi * x) + 0.5 * torch.sin(10 * math.pi * x) + 1.5 * x**2
         + noise * torch.randn(n, 1, generator=generator))
    n_train = n - max(1, int(round(n * val_fraction)))
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def load_spirals(n: int = 3000, classes: int = 3, noise: float = 0.2, val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """A classification task that needs no download: `classes` interleaved 2-D spirals.
    Targets are class indices (int64), as torch.nn.CrossEntropyLoss expects."""
    if n < classes or classes < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"need n >= classes >= 2 and 0 < val_fraction < 1, got n={n}, classes={classes}")
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (n,), generator=generator)
    radius = torch.rand(n, generator=generator)
    angle = 6.0 * radius + 2 * math.pi * label / classes + noise * torch.randn(n, generator=generator)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    n_train = n - max(1, int(round(n * val_fraction)))
    return TensorDataset(x[:n_train], label[:n_train]), TensorDataset(x[n_train:], label[n_train:])


def load_oscillator(n: int = 1000, equation: dict | None = None, t_max: float = 1.0, val_points: int = 200,
                    seed: int = 0) -> tuple[Dataset, Dataset]:
    """Times t in [0, t_max] for model.Oscillator: n random collocation points to train on, and
    an even grid to validate on, each with y the known solution of the damped oscillator
    u'' + 2 zeta omega u' + omega^2 u = 0, u(0) = 1, u'(0) = 0 (zeta < 1)."""
    equation = equation or {"zeta": 0.2, "omega": 6.0}
    zeta, omega = float(equation["zeta"]), float(equation["omega"])
    if n < 1 or val_points < 2 or t_max <= 0 or not 0 <= zeta < 1 or omega <= 0:
        raise ValueError(f"need n >= 1, val_points >= 2, t_max > 0, 0 <= zeta < 1 and omega > 0, got n={n}, "
                         f"val_points={val_points}, t_max={t_max}, zeta={zeta}, omega={omega}")
    damped = omega * math.sqrt(1 - zeta**2)

    def solution(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-zeta * omega * t) * (torch.cos(damped * t)
                                               + zeta * omega / damped * torch.sin(damped * t))

    t = t_max * torch.rand(n, 1, generator=torch.Generator().manual_seed(seed))
    grid = torch.linspace(0, t_max, val_points).unsqueeze(1)
    return TensorDataset(t, solution(t)), TensorDataset(grid, solution(grid))


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of samples whose highest-scoring class is the target (class-index targets)."""
    return (pred.argmax(dim=-1) == target).float().mean()
