"""Reload trained models and studies, report validation loss, and draw plots.

    python analyze.py                                    # interactive: pick project, group, seed
    python analyze.py --project P --group G [--seed S]   # for scripts (all seeds without --seed)
    python analyze.py --study NAME [--project P]         # a study's best trial

Each model is rebuilt from the config saved beside it and its weights are loaded
with torch.load(weights_only=True). PNGs go to runs/<project>/<group>/plots/:
prediction_<seed>.png (prediction vs truth on the validation set) and
losses.png (train and validation loss of every seed).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

RUNS_DIR = Path("runs")


def choose(what: str, options: list[str]) -> str:
    """Ask on the terminal; Enter takes the first option."""
    if not options:
        raise SystemExit(f"error: no {what} found under {RUNS_DIR}/")
    if len(options) == 1:
        return options[0]
    for i, option in enumerate(options):
        print(f"  [{i}] {option}")
    while True:
        answer = input(f"{what} [0]: ").strip() or "0"
        if answer in options:  # a name first: seeds are numbers too
            return answer
        if answer.isdigit() and int(answer) < len(options):
            return options[int(answer)]
        print(f"  pick a number from 0 to {len(options) - 1}")


def folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def seeds_in(group_dir: Path) -> list[str]:
    return [name for name in folders(group_dir) if (group_dir / name / "model.pt").exists()]


def load_model(group_dir: Path, seed: str, device: str):
    """(config, model with trained weights) from a run folder."""
    import torch
    from config import RunConfig
    config = RunConfig.from_yaml(group_dir / "config.yaml")
    model = config.build_model(device)
    # weights_only: a weights file never runs code, whoever wrote it.
    model.load_state_dict(torch.load(group_dir / seed / "model.pt", map_location=device, weights_only=True))
    model.eval()
    return config, model


def validation_loss(config, model, val_set, device: str) -> float:
    from util import Trainer
    trainer = Trainer(model, None, None, config.build_criterion(), config, device=device)
    return trainer.evaluate(trainer.on_device(val_set))["val_loss"]


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


def plot_losses(group_dir: Path, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, seed in enumerate(folders(group_dir)):
        metrics = group_dir / seed / "metrics.csv"
        if not metrics.exists():
            continue
        with open(metrics) as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        ax.plot(epochs, [float(r["train_loss"]) for r in rows], ls="--", color=f"C{i}", alpha=0.7)
        ax.plot(epochs, [float(r["val_loss"]) for r in rows], color=f"C{i}", label=f"seed {seed}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (dashed: train, solid: validation)")
    ax.set_title(group_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze_group(group_dir: Path, seeds: list[str], device: str) -> dict[str, float]:
    """Reload each seed, print its validation loss, save the plots; returns {seed: loss}."""
    plots = group_dir / "plots"
    plots.mkdir(exist_ok=True)
    losses = {}
    val_set = None
    for seed in seeds:
        config, model = load_model(group_dir, seed, device)
        if val_set is None:
            _, val_set = config.load_data()
        losses[seed] = validation_loss(config, model, val_set, device)
        print(f"{group_dir}/{seed}: validation loss {losses[seed]:.6g}")
        plot_prediction(model, val_set, device, plots / f"prediction_{seed}.png", f"{group_dir.name} seed {seed}")
    plot_losses(group_dir, plots / "losses.png")
    print(f"plots: {plots}/")
    return losses


def find_study(name: str, project: str | None):
    """Load study `name` from runs/<project>/optuna.db (every project if none is given)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    projects = [project] if project else folders(RUNS_DIR)
    for p in projects:
        db = RUNS_DIR / p / "optuna.db"
        if db.exists() and name in optuna.get_all_study_names(f"sqlite:///{db}"):
            return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    raise SystemExit(f"error: no study '{name}' in {', '.join(str(RUNS_DIR / p / 'optuna.db') for p in projects)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project")
    parser.add_argument("--group")
    parser.add_argument("--seed")
    parser.add_argument("--study", help="report a study's best trial and analyze its run")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sys.path.insert(1, os.getcwd())

    if args.study:
        study = find_study(args.study, args.project)
        best = study.best_trial
        print(f"study {study.study_name}: best trial {best.number}, value {best.value:.6g}")
        for key, value in best.params.items():
            print(f"  {key} = {value}")
        group_dir = Path(best.user_attrs["run_dir"])
        analyze_group(group_dir, [args.seed] if args.seed else seeds_in(group_dir), args.device)
        return 0

    interactive = not (args.project and args.group)
    if interactive and not sys.stdin.isatty():
        print("error: give --project and --group (or --study) when not at a terminal", file=sys.stderr)
        return 2
    project = args.project or choose("project", folders(RUNS_DIR))
    group = args.group or choose("group", [g for g in folders(RUNS_DIR / project)
                                           if seeds_in(RUNS_DIR / project / g)])
    group_dir = RUNS_DIR / project / group
    available = seeds_in(group_dir)
    if not available:
        print(f"error: {group_dir}/ holds no trained seed", file=sys.stderr)
        return 2
    if args.seed:
        seeds = [args.seed]
    elif interactive:
        seeds = [choose("seed", ["all", *available])]
        seeds = available if seeds == ["all"] else seeds
    else:
        seeds = available
    if any(s not in available for s in seeds):
        print(f"error: --seed: {group_dir}/ has seeds {', '.join(available)}", file=sys.stderr)
        return 2
    analyze_group(group_dir, seeds, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
