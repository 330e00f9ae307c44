"""Reload trained models and studies, report validation loss, and draw plots.

    python analyze.py                                    # interactive: pick project, group, seed
    python analyze.py --project P --group G [--seed S]   # for scripts (all seeds without --seed)
    python analyze.py --project P --group G --trust      # a folder whose config names code elsewhere
    python analyze.py --study NAME [--project P]         # a study's report and its best trial
    python analyze.py --study NAME --storage URL         # a study in another Optuna storage
    python analyze.py --study NAME --dashboard [--port P]  # Optuna Dashboard on 127.0.0.1, until Ctrl-C
    python analyze.py --sync --project P --group G [--dry-run]  # wandb sync of the group's offline runs

Optuna Dashboard has no login, and its pages can delete studies and trials. It listens on
127.0.0.1 only, but every user logged in to the same machine can reach 127.0.0.1 too, so on
a shared machine (a cluster's login node) anyone there could delete your study; forwarding
it with `ssh -L 8080:127.0.0.1:8080 login-node` does not change that. The private way is to
run the dashboard on your own computer, over a copy of the storage:

    scp login-node:path/to/runs/P/optuna.db runs/P/       # or optuna.journal; copy again for new trials
    python analyze.py --study NAME --dashboard

or over a database server reached through a tunnel, which only you can use:
`ssh -N -L 5432:db-host:5432 login-node`, then `--storage postgresql+psycopg://user@127.0.0.1:5432/db`.

In a notebook (importing this file does nothing else):

    from analyze import load_run, load_study
    run = load_run("runs/<project>/<group>")   # .config, and per seed .models, .metrics, .results
    study = load_study("NAME")                  # the Optuna study

Each model is rebuilt from the config saved beside it and its weights are loaded
with torch.load(weights_only=True). A run folder may come from someone else, so the import
paths its config names must lie in this project (your files, not installed packages) or in
torch.nn, torch.optim, optuna.samplers, optuna.pruners: anything else is refused before it is
imported, unless you trust the folder (--trust, load_run(..., trust=True)).

PNGs go to runs/<project>/<group>/plots/: per seed its predictions as the task allows
(prediction_<seed>.png for a regression, confusion_<seed>.png for class scores; a line says
why when neither fits), and losses.png (every seed's losses and metrics).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.folders import RUNS_DIR, name_problem
from engine.plots import plot_losses, plot_seed, read_metrics
from engine.report import edge_warnings, print_report, study_report  # noqa: F401  (notebooks)
from engine.studies import find_study


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


def saved_config(group_dir: Path, trust: bool, hint: str = "pass --trust if you trust this folder"):
    """The run folder's config.yaml; unless trusted, an import path in it outside this project
    and the allowed packages is a ConfigError naming the key, and nothing is imported."""
    from config import RunConfig
    from engine.folders import untrusted
    return RunConfig.from_yaml(group_dir / "config.yaml", None if trust else untrusted(group_dir, hint))


def trained_model(config, weights: Path, device: str):
    """The config's model with the weights in `weights`, ready for evaluation."""
    from engine import checkpoint
    model = config.create_model(device)
    # weights_only: a weights file never runs code, whoever wrote it.
    model.load_state_dict(checkpoint.load(weights))
    model.eval()
    return model


@dataclass
class LoadedRun:
    """A run folder, per seed: `models[seed]` (its best weights), `metrics[seed][column]`
    (metrics.csv, one number per epoch) and `results[seed]` (result.json)."""
    config: Any  # config.RunConfig
    models: dict[int, Any]
    metrics: dict[int, dict[str, Any]]  # column -> numpy array
    results: dict[int, dict]

    def predict(self, seed: int, x: Any) -> Any:
        """What the seed's model predicts for x, as metrics and plots see it (model.predict, or
        model(x), or its first element: engine/contract.py)."""
        import torch
        from engine.contract import predict
        model = self.models[seed]
        with torch.no_grad():
            return predict(model, x.to(next(model.parameters()).device))


def load_run(path: str | Path, device: str = "cpu", trust: bool = False) -> LoadedRun:
    """Load runs/<project>/<group>/ for a notebook. A seed still training gives its best
    weights so far (best.pt) and the epochs it has written. trust=True: the folder's config may
    name code outside this project and the allowed packages (only for folders you trust)."""
    import numpy as np
    group_dir = run_folder(Path(path))
    config = saved_config(group_dir, trust, "pass trust=True to load_run if you trust this folder")
    run = LoadedRun(config, {}, {}, {})
    rows = read_metrics(group_dir)
    for seed in config.seeds:
        seed_dir = group_dir / str(seed)
        weights = [f for f in (seed_dir / "model.pt", seed_dir / "best.pt") if f.exists()]
        if weights:
            run.models[seed] = trained_model(config, weights[0], device)
        if str(seed) in rows:
            run.metrics[seed] = {k: np.array([row[k] for row in rows[str(seed)]], dtype=float)
                                 for k in config.columns()}
        if (seed_dir / "result.json").exists():
            run.results[seed] = json.loads((seed_dir / "result.json").read_text())
    return run


def run_folder(path: Path) -> Path:
    if not (path / "config.yaml").is_file():
        raise ConfigError(str(path), "", "is not a run folder (runs/<project>/<group>/ with a config.yaml)")
    return path


def load_study(name: str, storage: str | None = None):
    """The Optuna study `name`: from `storage`, or else from runs/<project>/optuna.db."""
    return find_study(name, None, storage)


def validation_loss(config, model, val_set, device: str) -> float:
    return validation(config, model, val_set, device)["val_loss"]


def validation(config, model, val_set, device: str) -> dict[str, float]:
    """val_loss and every metric, through the Trainer's own validation."""
    from engine.trainer import Trainer
    trainer = Trainer(model, None, config.trainer_settings(), criterion=config.create_criterion(),
                      device=device)
    return trainer.evaluate(trainer.on_device(val_set))


def analyze_group(group_dir: Path, seeds: list[str], device: str, trust: bool = False) -> dict[str, float]:
    """Reload each seed, print its validation loss, save the plots; returns {seed: loss}."""
    config = saved_config(group_dir, trust)  # refused before anything is written
    plots = group_dir / "plots"
    plots.mkdir(exist_ok=True)
    losses = {}
    val_set = None
    for seed in seeds:
        model = trained_model(config, group_dir / seed / "model.pt", device)
        if val_set is None:
            _, val_set = config.load_data()
        values = validation(config, model, val_set, device)
        losses[seed] = values.pop("val_loss")
        metrics = "".join(f", {name} {value:.6g}" for name, value in values.items())
        print(f"{group_dir}/{seed}: validation loss {losses[seed]:.6g}{metrics}")
        drawn = plot_seed(model, val_set, device, plots, seed, f"{group_dir.name} seed {seed}")
        if not drawn.endswith(".png"):
            print(f"{group_dir}/{seed}: {drawn}")
    plot_losses(group_dir, plots / "losses.png")
    print(f"plots: {plots}/")
    return losses


def report_study(args: argparse.Namespace) -> int:
    """--study: the report, then the best trial's run; 1 when no trial completed."""
    study = find_study(args.study, args.project, args.storage)
    best_dir = best_run_folder(study)
    if best_dir is not None and not args.json:  # refused before the report is written
        saved_config(best_dir, args.trust)
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
            seeds = [args.seed] if args.seed else seeds_in(group_dir)
            analyze_group(group_dir, seeds, args.device, args.trust)
    return 0 if report["best"] is not None else 1


def best_run_folder(study) -> Path | None:
    """The folder of the study's best trial, if one completed and says where it ran."""
    try:
        run_dir = study.best_trial.user_attrs.get("run_dir")
    except ValueError:  # no completed trial
        return None
    return Path(run_dir) if run_dir else None


def dashboard(args: argparse.Namespace) -> int:
    """--study --dashboard: Optuna Dashboard over the study's storage, until Ctrl-C."""
    from engine.studies import serve_dashboard, study_storage
    serve_dashboard(args.study, study_storage(args.study, args.project, args.storage),
                    8080 if args.port is None else args.port)
    return 0


def sync(args: argparse.Namespace) -> int:
    """--sync: `wandb sync` over the group's offline runs; --dry-run prints the command only."""
    import shlex

    from engine.wandb_run import offline_runs, sync_command
    if not (args.project and args.group):
        raise ConfigError("--sync", "", "give --project and --group")
    group_dir = run_folder(RUNS_DIR / args.project / args.group)
    if not offline_runs(group_dir):
        raise ConfigError(str(group_dir), "", "holds no offline wandb run")
    command = sync_command(group_dir)
    print(shlex.join(command), flush=True)
    return 0 if args.dry_run else subprocess.run(command).returncode


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
    analyze_group(group_dir, seeds, args.device, args.trust)
    return 0


def main(argv: list[str] | None = None) -> int:
    privacy = __doc__[__doc__.index("Optuna Dashboard has no login"):__doc__.index("In a notebook")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=privacy,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project")
    parser.add_argument("--group")
    parser.add_argument("--seed")
    parser.add_argument("--study", help="report a study's best trial and analyze its run")
    parser.add_argument("--storage", metavar="URL",
                        help="with --study: the Optuna storage that holds it "
                             "(default: runs/<project>/optuna.db)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="with --study: print the report as JSON")
    parser.add_argument("--dashboard", action="store_true",
                        help="with --study: serve Optuna Dashboard on 127.0.0.1 until Ctrl-C. It has no "
                             "login and can delete studies, and every user of this machine can reach "
                             "127.0.0.1: on a shared login node, run it on your own computer over a copy "
                             "of the storage (see below)")
    parser.add_argument("--port", type=int, help="with --dashboard: the port (default 8080; 0 = a free one)")
    parser.add_argument("--sync", action="store_true",
                        help="with --project and --group: upload the group's offline wandb runs (wandb sync)")
    parser.add_argument("--dry-run", action="store_true", help="with --sync: print the command, run nothing")
    parser.add_argument("--trust", action="store_true",
                        help="let the run folder's config name code outside this project and torch.nn, "
                             "torch.optim, optuna.samplers, optuna.pruners (only for folders you trust)")
    args = parser.parse_args(argv)
    sys.path.insert(1, os.getcwd())
    try:
        for flag, given, needed, present in (("--storage", args.storage, "--study", args.study),
                                             ("--dashboard", args.dashboard, "--study", args.study),
                                             ("--port", args.port is not None, "--dashboard", args.dashboard),
                                             ("--dry-run", args.dry_run, "--sync", args.sync),
                                             ("--trust", args.trust, "the analysis of a run folder",
                                              not (args.sync or args.dashboard or args.json))):
            if given and not present:  # never silently ignored
                raise ConfigError(flag, "", f"only {needed} uses it")
        for flag, name in (("--project", args.project), ("--group", args.group), ("--seed", args.seed)):
            if name is not None and name_problem(name):  # plots are written there: never above runs/
                raise ConfigError(flag, "", name_problem(name))
        if args.sync:
            return sync(args)
        if args.dashboard:
            return dashboard(args)
        return report_study(args) if args.study else report_runs(args)
    except ConfigError as e:  # bad input: one line, exit 2, as in main.py
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
