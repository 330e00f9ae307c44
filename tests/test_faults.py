"""Faults beside the broken-input table: a full disk, damaged checkpoints, and two processes
on one group. Each through main.py as a user runs it, except where a file is checked directly."""
import csv
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from config import RunConfig
from conftest import ROOT, assert_same_as, child_env, run_main, skip_or_fail, write_yaml
from engine import checkpoint
from engine.errors import ConfigError


def big(tiny, group):
    """Checkpoints of ~3 MB (weights, AdamW's moments, the best weights), one per epoch."""
    return {**tiny, "group": group, "seeds": [7], "epochs": 3, "checkpoint_every_s": 0,
            "net_config": {"nodes": 256, "layers": 4}, "scheduler_config": {"T_max": 3, "eta_min": 1e-5},
            "trainer": {"deterministic": True}, "wandb": {"mode": "offline", "tags": []}}


@pytest.fixture
def small_disk(workdir):
    """runs/ on a 6 MB tmpfs of its own: room for the first epoch's checkpoint, not the second."""
    runs = workdir / "runs"
    runs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(runs)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        reason = ("mounting a size-limited tmpfs needs root" if mounted is None else
                  f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        skip_or_fail(reason, "REQUIRE_TMPFS")  # CI runs as root: there it must run
    yield runs
    subprocess.run(["umount", "--lazy", str(runs)], check=True)  # lazy: a file still open does not stop it


@pytest.mark.slow
def test_a_full_disk_is_one_line_leaves_no_debris_and_resumes(workdir, small_disk, tiny):
    config = big(tiny, "full")
    path = write_yaml(workdir / "c.yaml", config)
    env = {k: v for k, v in child_env().items() if k != "WANDB_DIR"}  # wandb's files on the full disk too
    full = subprocess.run([sys.executable, str(ROOT / "main.py"), "--run_config", str(path)], cwd=workdir,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    errors = [line for line in full.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == full.stderr.strip().splitlines()[-1], full.stderr
    assert re.fullmatch(r"error: runs/test/full/7/checkpoint\.pt: cannot write 3\.\d MB: No space left on "
                        r"device \(\d\.\d MB free there\); the previous version is intact: free some space, "
                        r"then continue with --resume", errors[0]), errors[0]
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    seed_dir = small_disk / "test" / "full" / "7"
    assert checkpoint.load(seed_dir / "checkpoint.pt")["epoch"] == 1  # the previous one, intact
    assert json.loads((seed_dir / "result.json").read_text())["status"] == "failed"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), "--run_config", str(path), "--resume"],
                             cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    reference = workdir / "reference"
    reference.mkdir()
    done = run_main("--run_config", str(write_yaml(reference / "c.yaml", config)), cwd=reference)
    assert done.returncode == 0, done.stderr
    assert_same_as(seed_dir.parent, reference / "runs" / "test" / "full", seeds=(7,))


@pytest.mark.slow
def test_a_full_disk_stops_a_search_at_the_first_trial_it_fails(workdir, small_disk, tiny):
    import optuna
    write_yaml(workdir / "c.yaml", {**big(tiny, None), "wandb": {"mode": "disabled", "tags": []}})
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 0, "pruner": None, "study_name": "s",
                                    "search_space": space})
    full = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint.pt: cannot write" in errors[0], full.stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{small_disk / 'test' / 'optuna.db'}")
    trials = optuna.load_study(study_name="s", storage=storage).trials
    storage.engine.dispose()  # let go of the file, so that the tmpfs can be unmounted
    assert [t.state.name for t in trials] == ["FAIL"]  # not every trial failing in turn
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]


def flip_a_bit_in_the_weights(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(n for n in archive.namelist() if "/data/" in n and not n.endswith("serialization_id"))
        payload = archive.read(record)
    data[bytes(data).index(payload) + len(payload) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_files_are_told_apart_from_files_carrying_code(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(64.0)}, path)
    intact = path.read_bytes()
    for damage in (lambda: path.write_bytes(intact[:len(intact) // 2]),  # a copy that stopped halfway
                   lambda: path.write_bytes(b""),
                   lambda: flip_a_bit_in_the_weights(path)):              # bit rot
        path.write_bytes(intact)
        damage()
        with pytest.raises(checkpoint.Unreadable, match="cannot be read: truncated or corrupt") as caught:
            checkpoint.load(path)
        assert "refused" not in str(caught.value) and "code" not in str(caught.value)
    # torch.load itself checks no checksum: bit rot in the weights would load without a word.
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(64.0))

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Payload()}, path)
    with pytest.raises(ConfigError, match=r"refused: .* would run code is never loaded\): .*GLOBAL"):
        checkpoint.load(path)


@pytest.mark.slow
def test_a_damaged_checkpoint_with_no_previous_one_says_what_survives(workdir, tiny):
    path = write_yaml(workdir / "c.yaml", {**tiny, "group": "g", "epochs": 2})
    assert run_main("--run_config", str(path), cwd=workdir).returncode == 0
    seed_dir = workdir / "runs" / "test" / "g" / "7"
    (seed_dir / "result.json").unlink()  # as if the process had died after its last checkpoint
    assert not (seed_dir / "checkpoint.prev.pt").exists()  # a finished seed keeps no previous one
    data = (seed_dir / "checkpoint.pt").read_bytes()
    (seed_dir / "checkpoint.pt").write_bytes(data[:len(data) // 3])
    before = {p: p.read_bytes() for p in (workdir / "runs").rglob("*") if p.is_file()}

    refused = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: runs/test/g/7/checkpoint.pt: cannot be read: truncated or corrupt (the archive is "
        "incomplete or fails its checksum); kept: best.pt, metrics.csv up to epoch 2; delete checkpoint.pt "
        "to train seed 7 again from the start, or restore a copy")
    assert {p: p.read_bytes() for p in (workdir / "runs").rglob("*") if p.is_file()} == before  # nothing lost

    (seed_dir / "checkpoint.pt").unlink()  # as the message says
    retrained = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert retrained.returncode == 0, retrained.stderr
    with open(seed_dir / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


# ---- two processes on one group

WAITER = """
import os, sys, time
sys.path.insert(0, {root!r})
import main, config, engine.run  # imported before the barrier: both then start at once
check_group = engine.run.check_group
def slow_check_group(*args):  # a slow shared file system: the check and the first write far apart
    check_group(*args)
    time.sleep(0.3)
engine.run.check_group = slow_check_group
open("ready-" + sys.argv[1], "w").close()
while not os.path.exists("go"):
    time.sleep(0.0005)
sys.exit(main.main(sys.argv[2:]))
"""


def together(workdir, *args):
    """Two identical main.py processes, released by a barrier once both have imported."""
    for name in ("go", "ready-a", "ready-b"):
        (workdir / name).unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", WAITER.format(root=str(ROOT)), name, *args], cwd=workdir,
                              env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    deadline = time.time() + 120
    while not all((workdir / f"ready-{n}").exists() for n in "ab"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.01)
    (workdir / "go").touch()
    return [(p.wait(timeout=240), *p.communicate()) for p in procs]


def epochs_written(group_dir, seed):
    with open(group_dir / str(seed) / "metrics.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_never_train_one_seed(workdir, tiny):
    seeds = [1, 2, 3]
    for round_ in range(3):  # a fresh group: exactly one process gets it, the other writes nothing
        path = write_yaml(workdir / "c.yaml", {**tiny, "group": f"fresh{round_}", "seeds": seeds,
                                               "epochs": 3})
        outcomes = sorted(together(workdir, "--run_config", str(path)), key=lambda o: o[0])
        (ok, _, _), (refused, _, stderr) = outcomes
        assert (ok, refused) == (0, 2), outcomes
        assert len(stderr.strip().splitlines()) == 1, stderr  # refused by the folder check, or by mkdir
        assert re.search(r"error: .*c.yaml: seeds: runs/test/fresh\d/(1 was just made by another process|"
                         r" already holds seed\(s\) 1, 2, 3)", stderr), stderr
        group_dir = workdir / "runs" / "test" / f"fresh{round_}"
        assert all(epochs_written(group_dir, s) == [1, 2, 3] for s in seeds)
        assert len(json.loads((group_dir / "provenance.json").read_text())["invocations"]) == 1
    for round_ in range(2):  # --resume: the two share the unfinished seeds, each trained once
        path = write_yaml(workdir / "c.yaml", {**tiny, "group": f"shared{round_}", "seeds": seeds,
                                               "epochs": 1})
        assert run_main("--run_config", str(path), cwd=workdir).returncode == 0
        outcomes = together(workdir, "--run_config", str(path), "--resume", "--set", "epochs=4")
        assert [o[0] for o in outcomes] == [0, 0], outcomes
        group_dir = workdir / "runs" / "test" / f"shared{round_}"
        assert all(epochs_written(group_dir, s) == [1, 2, 3, 4] for s in seeds)
        assert all(json.loads((group_dir / str(s) / "result.json").read_text())["epochs_run"] == 4
                   for s in seeds)
        invocations = json.loads((group_dir / "provenance.json").read_text())["invocations"]
        assert [i["status"] for i in invocations] == ["finished"] * 3  # neither append lost the other's


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts the bytes read through /proc (Linux)")
def test_a_resume_reads_each_checkpoint_once(workdir, tiny):
    from engine.run import run

    def bytes_read() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar")).split()[1])

    # A model whose checkpoint is mostly one big buffer, so that reading it dwarfs every other read.
    (workdir / "heavy.py").write_text("import torch\nfrom model import MLP\n\n\nclass Heavy(MLP):\n"
                                      "    def __init__(self, hparams, device='cpu'):\n"
                                      "        super().__init__(hparams, device)\n"
                                      "        self.register_buffer('table', torch.zeros(4_000_000))\n")
    sys.path.insert(0, str(workdir))
    try:
        config = {**tiny, "net": "heavy.Heavy", "epochs": 2, "group": "g", "checkpoint_every_s": 0}
        run(RunConfig.from_dict(config))
        size = (workdir / "runs" / "test" / "g" / "7" / "checkpoint.pt").stat().st_size
        assert size > 16e6
        before = bytes_read()
        run(RunConfig.from_dict({**config, "epochs": 3}), resume=True)  # one more epoch
        assert bytes_read() - before < 1.3 * size  # read once (it was three times)
    finally:
        sys.path.remove(str(workdir))
