"""The predicted-final-loss (PFL) pruner: stop a trial whose learning curve,
extrapolated to its last epoch, cannot reach the top `top_k` finished trials.

    pruner: pruner.PFLPruner
    pruner_config: {n_startup_trials: 4, n_warmup_epochs: 8, top_k: 4}

The pruner holds no state of its own: every decision is made from what the
Optuna storage holds (each trial's reported values, the finished trials'
values, and the `epochs` user attribute that the search sets on each trial),
so it works unchanged when many processes share one study.
"""
from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState


def fit_exponential(steps, values) -> tuple[float, float, float]:
    """Least-squares fit of v(t) = c + a·exp(-b·(t - t0)) with b ≥ 0, t0 = steps[0].

    For a fixed rate b the model is linear in (c, a), so only b is searched:
    a log-spaced grid, then a golden-section refinement. Numpy only, and robust
    on plateaus (a ≈ 0), noise and rising curves (a < 0). Returns (c, a, b).
    """
    t = np.asarray(steps, dtype=float) - float(steps[0])
    v = np.asarray(values, dtype=float)

    def solve(b: float) -> tuple[float, np.ndarray]:
        basis = np.stack([np.ones_like(t), np.exp(-b * t)], axis=1)
        coef, *_ = np.linalg.lstsq(basis, v, rcond=None)
        return float(np.sum((basis @ coef - v) ** 2)), coef

    log_rates = np.linspace(math.log(1e-4), math.log(10.0), 120)
    errors = [solve(math.exp(r))[0] for r in log_rates]
    i = int(np.argmin(errors))
    lo, hi = log_rates[max(i - 1, 0)], log_rates[min(i + 1, len(log_rates) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if solve(math.exp(m1))[0] < solve(math.exp(m2))[0]:
            hi = m2
        else:
            lo = m1
    b = math.exp((lo + hi) / 2)
    _, (c, a) = solve(b)
    return float(c), float(a), b


def predict_final(steps, values, final_step: int, minimize: bool = True) -> float:
    """The best value the curve can be expected to reach by `final_step`.

    Fitted on the later half of the curve (the early transient says little about
    the end), and never worse than the best value already seen: a trial's value is
    its best epoch, so that is what the prediction is compared against.
    """
    half = len(steps) // 2 if len(steps) >= 10 else 0
    c, a, b = fit_exponential(steps[half:], values[half:])
    extrapolated = c + a * math.exp(-b * (final_step - steps[half]))
    seen = min(values) if minimize else max(values)
    return min(seen, extrapolated) if minimize else max(seen, extrapolated)


class PFLPruner(optuna.pruners.BasePruner):
    """Prune when the predicted final value is worse than the `top_k`-th best finished trial.

    n_startup_trials: finished trials needed before anything is pruned.
    n_warmup_epochs: epochs a trial runs before its curve is judged.
    top_k: the bar is the k-th best finished value (the worst of them while fewer finished).
    final_epoch: the epoch to extrapolate to when a trial has no `epochs` user attribute.
    """

    def __init__(self, n_startup_trials: int = 4, n_warmup_epochs: int = 8, top_k: int = 4,
                 final_epoch: int | None = None):
        if n_startup_trials < 1 or n_warmup_epochs < 3 or top_k < 1:
            raise ValueError("need n_startup_trials >= 1, n_warmup_epochs >= 3 (a curve to fit), top_k >= 1")
        self.n_startup_trials = n_startup_trials
        self.n_warmup_epochs = n_warmup_epochs
        self.top_k = top_k
        self.final_epoch = final_epoch

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        reported = trial.intermediate_values
        if not reported:
            return False
        steps = sorted(reported)
        values = [reported[s] for s in steps]
        if not math.isfinite(values[-1]):
            return True  # diverged: nothing to wait for
        if len(steps) < self.n_warmup_epochs:
            return False
        finished = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and math.isfinite(t.value)]
        if len(finished) < self.n_startup_trials:
            return False
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        final_step = trial.user_attrs.get("epochs") or self.final_epoch or steps[-1]
        if steps[-1] >= final_step:
            return False  # the last epoch: let it finish and be counted
        predicted = predict_final(steps, values, final_step, minimize)
        ranked = sorted(finished, reverse=not minimize)
        bar = ranked[min(self.top_k, len(ranked)) - 1]
        return predicted > bar if minimize else predicted < bar
