"""Optuna search through main.py and run_study: resume, seeding, reporting, failures."""
import optuna
import pytest
from optuna.trial import TrialState

from config import OptimizeConfig, RunConfig
from conftest import run_main, write_yaml
from engine.search import run_study

SPACE = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 3e-2, "log": True}},
         "batch_size": {"type": "categorical", "choices": [32, 64]},
         "epochs": {"type": "int", "min": 3, "max": 4}}


def load(workdir, project="test"):
    storage = f"sqlite:///{workdir / 'runs' / project / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_three_trial_study_resumes_and_exports_the_best(workdir, tiny):
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 3, "pruner": None, "search_space": SPACE})
    first = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert first.returncode == 0, first.stderr
    study = load(workdir)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:  # every epoch reported: Optuna's own plots have data
        assert sorted(t.intermediate_values) == list(range(1, t.params["epochs"] + 1))
        assert t.value == min(t.intermediate_values.values())  # best epoch, the metric the study optimises
        assert (workdir / t.user_attrs["run_dir"] / "7" / "model.pt").exists()
    best = study.best_trial
    assert f"best trial {best.number}" in first.stdout and best.user_attrs["run_dir"] in first.stdout

    best_yaml = workdir / "runs" / "test" / f"{study.study_name}_best.yaml"
    best_config = RunConfig.from_yaml(best_yaml)
    assert best_config.optimizer_config["lr"] == best.params["optimizer_config.lr"]
    assert best_config.batch_size == best.params["batch_size"] and best_config.group is None

    again = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert len(load(workdir).get_trials()) == 3  # finished at `trials`, not 3 more

    write_yaml(workdir / "o.yaml", {"trials": 4, "seed": 3, "pruner": None, "search_space": SPACE})
    more = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert more.returncode == 0, more.stderr
    assert len(load(workdir).get_trials()) == 4  # the same study, continued

    trained = run_main("--run_config", str(best_yaml), cwd=workdir)  # ready to train as it is
    assert trained.returncode == 0, trained.stderr


def params_of(workdir, tiny, name, sampler="optuna.samplers.TPESampler", seed=11, space=SPACE, trials=3):
    opt = OptimizeConfig.from_dict({"trials": trials, "seed": seed, "study_name": name, "pruner": None,
                                    "sampler": sampler, "search_space": space})
    study = run_study(RunConfig.from_dict(tiny), opt)
    return [t.params for t in study.get_trials()]


def test_seeded_sampler_repeats_the_search(workdir, tiny):
    tiny["epochs"] = 2
    a = params_of(workdir, tiny, "a", sampler="optuna.samplers.RandomSampler")
    b = params_of(workdir, tiny, "b", sampler="optuna.samplers.RandomSampler")
    c = params_of(workdir, tiny, "c", sampler="optuna.samplers.RandomSampler", seed=12)
    assert a == b != c


def test_grid_sampler_over_categorical_keys(workdir, tiny):
    tiny["epochs"] = 2
    space = {"batch_size": {"type": "categorical", "choices": [32, 64]},
             "net_config": {"nodes": {"type": "categorical", "choices": [4, 8]}}}
    params = params_of(workdir, tiny, "grid", sampler="optuna.samplers.GridSampler", space=space, trials=4)
    assert (sorted((p["batch_size"], p["net_config.nodes"]) for p in params)
            == [(32, 4), (32, 8), (64, 4), (64, 8)])


def test_failing_and_diverging_trials_do_not_stop_the_study(workdir, tiny):
    tiny.update(optimizer="torch.optim.SGD", scheduler=None, scheduler_config={}, epochs=3)
    space = {"optimizer_config": {"lr": {"type": "categorical", "choices": [1e-2, 1e8]}},
             "net_config": {"layers": {"type": "categorical", "choices": [2, 0]}}}
    opt = OptimizeConfig.from_dict({"trials": 8, "seed": 0, "sampler": "optuna.samplers.GridSampler",
                                    "search_space": space, "pruner": None})
    study = run_study(RunConfig.from_dict(tiny), opt)
    by_params = {(t.params["optimizer_config.lr"], t.params["net_config.layers"]): t
                 for t in study.get_trials()}
    assert len(by_params) == 4
    assert by_params[(1e-2, 2)].state == TrialState.COMPLETE
    assert by_params[(1e8, 2)].state == TrialState.PRUNED
    assert "diverged" in by_params[(1e8, 2)].user_attrs["reason"]
    for lr in (1e-2, 1e8):  # the model rejects layers=0: recorded, not fatal
        assert by_params[(lr, 0)].state == TrialState.FAIL
        assert "net_config: model.MLP rejected it" in by_params[(lr, 0)].user_attrs["reason"]


def test_maximize_direction_follows_the_run_config(workdir, tiny):
    tiny.update(mode="max", epochs=2)
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "search_space": SPACE})
    study = run_study(RunConfig.from_dict(tiny), opt)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.best_value == max(t.value for t in study.get_trials() if t.value is not None)
    for t in study.get_trials():
        assert t.value == max(t.intermediate_values.values())


LR = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}


def bar_search(workdir, tiny, *extra):
    """A 2-trial search through main.py's own main(), in this process; what it wrote to stderr."""
    import main
    tiny.update(epochs=2)
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 2, "seed": 0, "pruner": None, "study_name": "bar",
                                    "search_space": LR})
    assert main.main(["--run_config", "c.yaml", "--optimize_config", "o.yaml", *extra]) == 0


def test_a_search_draws_one_bar_over_its_trials_above_the_seed_bars(workdir, tiny, capsys):
    bar_search(workdir, tiny)
    err = capsys.readouterr().err
    best = optuna.load_study(study_name="bar", storage=f"sqlite:///{workdir}/runs/test/optuna.db").best_value
    assert "study bar:   0%|" in err and "2/2 [" in err and f"best={best:.4g}]" in err
    assert err.index("study bar:") < err.index("bar_t0000 seed 7:")  # opened first: drawn above


@pytest.mark.parametrize("extra,env", [(["--workers", "1"], {}), ([], {"SLURM_JOB_ID": "123"})])
def test_workers_and_slurm_jobs_draw_no_bar_over_trials(workdir, tiny, capsys, monkeypatch, extra, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bar_search(workdir, tiny, *extra)
    err = capsys.readouterr().err
    assert "study bar" not in err and "bar_t0001 seed 7:" in err  # the seeds' bars still draw


@pytest.mark.slow
def test_tqdm_disable_hides_the_bar_over_trials(workdir, tiny, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm reads it when imported: a fresh process
    tiny.update(epochs=1)
    write_yaml(workdir / "o.yaml", {"trials": 1, "seed": 0, "pruner": None, "study_name": "quiet",
                                    "search_space": LR})
    write_yaml(workdir / "c.yaml", tiny)
    result = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "study quiet" not in result.stderr and "trial/s" not in result.stderr
    assert "best trial" in result.stdout


def test_a_configuration_killed_three_times_is_not_tried_again(capsys):
    """What Optuna's heartbeat hands over when a trial's process died: its parameters are queued
    again (with the first trial's number, so the retry continues its folder) unless they have now
    killed their process three times (out of memory each time): then the study samples others."""
    from engine.search import MAX_KILLED, retry_killed
    study = optuna.create_study()
    space = {"optimizer_config.lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)}
    trial = study.ask(space)
    for tries in range(1, MAX_KILLED + 1):
        study.tell(trial, state=TrialState.FAIL)  # as Optuna's fail_stale_trials fails it
        retry_killed(study, study.trials[-1])
        if tries < MAX_KILLED:
            trial = study.ask(space)  # the queued retry
            assert trial.params == study.trials[0].params
            assert trial.user_attrs == {"retry_of": 0, "killed": tries}
    assert study.get_trials(states=(TrialState.WAITING,)) == []  # given up
    assert capsys.readouterr().err.splitlines() == [
        "trial 0 stopped beating (its process died); its parameters run again",
        "trial 1 stopped beating (its process died); its parameters run again",
        "trial 2 stopped beating: its process died 3 times with these parameters, which are not tried again"]
