"""analyze.py reloads what was trained and draws its plots."""
import json
import re
import subprocess
import sys

import pytest

import analyze
from config import OptimizeConfig, RunConfig
from conftest import ROOT, child_env
from engine.search import run_study
from engine.errors import ConfigError
from engine.run import run


def png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_analysis_reloads_the_models_and_saves_plots(workdir, tiny, capsys):
    tiny["seeds"] = [1, 2]
    result = run(RunConfig.from_dict(tiny))
    group = result.group_dir.name
    assert analyze.main(["--project", "test", "--group", group]) == 0
    out = capsys.readouterr().out
    reported = {m[0]: float(m[1]) for m in re.findall(r"/(\d+): validation loss (\S+)", out)}
    # The reloaded weights give back the best validation loss recorded while training.
    assert reported == pytest.approx({str(s.seed): s.best_value for s in result.seeds}, rel=1e-5)
    plots = result.group_dir / "plots"
    assert png(plots / "prediction_1.png") and png(plots / "prediction_2.png") and png(plots / "losses.png")


def test_study_analysis_uses_the_best_trial(workdir, tiny, capsys):
    tiny["epochs"] = 2
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "study_name": "s", "pruner": None,
                                    "search_space": {
                                        "optimizer_config": {
                                            "lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    assert analyze.main(["--study", "s"]) == 0
    out = capsys.readouterr().out
    assert f"best trial {study.best_trial.number}" in out
    assert png(workdir / study.best_trial.user_attrs["run_dir"] / "plots" / "losses.png")


@pytest.mark.slow
def test_interactive_prompts(workdir, tiny):
    result = run(RunConfig.from_dict({**tiny, "seeds": [1, 2]}))
    run(RunConfig.from_dict({**tiny, "group": "other"}))
    groups = sorted(p.name for p in (workdir / "runs" / "test").iterdir())
    # One project (taken without asking), then pick the group by number and seed "2" by name.
    answers = f"{groups.index(result.group_dir.name)}\n2\n"
    done = subprocess.run([sys.executable, str(ROOT / "analyze.py")], cwd=workdir, input=answers,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    # Not a terminal: scripts must say what they want instead of hanging on a prompt.
    assert done.returncode == 2 and "--project and --group" in done.stderr
    proc = subprocess.run(
        ["script", "-qec", f"{sys.executable} {ROOT / 'analyze.py'}", "/dev/null"], cwd=workdir,
        input=answers, capture_output=True, text=True, timeout=120) if _has_script() else None
    if proc is None:
        pytest.skip("the `script` tool (util-linux) is needed to give analyze.py a terminal")
    assert proc.returncode == 0, proc.stdout
    assert "/2: validation loss" in proc.stdout and "/1: validation loss" not in proc.stdout
    assert png(result.group_dir / "plots" / "prediction_2.png")


def _has_script():
    import shutil
    return shutil.which("script") is not None


def test_a_study_without_a_completed_trial_is_reported(workdir, tiny, capsys):
    tiny["epochs"] = 2
    # The model rejects both choices: every trial fails.
    space = {"net_config": {"layers": {"type": "categorical", "choices": [0, -1]}}}
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "study_name": "none", "pruner": None,
                                    "search_space": space})
    run_study(RunConfig.from_dict(tiny), opt)
    assert analyze.main(["--study", "none"]) == 1  # nothing to analyze, and no traceback
    out = capsys.readouterr().out
    assert "0 complete, 0 pruned, 2 fail" in out and "no trial completed" in out
    assert "net_config: model.MLP rejected it" in out  # why, per trial
    assert analyze.main(["--study", "none", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["best"] is None and report["trials"]["fail"] == 2 and len(report["reasons"]) == 2


def test_a_study_in_another_storage(workdir, tiny, capsys):
    tiny["epochs"] = 2
    url = f"sqlite:///{workdir / 'elsewhere.db'}"
    lr = {"type": "float", "min": 1e-3, "max": 1e-2}
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "study_name": "away", "pruner": None,
                                    "storage": url, "search_space": {"optimizer_config": {"lr": lr}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    capsys.readouterr()
    assert analyze.main(["--study", "away"]) == 2  # not in runs/<project>/optuna.db
    assert capsys.readouterr().err == ("error: --study: no study 'away' in runs/ "
                                       "(no optuna.db or optuna.journal found)\n")
    assert analyze.main(["--study", "away", "--storage", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["number"] == study.best_trial.number


@pytest.mark.slow
@pytest.mark.parametrize("args,line", [
    (["--study", "nope"], "error: --study: no study 'nope' in runs/ (no optuna.db or optuna.journal found)"),
    (["--study", "s", "--storage", "nosuchdb://user:secret@host/db"],
     "error: --storage: cannot open nosuchdb://user:***@host/db: "),
    (["--storage", "sqlite:///x.db"], "error: --storage: only --study uses it"),
    (["--project", "..", "--group", ".."], "error: --project: must name a folder of its own, not '..'"),
])
def test_bad_study_arguments_are_one_line(workdir, args, line):
    done = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], cwd=workdir, env=child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(line) and len(done.stderr.splitlines()) == 1
    assert "secret" not in done.stderr and not (workdir / "runs").exists()


def test_load_run_gives_the_config_and_each_seeds_model_metrics_and_result(workdir, tiny):
    import numpy as np
    tiny["seeds"] = [1, 2]
    result = run(RunConfig.from_dict(tiny))
    loaded = analyze.load_run(result.group_dir)
    assert loaded.config == RunConfig.from_yaml(result.group_dir / "config.yaml")
    _, val_set = loaded.config.load_data()
    for seed in result.seeds:
        metrics = loaded.metrics[seed.seed]
        assert list(metrics) == loaded.config.columns()
        assert all(isinstance(v, np.ndarray) and len(v) == tiny["epochs"] for v in metrics.values())
        assert metrics["val_loss"].min() == pytest.approx(seed.best_value)
        assert loaded.results[seed.seed]["status"] == "completed"
        assert loaded.results[seed.seed]["best_value"] == seed.best_value
        # The best epoch's weights: they give back the best validation loss.
        model = loaded.models[seed.seed]
        assert analyze.validation_loss(loaded.config, model, val_set, "cpu") == pytest.approx(seed.best_value,
                                                                                            rel=1e-5)


def test_load_study_and_bad_input(workdir, tiny):
    tiny["epochs"] = 2
    opt = OptimizeConfig.from_dict({"trials": 2, "seed": 0, "study_name": "nb", "pruner": None,
                                    "search_space": {"optimizer_config": {"lr": {"type": "float", "min": 1e-3,
                                                                                 "max": 1e-2}}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    loaded = analyze.load_study("nb")
    assert loaded.best_trial.number == study.best_trial.number and len(loaded.trials) == 2
    with pytest.raises(ConfigError, match="no study 'missing'"):
        analyze.load_study("missing")
    with pytest.raises(ConfigError, match="is not a run folder"):
        analyze.load_run(workdir / "runs" / "test")


def test_a_study_in_a_journal_file_is_found_like_one_in_sqlite(workdir, tiny):
    # A Slurm search's default storage (engine/slurm.py): runs/<project>/optuna.journal.
    tiny["epochs"] = 1
    journal = workdir / "runs" / "test" / "optuna.journal"
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    opt = OptimizeConfig.from_dict({"trials": 1, "seed": 0, "study_name": "j", "pruner": None,
                                    "storage": str(journal.relative_to(workdir)), "search_space": space})
    study = run_study(RunConfig.from_dict(tiny), opt)
    assert journal.exists() and not (workdir / "runs" / "test" / "optuna.db").exists()
    for storage in (None, str(journal)):
        assert analyze.load_study("j", storage).best_value == study.best_value
