"""Reload trained models and studies, report validation loss, and draw plots.

    python analyze.py                                    # interactive: pick project, group, seed
    python analyze.py --project P --group G [--seed S]   # for scripts (all seeds without --seed)
    python analyze.py --study NAME [--project P]         # a study's report and its best trial
    python analyze.py --study NAME --storage URL         # a study in another Optuna storage

Each model is rebuilt from the config saved beside it and its weights are loaded
with torch.load(weights_only=True). PNGs go to runs/<project>/<group>/plots/:
prediction_<seed>.png (prediction vs truth on the validation set) and
losses.png (train and validation loss of every seed).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from engine.errors import ConfigError
from engine.folders import RUNS_DIR


def choose(what: str, options: list[str]) -> str:
    """Ask on the terminal; Enter takes the first option."""
    if not options:
        raise ConfigError(str(RUNS_DIR), "", f"no {what} found")
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
    from config import RunConfig
    from engine import checkpoint
    config = RunConfig.from_yaml(group_dir / "config.yaml")
    model = config.create_model(device)
    # weights_only: a weights file never runs code, whoever wrote it.
    model.load_state_dict(checkpoint.load(group_dir / seed / "model.pt"))
    model.eval()
    return config, model


def validation_loss(config, model, val_set, device: str) -> float:
    from engine.trainer import Trainer
    trainer = Trainer(model, None, config.trainer_settings(), criterion=config.create_criterion(),
                      device=device)
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


def read_metrics(group_dir: Path) -> dict[str, list[dict]]:
    """{seed: rows of metrics.csv} for every seed folder that has one."""
    found = {}
    for seed in folders(group_dir):
        if (group_dir / seed / "metrics.csv").exists():
            with open(group_dir / seed / "metrics.csv") as f:
                found[seed] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
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
        plot_prediction(model, val_set, device, plots / f"prediction_{seed}.png",
                        f"{group_dir.name} seed {seed}")
    plot_losses(group_dir, plots / "losses.png")
    print(f"plots: {plots}/")
    return losses


def find_study(name: str, project: str | None, storage: str | None):
    """Load study `name` from `storage`, or else from runs/<project>/optuna.db (every project
    when none is given)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage:
        try:
            names = optuna.get_all_study_names(storage)
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            reason = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError("--storage", "", f"cannot open {hide_password(storage)}: "
                                               f"{type(e).__name__}: {reason}") from None
        places = [(storage, names)]
    else:
        databases = [RUNS_DIR / p / "optuna.db" for p in ([project] if project else folders(RUNS_DIR))]
        databases = [db for db in databases if db.exists()]
        places = [(f"sqlite:///{db}", optuna.get_all_study_names(f"sqlite:///{db}")) for db in databases]
    for url, names in places:
        if name in names:
            return optuna.load_study(study_name=name, storage=url)
    where = hide_password(storage) if storage else \
        ", ".join(str(db) for db in databases) or f"{RUNS_DIR}/ (no optuna.db found)"
    raise ConfigError("--study", "", f"no study '{name}' in {where}")


def hide_password(url: str) -> str:
    """An Optuna storage URL fit to print: user:secret@host becomes user:***@host."""
    import re
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", url)


def edge_warnings(trial, margin: float = 0.05) -> list[str]:
    """A warning for each parameter whose best value sits at the edge of its range:
    the optimum may lie outside what was searched."""
    import math
    from optuna.distributions import CategoricalDistribution
    warnings = []
    for name, value in trial.params.items():
        dist = trial.distributions[name]
        if isinstance(dist, CategoricalDistribution):
            numbers = [c for c in dist.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if len(numbers) == len(dist.choices) >= 3 and value in (min(numbers), max(numbers)):
                side = "lowest" if value == min(numbers) else "highest"
                warnings.append(f"{name} = {value} is the {side} of its choices {list(dist.choices)}")
            continue
        low, high, v = dist.low, dist.high, value
        if getattr(dist, "log", False):
            low, high, v = math.log(low), math.log(high), math.log(value)
        position = (v - low) / (high - low) if high > low else 0.5
        if position <= margin or position >= 1 - margin:
            side = "lower" if position <= margin else "upper"
            warnings.append(f"{name} = {value:.4g} is at the {side} edge of "
                            f"[{dist.low:.4g}, {dist.high:.4g}]")
    return warnings


def study_report(study, out_dir: Path) -> dict:
    """Best trial, parameter importances (Optuna's evaluator), edge warnings and PNGs."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    # Every trial pruned or failed: a report of why, and no best trial to speak of.
    best = study.best_trial if counts["complete"] else None
    report = {"study": study.study_name, "direction": study.direction.name.lower(), "trials": counts,
              "best": {"number": best.number, "value": best.value, "params": best.params,
                       "run_dir": best.user_attrs.get("run_dir")} if best else None,
              "reasons": {t.number: t.user_attrs["reason"] for t in trials if "reason" in t.user_attrs},
              "importances": None, "warnings": edge_warnings(best) if best else [], "plots": []}
    if best is None:
        return report
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = [("history.png", vis.plot_optimization_history)]
        if counts["complete"] >= 2 and best.params:
            try:
                report["importances"] = optuna.importance.get_param_importances(study)
                plots.append(("importances.png", vis.plot_param_importances))
            except (RuntimeError, ValueError) as e:  # e.g. every trial sampled the same values
                report["importances_error"] = str(e)
        for name, plot in plots:
            ax = plot(study)
            ax.figure.set_size_inches(8, 5)
            ax.figure.tight_layout()
            ax.figure.savefig(out_dir / name, dpi=110)
            plt.close(ax.figure)
            report["plots"].append(str(out_dir / name))
    if best.user_attrs.get("run_dir") and Path(best.user_attrs["run_dir"]).is_dir():
        plot_losses(Path(report["best"]["run_dir"]), out_dir / "best_losses.png")
        report["plots"].append(str(out_dir / "best_losses.png"))
    return report


def print_report(report: dict) -> None:
    best = report["best"]
    counts = ", ".join(f"{n} {state}" for state, n in report["trials"].items())
    print(f"study {report['study']} ({report['direction']}): {counts}")
    if best is None:
        for number, reason in report["reasons"].items():
            print(f"  trial {number}: {reason}")
        print("no trial completed, so there is no best trial to analyze yet")
        return
    print(f"best trial {best['number']}: value {best['value']:.6g}, run folder {best['run_dir']}")
    for key, value in best["params"].items():
        print(f"  {key} = {value}")
    if report["importances"]:
        print("parameter importances:")
        for key, value in report["importances"].items():
            print(f"  {key:<32} {value:.3f}")
    for warning in report["warnings"]:
        print(f"warning: {warning}; consider widening the range")
    print(f"plots: {', '.join(report['plots'])}")


def report_study(args: argparse.Namespace) -> int:
    """--study: the report, then the best trial's run; 1 when no trial completed."""
    study = find_study(args.study, args.project, args.storage)
    # The report goes beside the trials' folders.
    run_dirs = [t.user_attrs["run_dir"] for t in study.get_trials(deepcopy=False)
                if "run_dir" in t.user_attrs]
    project_dir = Path(run_dirs[0]).parent if run_dirs else RUNS_DIR
    report = study_report(study, project_dir / f"{study.study_name}_report")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        if report["best"] is not None:
            group_dir = Path(report["best"]["run_dir"])
            analyze_group(group_dir, [args.seed] if args.seed else seeds_in(group_dir), args.device)
    return 0 if report["best"] is not None else 1


def report_runs(args: argparse.Namespace) -> int:
    """A group's seeds: asked for at a terminal, given by --project/--group/--seed otherwise."""
    interactive = not (args.project and args.group)
    if interactive and not sys.stdin.isatty():
        raise ConfigError("analyze.py", "", "give --project and --group (or --study) when not at a terminal")
    project = args.project or choose("project", folders(RUNS_DIR))
    group = args.group or choose("group", [g for g in folders(RUNS_DIR / project)
                                           if seeds_in(RUNS_DIR / project / g)])
    group_dir = RUNS_DIR / project / group
    available = seeds_in(group_dir)
    if not available:
        raise ConfigError(f"{group_dir}/", "", "holds no trained seed")
    if args.seed:
        seeds = [args.seed]
    elif interactive:
        seeds = [choose("seed", ["all", *available])]
        seeds = available if seeds == ["all"] else seeds
    else:
        seeds = available
    if any(s not in available for s in seeds):
        raise ConfigError("--seed", "", f"{group_dir}/ has seeds {', '.join(available)}")
    analyze_group(group_dir, seeds, args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project")
    parser.add_argument("--group")
    parser.add_argument("--seed")
    parser.add_argument("--study", help="report a study's best trial and analyze its run")
    parser.add_argument("--storage", metavar="URL",
                        help="with --study: the Optuna storage that holds it "
                             "(default: runs/<project>/optuna.db)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="with --study: print the report as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(1, os.getcwd())
    try:
        if args.storage and not args.study:
            raise ConfigError("--storage", "", "only --study uses it")
        return report_study(args) if args.study else report_runs(args)
    except ConfigError as e:  # bad input: one line, exit 2, as in main.py
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
