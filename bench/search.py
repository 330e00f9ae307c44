"""Benchmark: does our predicted-final-loss pruner (engine.pruner.PFLPruner) find as good
a configuration as Optuna's MedianPruner while training fewer epochs?

    python bench/search.py [--trials 12] [--repeats 3] [--epochs 50]

Run it from the repository root. It runs the same fixed-budget Optuna search on
the shipped task three ways, through the project's own `engine.search.run_study`:

    pfl     engine.pruner.PFLPruner with the pruner_config of configs/optimize_template.yaml
    median  optuna.pruners.MedianPruner, n_startup_trials and n_warmup_steps set
            to PFL's n_startup_trials and n_warmup_epochs
    none    no pruning (the reference: what the budget finds unpruned)

The run config is configs/run_template.yaml with one seed (its first) and wandb
disabled; the search space is configs/optimize_template.yaml's. Every method uses
the same TPE sampler seed, and the whole comparison is repeated for `--repeats`
sampler seeds (42, 43, ...), because a single search is noisy. `--epochs` overrides
the template's epochs (and the cosine schedule's T_max with it); the default keeps
the template's 50. Torch runs on one thread: for these small MLPs that is faster
than two, and steadier when other processes share the CPU.

Measured per search: the best value found (the study's best val_loss), the total
epochs trained (every epoch is reported to Optuna, so it is the sum over trials of
len(trial.intermediate_values)) and the wall time. The summary prints the means and
the PFL/Median ratios. Nothing is written to the repository: runs and the Optuna
databases go to a temporary folder that is removed at the end. The default takes
about 6-8 minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bars
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from engine import search  # noqa: E402
from config import OptimizeConfig, RunConfig, load_yaml  # noqa: E402
from engine.pruner import PFLPruner  # noqa: E402

RUN_TEMPLATE = REPO_ROOT / "configs" / "run_template.yaml"
OPTIMIZE_TEMPLATE = REPO_ROOT / "configs" / "optimize_template.yaml"
METHODS = ("pfl", "median", "none")


@dataclass
class SearchResult:
    method: str
    best_value: float
    total_epochs: int
    complete: int
    pruned: int
    failed: int
    wall_s: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per search (default 12)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="sampler seeds to repeat the comparison over (default 3)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the template's epochs and scheduler T_max (default: keep them)")
    args = parser.parse_args(argv)
    for name in ("trials", "repeats", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer")
    return args


def bench_run_config(epochs: int | None) -> RunConfig:
    data = load_yaml(RUN_TEMPLATE)
    data["seeds"] = data["seeds"][:1]
    data["wandb"] = {**(data.get("wandb") or {}), "mode": "disabled"}
    if epochs is not None:
        data["epochs"] = epochs
        if "T_max" in (data.get("scheduler_config") or {}):
            data["scheduler_config"]["T_max"] = epochs
    return RunConfig.from_dict(data, source=f"{RUN_TEMPLATE.name} (bench)")


def pruner_settings(template: dict) -> dict[str, tuple[str | None, dict]]:
    """Each method's pruner import path and keyword arguments."""
    ours = dict(template.get("pruner_config") or {})
    built = PFLPruner(**ours)  # its defaults fill what the template leaves out
    median = {"n_startup_trials": built.n_startup_trials, "n_warmup_steps": built.n_warmup_epochs}
    return {"pfl": ("engine.pruner.PFLPruner", ours),
            "median": ("optuna.pruners.MedianPruner", median),
            "none": (None, {})}


def run_search(run_config: RunConfig, template: dict, method: str, seed: int, trials: int,
               workdir: Path) -> SearchResult:
    pruner_path, pruner_config = pruner_settings(template)[method]
    name = f"bench_{method}_s{seed}"
    opt_config = OptimizeConfig.from_dict(
        {**template, "trials": trials, "seed": seed, "study_name": name,
         "pruner": pruner_path, "pruner_config": pruner_config,
         "storage": f"sqlite:///{workdir / (name + '.db')}"},
        source=f"{OPTIMIZE_TEMPLATE.name} (bench {method})")
    opt_config.check_against(run_config)
    start = time.perf_counter()
    study = search.run_study(run_config, opt_config)
    wall = time.perf_counter() - start
    trials_done = study.get_trials(deepcopy=False)
    count = lambda state: sum(t.state == state for t in trials_done)  # noqa: E731
    best = study.best_value if count(TrialState.COMPLETE) else float("nan")
    return SearchResult(method, best, sum(len(t.intermediate_values) for t in trials_done),
                        count(TrialState.COMPLETE), count(TrialState.PRUNED), count(TrialState.FAIL), wall)


def seed_table(seed: int, results: list[SearchResult], monitor: str) -> str:
    lines = [f"sampler seed {seed}",
             f"  {'method':<8} {'best ' + monitor:>14} {'epochs':>7} {'complete':>9} {'pruned':>7}"
             f" {'failed':>7} {'wall s':>7}"]
    for r in results:
        lines.append(f"  {r.method:<8} {r.best_value:>14.6g} {r.total_epochs:>7} {r.complete:>9}"
                     f" {r.pruned:>7} {r.failed:>7} {r.wall_s:>7.1f}")
    return "\n".join(lines)


def summary(all_results: list[list[SearchResult]], monitor: str, minimize: bool) -> str:
    by_method = {m: [r for results in all_results for r in results if r.method == m] for m in METHODS}
    mean = {m: {key: statistics.fmean(getattr(r, key) for r in rs)
                for key in ("best_value", "total_epochs", "wall_s")} for m, rs in by_method.items()}
    lines = [f"summary over {len(all_results)} sampler seed(s)",
             f"  {'method':<8} {'mean best ' + monitor:>19} {'mean epochs':>12} {'mean wall s':>12}"]
    for m in METHODS:
        lines.append(f"  {m:<8} {mean[m]['best_value']:>19.6g} {mean[m]['total_epochs']:>12.1f}"
                     f" {mean[m]['wall_s']:>12.1f}")
    epoch_ratio = mean["pfl"]["total_epochs"] / mean["median"]["total_epochs"]
    best_ratio = mean["pfl"]["best_value"] / mean["median"]["best_value"]
    better_or_same = (mean["pfl"]["best_value"] <= mean["median"]["best_value"] if minimize
                      else mean["pfl"]["best_value"] >= mean["median"]["best_value"])
    verdict = "yes" if better_or_same and epoch_ratio < 1 else "no"
    lines += [f"PFL/Median total epochs: {epoch_ratio:.3f}",
              f"PFL/Median mean best {monitor}: {best_ratio:.4f}"
              f" ({'lower' if minimize else 'higher'} is better)",
              f"PFL at least as good as Median (same or better best value, fewer epochs): {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    run_config = bench_run_config(args.epochs)
    template = load_yaml(OPTIMIZE_TEMPLATE)
    workdir = Path(tempfile.mkdtemp(prefix="bench_search_"))
    here = os.getcwd()
    os.chdir(workdir)  # runs/ is relative: the trials' folders go there
    print(f"{args.trials} trials per search, {run_config.epochs} epochs per trial, "
          f"seed {run_config.seeds[0]}, device {run_config.device}; "
          f"PFL {pruner_settings(template)['pfl'][1]}, Median {pruner_settings(template)['median'][1]}",
          flush=True)
    start = time.perf_counter()
    all_results = []
    try:
        for seed in range(42, 42 + args.repeats):
            results = [run_search(run_config, template, m, seed, args.trials, workdir) for m in METHODS]
            all_results.append(results)
            print(seed_table(seed, results, run_config.monitor), flush=True)
    finally:
        os.chdir(here)
        shutil.rmtree(workdir, ignore_errors=True)
    print(summary(all_results, run_config.monitor, run_config.mode == "min"))
    print(f"bench wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
