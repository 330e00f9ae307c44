"""Searches shared by many workers: `--workers K` on one machine, against the default
SQLite file and against a real PostgreSQL server that the test starts itself."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, child_env, run_main, skip_or_fail, write_yaml

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


def _postgres_bin():
    for name in ("initdb", "pg_ctl"):
        if not (shutil.which(name) or glob.glob(f"/usr/lib/postgresql/*/bin/{name}")):
            return None
    found = shutil.which("pg_ctl") or sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]
    return os.path.dirname(os.path.realpath(found))


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on a free loopback port, stopped afterwards."""
    bindir = _postgres_bin()
    if bindir is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs Debian's "
                     "postgresql", "REQUIRE_POSTGRES")
    pytest.importorskip("psycopg", reason="the psycopg driver (requirements-dev.txt) is not installed")
    # Its own folder outside pytest's (which only root may enter): the server runs as `postgres`.
    home = Path(tempfile.mkdtemp(prefix="pg-test-"))
    home.chmod(0o755)
    data, sockets = home / "pgdata", home / "pgsock"
    sockets.mkdir()
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        for path in (home, sockets):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(home / "pg.log"), "-o",
                    f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


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
