"""Shared fixtures: a shrunken copy of the shipped config, a scratch working folder,
and a helper that runs main.py as a user would (a subprocess)."""
import contextlib
import csv
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import load_yaml  # noqa: E402  (after the template folder is importable)
from plain_data import Plain as PlainDataset  # noqa: E402, F401  (tests import it from here)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder (runs/ lands here) with wandb kept inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


@pytest.fixture
def tiny():
    """The shipped template, shrunk: one seed, a few epochs, small data and model, no wandb."""
    config = load_yaml(ROOT / "configs" / "run_template.yaml")  # our loader: 1e-3 is a float
    config.update(project="test", device="cpu", seeds=[7], epochs=4, batch_size=64,
                  net_config={"nodes": 8, "layers": 2},
                  scheduler_config={"T_max": 4, "eta_min": 1e-5},
                  data_config={"n": 400, "noise": 0.1, "val_fraction": 0.25, "seed": 0},
                  wandb={"mode": "disabled", "tags": []})
    config["optimizer_config"] = {"lr": 1e-2}
    return config


# The DataLoader path's data: its class for tests here, its source for a child's workdir.
PLAIN_DATA = (ROOT / "tests" / "plain_data.py").read_text()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_main(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in `cwd`, stdin closed, as a user (or CI) would run it."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def child_env(extra: dict | None = None) -> dict:
    """The environment for a child main.py: no credentials, and not the wandb service of
    this test process (wandb exports WANDB_SERVICE; a child would share its run registry)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "WANDB_SERVICE"))}
    return {**env, **(extra or {})}


# The CUDA tier: `pytest -m gpu` runs these on a machine with a GPU (bench/gpu_check.sh);
# elsewhere they skip with the reason.
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA: this machine has no GPU")]


def outcome(group_dir, seeds=(3, 4)):
    """What must match bit for bit: weights, and every metrics column but wall time."""
    found = {}
    for seed in seeds:
        with open(group_dir / str(seed) / "metrics.csv") as f:
            rows = [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)]
        weights = torch.load(group_dir / str(seed) / "model.pt", weights_only=True)
        best = torch.load(group_dir / str(seed) / "best.pt", weights_only=True)
        result = json.loads((group_dir / str(seed) / "result.json").read_text())
        result.pop("run_dir")
        found[seed] = (rows, {k: v.tolist() for k, v in weights.items()},
                       {k: v.tolist() for k, v in best.items()}, result)
    return found


def assert_same_as(group_dir, reference_dir, seeds=(3, 4)):
    """Bit for bit; on a mismatch, also say what each process ran on (provenance.json)."""
    def ran_on(folder):
        return [{k: e.get(k) for k in ("cpu_capability", "device_name", "host", "torch")}
                for e in json.loads((folder / "provenance.json").read_text())["invocations"]]
    assert outcome(group_dir, seeds) == outcome(reference_dir, seeds), \
        f"resumed run on {ran_on(group_dir)}, reference on {ran_on(reference_dir)}"


def skip_or_fail(reason: str, variable: str) -> None:
    """A tool a test needs is missing: skip with the reason, or fail where `variable` is set
    (.ci/run installs the tool and sets it, so CI never skips the test)."""
    if os.environ.get(variable):
        pytest.fail(reason)
    pytest.skip(reason)


def logged_config(run_folder: Path, key: str):
    """A key of an offline wandb run's config, read from its transaction log (run-<id>.wandb):
    a config item is the key, then its JSON value (protobuf field 16, length-prefixed)."""
    (log,) = run_folder.glob("run-*.wandb")
    data = log.read_bytes()
    item = re.search(b"\n" + bytes([len(key)]) + re.escape(key.encode()) + rb"\x82\x01(.)", data, flags=re.S)
    return json.loads(data[item.end():item.end() + item.group(1)[0]])


def user_module(workdir: Path, monkeypatch, name: str, source: str) -> None:
    """Write `source` as the user's module `name` beside the test's runs/, importable afresh."""
    (workdir / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, name, raising=False)


@contextlib.contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL server on a free loopback port (asking for `password` if given),
    and its URL; stopped afterwards. Skipped, or failed under REQUIRE_POSTGRES, without one."""
    binaries = [shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
                for name in ("initdb", "pg_ctl")]
    if None in binaries:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs Debian's "
                     "postgresql", "REQUIRE_POSTGRES")
    pytest.importorskip("psycopg", reason="the psycopg driver (requirements-dev.txt) is not installed")
    bindir = os.path.dirname(os.path.realpath(binaries[1]))
    home = Path(tempfile.mkdtemp(prefix="pg-test-"))  # outside pytest's folder, which only root may enter
    home.chmod(0o755)
    auth = ["-A", "trust"]
    if password is not None:
        (home / "pw").write_text(password)
        auth = ["-A", "scram-sha-256", f"--pwfile={home / 'pw'}"]
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        for path in (home, *home.iterdir()):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(home / "data"), *auth, "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(home / "data"), "-w", "-l", str(home / "pg.log"),
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres{':' + password if password else ''}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(home / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
