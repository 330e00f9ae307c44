"""The PNGs analyze.py draws: a seed's predictions, as its task allows, and a group's curves.

    plot_seed(model, val_set, "cpu", Path("plots"), "1", "MLP_ab12 seed 1")  # a PNG, or why none
    plot_losses(Path("runs/<project>/<group>"), Path("losses.png"))          # losses and metrics

matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import csv
from pathlib import Path


def plot_seed(model, val_set, device: str, plots: Path, seed: str, title: str) -> str:
    """A seed's predictions on the validation set, drawn as its task allows: against x for one
    input and one output, as a confusion matrix for class scores, truth against prediction for
    other regressions. Returns the PNG's path, or one line saying why there is none."""
    import matplotlib.pyplot as plt
    import torch
    from engine.contract import predict
    from engine.errors import first_line
    x, y = _tensors(val_set)
    try:
        with torch.no_grad():
            pred = torch.cat([predict(model, x[i:i + 4096].to(device)).detach().cpu()
                              for i in range(0, len(x), 4096)])
    except Exception as e:
        return (f"no prediction plot: predict(x) failed with {first_line(e)} (a model that needs more "
                "than x can define predict(self, x))")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not y.is_floating_point() and pred.ndim == y.ndim + 1 and pred.shape[:-1] == y.shape:  # class scores
        classes = pred.shape[-1]
        counts = torch.bincount(y.reshape(-1) * classes + pred.argmax(-1).reshape(-1), minlength=classes**2)
        image = ax.imshow(counts.reshape(classes, classes).numpy(), cmap="Blues")
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        accuracy = (pred.argmax(-1) == y).float().mean().item()
        title, path = f"{title}: accuracy {accuracy:.3f}", plots / f"confusion_{seed}.png"
    elif pred.shape != y.shape:
        plt.close(fig)
        return (f"no prediction plot: the prediction {tuple(pred.shape)} and the target {tuple(y.shape)} are "
                "neither one regression nor class scores")
    elif x.reshape(len(x), -1).shape[1] == 1 and y.reshape(len(y), -1).shape[1] == 1:
        order = x.reshape(-1).argsort()
        ax.scatter(x.reshape(-1), y.reshape(-1), s=4, alpha=0.35, label="truth")
        ax.plot(x.reshape(-1)[order], pred.reshape(-1)[order], color="C3", lw=2, label="prediction")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend()
        path = plots / f"prediction_{seed}.png"
    else:  # many inputs or outputs: truth against prediction, ideal on the diagonal
        ax.scatter(y.reshape(-1), pred.reshape(-1), s=4, alpha=0.35)
        low, high = float(y.min()), float(y.max())
        ax.plot([low, high], [low, high], color="C3", lw=1, label="ideal")
        ax.set_xlabel("truth")
        ax.set_ylabel("prediction")
        ax.legend()
        path = plots / f"prediction_{seed}.png"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _tensors(dataset) -> tuple:
    """(x, y) of a whole dataset, as two tensors."""
    import torch
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0], dataset.tensors[1]
    return tuple(torch.stack(t) for t in zip(*(dataset[i] for i in range(len(dataset)))))


def read_metrics(group_dir: Path) -> dict[str, list[dict]]:
    """{seed: rows of metrics.csv} for every seed folder that has one."""
    found = {}
    for path in sorted(group_dir.glob("*/metrics.csv")):
        with open(path) as f:
            found[path.parent.name] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return found


def plot_losses(group_dir: Path, path: Path) -> None:
    """Every seed's validation loss (thin), the mean ± std over seeds (line and band), and beside
    them every seed's curve of each metric (val_<name>)."""
    import matplotlib.pyplot as plt
    import numpy as np
    runs = read_metrics(group_dir)
    columns = [c for c in next(iter(runs.values()), [{}])[0] if c.startswith("val_") and c != "val_loss"]
    fig, axes = plt.subplots(1, 1 + len(columns), figsize=(7 + 4 * len(columns), 4.5), squeeze=False)
    ax = axes[0][0]
    for i, (seed, rows) in enumerate(runs.items()):
        ax.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], color=f"C{i}", lw=0.8,
                alpha=0.6, label=f"seed {seed}")
        for column, metric_ax in zip(columns, axes[0][1:]):
            metric_ax.plot([r["epoch"] for r in rows], [r[column] for r in rows], color=f"C{i}",
                           label=f"seed {seed}")
    for column, style in (("val_loss", "-"), ("train_loss", "--")):
        last = max((len(rows) for rows in runs.values()), default=0)
        # Seeds that stopped early leave the band where they stopped.
        per_epoch = [[rows[e][column] for rows in runs.values() if e < len(rows)] for e in range(last)]
        mean = np.array([np.mean(v) for v in per_epoch])
        std = np.array([np.std(v) for v in per_epoch])
        epochs = np.arange(1, last + 1)
        ax.plot(epochs, mean, ls=style, color="black", lw=2, label=f"{column} mean ± std")
        ax.fill_between(epochs, mean - std, mean + std, color="black", alpha=0.12)
    if all(r[c] > 0 for rows in runs.values() for r in rows for c in ("val_loss", "train_loss")):
        ax.set_yscale("log")  # a model's own loss may be negative (a log-likelihood): then linear
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(group_dir.name)
    ax.legend(fontsize=8)
    for column, metric_ax in zip(columns, axes[0][1:]):
        metric_ax.set_xlabel("epoch")
        metric_ax.set_ylabel(column)
        metric_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
