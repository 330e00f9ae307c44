"""A study's report, as `python analyze.py --study NAME` prints it: the trials by state, the best
trial and its parameters, their importances (Optuna's evaluator), a warning for each best value
at the edge of its range, and the PNGs (history, importances, the best trial's losses).

    report = study_report(study, Path("runs/<project>/<study>_report"))  # a dict (--json prints it)
    print_report(report)
"""
from __future__ import annotations

from pathlib import Path

from engine.plots import plot_losses


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
