"""The predicted-final-loss pruner: the curve fit on curves with known answers, and
pruning decisions inside real Optuna studies (state only in the storage)."""
import math

import numpy as np
import optuna
import pytest

from engine.pruner import PFLPruner, fit_exponential, predict_final

STEPS = list(range(1, 21))


def test_clean_exponential_decay_is_recovered():
    values = [0.2 + 1.5 * math.exp(-0.3 * (t - 1)) for t in STEPS]
    c, a, b = fit_exponential(STEPS, values)
    assert (c, a, b) == pytest.approx((0.2, 1.5, 0.3), rel=1e-3)
    assert predict_final(STEPS, values, 100) == pytest.approx(0.2 + 1.5 * math.exp(-0.3 * 99), abs=1e-3)


def test_plateau_predicts_the_plateau():
    assert predict_final(STEPS, [0.5] * 20, 100) == pytest.approx(0.5, abs=1e-9)


def test_noisy_decay_lands_near_the_truth():
    rng = np.random.default_rng(0)
    values = [0.1 + math.exp(-0.2 * t) + rng.normal(0, 0.01) for t in STEPS]
    truth = 0.1 + math.exp(-0.2 * 60)
    assert predict_final(STEPS, values, 60) == pytest.approx(truth, abs=0.03)


def test_increasing_curve_extrapolates_upward():
    values = [0.1 * t for t in STEPS]
    c, a, b = fit_exponential(STEPS, values)
    assert c + a * math.exp(-b * (40 - STEPS[0])) >= values[-1]
    # The prediction is never worse than what the trial already reached (its value is its best epoch).
    assert predict_final(STEPS, values, 40) == pytest.approx(min(values))


def test_maximize_mirrors_minimize():
    values = [0.3 + 0.8 * math.exp(-0.25 * t) for t in STEPS]
    down = predict_final(STEPS, values, 50, minimize=True)
    up = predict_final(STEPS, [-v for v in values], 50, minimize=False)
    assert up == pytest.approx(-down, rel=1e-6)


def curve(final, t, start=1.0, rate=0.3):
    return final + (start - final) * math.exp(-rate * t)


def finish_trials(study, finals, epochs=30):
    for final in finals:
        trial = study.ask()
        trial.set_user_attr("epochs", epochs)
        for t in range(1, epochs + 1):
            trial.report(curve(final, t), t)
        study.tell(trial, curve(final, epochs))


def running(study, final, upto, epochs=30):
    """A trial that has reported `upto` epochs; returns its should_prune()."""
    trial = study.ask()
    trial.set_user_attr("epochs", epochs)
    for t in range(1, upto + 1):
        trial.report(curve(final, t), t)
    return trial.should_prune()


def test_prunes_a_hopeless_trial_and_keeps_a_promising_one():
    study = optuna.create_study(pruner=PFLPruner(n_startup_trials=3, n_warmup_epochs=8, top_k=2))
    assert not running(study, final=5.0, upto=12)  # nothing finished yet: no bar to compare with
    finish_trials(study, [0.1, 0.12, 0.2])
    assert not running(study, final=5.0, upto=5)   # still warming up
    assert running(study, final=0.9, upto=10)      # heads for 0.9; the 2nd best finished is 0.12
    assert not running(study, final=0.05, upto=10)  # heads below the best
    assert running(study, final=math.nan, upto=3)  # NaN: pruned at once, even in warm-up


def test_maximize_studies_prune_the_low_curves():
    study = optuna.create_study(direction="maximize",
                                pruner=PFLPruner(n_startup_trials=2, n_warmup_epochs=8, top_k=1))
    for final in (0.9, 0.8):
        trial = study.ask()
        trial.set_user_attr("epochs", 30)
        for t in range(1, 31):
            trial.report(1 - curve(1 - final, t), t)
        study.tell(trial, final)
    low = study.ask()
    low.set_user_attr("epochs", 30)
    for t in range(1, 11):
        low.report(1 - curve(1 - 0.3, t), t)  # heads for 0.3 < 0.9
    assert low.should_prune()
    high = study.ask()
    high.set_user_attr("epochs", 30)
    for t in range(1, 11):
        high.report(1 - curve(1 - 0.95, t), t)  # heads for 0.95
    assert not high.should_prune()


def test_state_lives_in_the_storage(tmp_path):
    """Two handles on one SQLite study (as two worker processes would have), each with a
    fresh pruner object, decide alike: the decision uses only what the storage holds."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = optuna.create_study(storage=storage, study_name="s", pruner=PFLPruner(3, 8, 2))
    finish_trials(first, [0.1, 0.12, 0.2])
    second = optuna.load_study(storage=storage, study_name="s", pruner=PFLPruner(3, 8, 2))
    assert running(second, final=0.9, upto=10)
    assert not running(second, final=0.05, upto=10)
    assert set(vars(PFLPruner(3, 8, 2))) <= {"n_startup_trials", "n_warmup_epochs", "top_k", "final_epoch"}


def test_the_last_epoch_is_never_pruned():
    study = optuna.create_study(pruner=PFLPruner(n_startup_trials=1, n_warmup_epochs=3, top_k=1))
    finish_trials(study, [0.1], epochs=10)
    assert not running(study, final=0.9, upto=10, epochs=10)


def test_prediction_from_finished_curves():
    import optuna
    from optuna.distributions import FloatDistribution

    from engine.pruner import predict_from_finished
    finished = [optuna.trial.create_trial(value=final, params={"x": 0.5},
                                          distributions={"x": FloatDistribution(0, 1)},
                                          intermediate_values={s: curve(final, s) for s in range(1, 31)})
                for final in (0.1, 0.3)]
    # At epoch 10 the first trial stood at curve(0.1, 10) and ended at 0.1: the biggest drop.
    factor = 0.1 / curve(0.1, 10)
    assert predict_from_finished(10, 2.0, finished) == pytest.approx(2.0 * factor)
    assert predict_from_finished(10, -1.0, finished) is None  # needs positive values
