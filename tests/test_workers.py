"""Searches shared by many workers: `--workers K` on one machine, against the default
SQLite file and against a real PostgreSQL server that the test starts itself; and a worker
killed outright (SIGKILL), on SQLite, PostgreSQL and Optuna's journal file."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, child_env, postgres_server, run_main, write_yaml
from engine.studies import storage_at

pytestmark = pytest.mark.slow  # every test here starts processes

SPACE = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 3e-2, "log": True}},
         "net_config": {"nodes": {"type": "categorical", "choices": [4, 8, 16]}}}


def check_study(workdir, storage, trials):
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    all_trials = study.get_trials()
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    extra = [t for t in all_trials if t not in finished]
    assert len(finished) == trials  # exactly, not `workers` times as many
    assert all(t.state == TrialState.FAIL and t.user_attrs["reason"].startswith("surplus") for t in extra)
    numbers = [t.number for t in all_trials]
    assert len(set(numbers)) == len(numbers)  # none duplicated
    run_dirs = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(run_dirs)) == trials
    for t in finished:
        if t.state == TrialState.COMPLETE:
            assert (workdir / t.user_attrs["run_dir"] / "7" / "model.pt").exists()
    return study


def search(workdir, tiny, *extra):
    tiny.update(epochs=3)
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 6, "seed": 0, "pruner": None, "study_name": "shared",
                                    "search_space": SPACE})
    return run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", "--workers", "2", *extra,
                    cwd=workdir)


def test_two_workers_share_the_default_sqlite_study(workdir, tiny):
    result = search(workdir, tiny)
    assert result.returncode == 0, result.stdout + result.stderr
    study = check_study(workdir, f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}", 6)
    assert f"best trial {study.best_trial.number}" in result.stdout
    logs = sorted((workdir / "runs" / "test").glob("shared_worker*.log"))
    assert len(logs) == 2 and all("Trial" in log.read_text() for log in logs)  # both really worked


@pytest.fixture
def postgres():
    with postgres_server() as url:
        yield url


def test_two_workers_share_a_postgresql_study(workdir, tiny, postgres):
    result = search(workdir, tiny, "--storage", postgres)
    assert result.returncode == 0, result.stdout + result.stderr
    study = check_study(workdir, postgres, 6)
    assert f"run folder: {study.best_trial.user_attrs['run_dir']}" in result.stdout
    # analyze.py finds a study in the same storage
    report = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--study", "shared",
                             "--storage", postgres, "--json"],
                            cwd=workdir, env=child_env(), capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["best"]["number"] == study.best_trial.number


def start_search(workdir, *args):
    """main.py in the background; its output goes to a file (a full pipe would stall it)."""
    with open(workdir / "killed.log", "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=workdir, env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def wait_for_checkpoint(seed_dir, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (seed_dir / "checkpoint.pt").exists():
            return
        assert proc.poll() is None, "the search ended before its first checkpoint"
        time.sleep(0.02)
    raise AssertionError("no checkpoint written in time")


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_a_worker_killed_outright_is_retried_and_the_rerun_finishes_the_study(workdir, tiny, kind, request):
    """SIGKILL (the out-of-memory killer, a failed node) leaves no chance to clean up: the dead
    worker's trial must be failed by its missing heartbeat and its parameters run again,
    continuing its folder, and the same command again finishes with exactly `trials`, even
    when it starts before the grace period has passed (it waits, and adds no surplus trial)."""
    urls = {"sqlite": f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}",  # the default: no --storage
            "journal": str(workdir / "runs" / "test" / "optuna.journal")}
    url = urls.get(kind) or request.getfixturevalue("postgres")
    tiny.update(epochs=3, batch_size=16, checkpoint_every_s=0,  # a checkpoint each epoch
                data_config={"n": 1200, "noise": 0.1, "val_fraction": 0.2, "seed": 0})
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 1, "seed": 0, "pruner": None, "heartbeat_interval": 1,
                                    "grace_period": 4, "study_name": "k", "search_space": SPACE})
    command = ["--run_config", "c.yaml", "--optimize_config", "o.yaml",
               *(["--storage", url] if kind != "sqlite" else [])]
    proc = start_search(workdir, *command)
    wait_for_checkpoint(workdir / "runs" / "test" / "k_t0000" / "7", proc)
    proc.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the storage
    proc.wait()
    again = run_main(*command, cwd=workdir)  # at once: its trial is not stale yet
    assert again.returncode == 0, again.stdout + again.stderr
    killed, retry = optuna.load_study(study_name="k", storage=storage_at(url)).get_trials()  # no surplus
    assert killed.state == TrialState.FAIL and "trial 0 failed: no heartbeat" in again.stdout
    assert retry.state == TrialState.COMPLETE  # exactly `trials` finished
    assert retry.user_attrs["retry_of"] == 0 and retry.params == killed.params
    folder = workdir / killed.user_attrs["run_dir"]
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]  # its folder continued:
    assert len(json.loads((folder / "provenance.json").read_text())["invocations"]) == 2
    assert len((folder / "7" / "metrics.csv").read_text().splitlines()) == 1 + 3  # no epoch twice


def test_the_other_workers_retry_a_killed_workers_trial(workdir, tiny):
    """One of `--workers 2` killed outright (as a Slurm job killed for memory, never requeued):
    the survivor fails the dead trial once its heartbeat is stale, retries it, and the study
    ends with exactly `trials` finished trials, without a rerun."""
    tiny.update(epochs=3, batch_size=16, checkpoint_every_s=0,
                data_config={"n": 1200, "noise": 0.1, "val_fraction": 0.2, "seed": 0})
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 0, "pruner": None, "heartbeat_interval": 1,
                                    "grace_period": 2, "study_name": "w", "search_space": SPACE,
                                    "storage": "runs/test/optuna.journal"})
    proc = start_search(workdir, "--run_config", "c.yaml", "--optimize_config", "o.yaml", "--workers", "2")
    journal = str(workdir / "runs" / "test" / "optuna.journal")
    deadline = time.time() + 120
    while time.time() < deadline:  # a running trial with a checkpoint: kill the worker that trains it
        if os.path.exists(journal) and "w" in optuna.get_all_study_names(storage_at(journal)):
            running = [t for t in optuna.load_study(study_name="w", storage=storage_at(journal)).get_trials()
                       if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs and  # after "worker"
                       (workdir / t.user_attrs["run_dir"] / "7" / "checkpoint.pt").exists()]
            if running:
                break
        assert proc.poll() is None, (workdir / "killed.log").read_text()
        time.sleep(0.05)
    else:
        raise AssertionError("no trial reached a checkpoint in time")
    victim = running[0]
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    assert proc.wait(timeout=240) == 0, (workdir / "killed.log").read_text()
    output = (workdir / "killed.log").read_text()
    assert "was killed (SIGKILL)" in output and "Traceback" not in output
    trials = optuna.load_study(study_name="w", storage=storage_at(journal)).get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
