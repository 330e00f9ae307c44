"""The PNGs analyze.py draws: a seed's prediction against the truth, and a group's losses.

    plot_prediction(model, val_set, "cpu", Path("prediction_1.png"), "MLP_ab12 seed 1")
    plot_losses(Path("runs/<project>/<group>"), Path("losses.png"))

matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import csv
from pathlib import Path


def plot_prediction(model, val_set, device: str, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    import torch
    x, y = (torch.stack(t) for t in zip(*(val_set[i] for i in range(len(val_set)))))
    with torch.inference_mode():
        pred = model(x.to(device)).cpu()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if x.reshape(len(x), -1).shape[1] == 1 and y.reshape(len(y), -1).shape[1] == 1:
        order = x.reshape(-1).argsort()
        ax.scatter(x.reshape(-1), y.reshape(-1), s=4, alpha=0.35, label="truth")
        ax.plot(x.reshape(-1)[order], pred.reshape(-1)[order], color="C3", lw=2, label="prediction")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    else:  # many inputs or outputs: truth against prediction, ideal on the diagonal
        ax.scatter(y.reshape(-1), pred.reshape(-1), s=4, alpha=0.35)
        low, high = float(y.min()), float(y.max())
        ax.plot([low, high], [low, high], color="C3", lw=1, label="ideal")
        ax.set_xlabel("truth")
        ax.set_ylabel("prediction")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(group_dir: Path) -> dict[str, list[dict]]:
    """{seed: rows of metrics.csv} for every seed folder that has one."""
    found = {}
    for path in sorted(group_dir.glob("*/metrics.csv")):
        with open(path) as f:
            found[path.parent.name] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return found


def plot_losses(group_dir: Path, path: Path) -> None:
    """Every seed's validation loss (thin), and the mean ± std over seeds (line and band)."""
    import matplotlib.pyplot as plt
    import numpy as np
    runs = read_metrics(group_dir)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (seed, rows) in enumerate(runs.items()):
        ax.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], color=f"C{i}", lw=0.8,
                alpha=0.6, label=f"seed {seed}")
    for column, style in (("val_loss", "-"), ("train_loss", "--")):
        last = max((len(rows) for rows in runs.values()), default=0)
        # Seeds that stopped early leave the band where they stopped.
        per_epoch = [[rows[e][column] for rows in runs.values() if e < len(rows)] for e in range(last)]
        mean = np.array([np.mean(v) for v in per_epoch])
        std = np.array([np.std(v) for v in per_epoch])
        epochs = np.arange(1, last + 1)
        ax.plot(epochs, mean, ls=style, color="black", lw=2, label=f"{column} mean ± std")
        ax.fill_between(epochs, mean - std, mean + std, color="black", alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(group_dir.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
