"""Nothing lost: SIGKILL and SIGTERM part-way (even inside a checkpoint write), then
--resume, gives the same weights and metrics as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint
from config import ConfigError, load_yaml
from conftest import ROOT, assert_same_as, child_env, run_main, write_yaml

pytestmark = pytest.mark.slow  # every test here starts processes


def slow_config():
    """Epochs of ~0.1 s and a checkpoint after each, so a signal lands part-way."""
    config = load_yaml(ROOT / "configs" / "run_template.yaml")
    # deterministic: bit-for-bit across processes needs one CPU thread (see reproducibility.determinism)
    config.update(project="test", device="cpu", seeds=[3, 4], epochs=6, batch_size=16, checkpoint_every_s=0,
                  trainer={"deterministic": True},
                  data_config={"n": 3000, "noise": 0.1, "val_fraction": 0.2, "seed": 0},
                  scheduler_config={"T_max": 6, "eta_min": 1e-5}, net_config={"nodes": 16, "layers": 2},
                  wandb={"mode": "disabled", "tags": []})
    return config


@pytest.fixture
def slow():
    return slow_config()


def start(workdir, *args, env_extra=None):
    """main.py in the background; its output goes to files (a full pipe would stall it)."""
    env = child_env(env_extra)
    with open(workdir / "stdout.txt", "w") as out, open(workdir / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, args)],
                                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def wait_for_rows(csv_path, rows, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            raise AssertionError("training ended early")
        time.sleep(0.02)
    raise AssertionError("timed out")


def trained_together(config, together):
    return {**config, "trainer": {**config["trainer"], "vectorize_seeds": together}}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The same config, never interrupted, trained once for the module on each path: the seeds as
    one stack (engine/vectorized.py, the default), or one after another."""
    made = {}

    def reference(together=True):
        if together not in made:
            folder = tmp_path_factory.mktemp("reference")
            config = trained_together({**slow_config(), "group": "reference"}, together)
            result = run_main("--run_config", str(write_yaml(folder / "ref.yaml", config)), cwd=folder)
            assert result.returncode == 0, result.stderr
            made[together] = folder / "runs" / "test" / "reference"
        return made[together]
    return reference


@pytest.fixture
def reference(references):
    return references()


@pytest.mark.parametrize("together", [True, False], ids=["seeds-together", "one-by-one"])
def test_sigkill_then_resume_is_bit_identical(workdir, slow, references, together):
    reference = references(together)
    path = write_yaml(workdir / "c.yaml", trained_together({**slow, "group": "killed"}, together))
    group_dir = workdir / "runs" / "test" / "killed"
    proc = start(workdir, "--run_config", path)
    wait_for_rows(group_dir / "3" / "metrics.csv", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (group_dir / "4" / "model.pt").exists()  # really cut short

    refused = run_main("--run_config", str(path), cwd=workdir)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as(group_dir, reference)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                    reason="the kill hook finds the file being written through /proc (Linux only)")
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(workdir, slow, reference):
    # A sitecustomize that SIGKILLs the process inside the 4th checkpoint write: after the
    # temporary file is written, before it is renamed over the previous checkpoint.
    hook = workdir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, signal
        _fsync, _count = os.fsync, [0]
        def fsync(fd):
            _fsync(fd)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".checkpoint.pt.tmp"):
                _count[0] += 1
                if _count[0] == 4:
                    os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = fsync
    """))
    path = write_yaml(workdir / "c.yaml", {**slow, "group": "torn"})
    group_dir = workdir / "runs" / "test" / "torn"
    proc = start(workdir, "--run_config", path, env_extra={"PYTHONPATH": str(hook)})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # The write that was cut short (seed 4's second: the seeds train together and save in turn,
    # so seed 3 is a checkpoint ahead, and a resume takes its previous one), and the one before it.
    (torn,) = group_dir.glob("*/.checkpoint.pt.tmp")
    assert checkpoint.load(torn.with_name("checkpoint.pt"))["epoch"] == checkpoint.load(torn)["epoch"] - 1

    resumed = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as(group_dir, reference)


def test_a_damaged_checkpoint_resumes_from_the_previous_one(workdir, slow, reference):
    path = write_yaml(workdir / "c.yaml", {**slow, "group": "damaged"})
    seed_dir = workdir / "runs" / "test" / "damaged" / "3"
    proc = start(workdir, "--run_config", path)
    wait_for_rows(seed_dir / "metrics.csv", 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    previous_epoch = checkpoint.load(seed_dir / "checkpoint.prev.pt")["epoch"]
    data = (seed_dir / "checkpoint.pt").read_bytes()
    (seed_dir / "checkpoint.pt").write_bytes(data[:len(data) // 2])  # a copy that stopped halfway

    resumed = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert [line for line in resumed.stderr.splitlines() if "checkpoint" in line] == [
        "seed 3: runs/test/damaged/3/checkpoint.pt: cannot be read: truncated or corrupt (the archive is "
        f"incomplete or fails its checksum); resumed from checkpoint.prev.pt (epoch {previous_epoch})"]
    assert_same_as(seed_dir.parent, reference)
    assert not (seed_dir / "checkpoint.prev.pt").exists()  # a finished seed keeps no previous one


def test_sigterm_saves_mid_epoch_and_resumes_exactly(workdir, slow, reference):
    path = write_yaml(workdir / "c.yaml", {**slow, "group": "stopped"})
    group_dir = workdir / "runs" / "test" / "stopped"
    proc = start(workdir, "--run_config", path)
    wait_for_rows(group_dir / "3" / "metrics.csv", 2, proc)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stderr = (workdir / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr.splitlines()[-1] and "Traceback" not in stderr
    state = checkpoint.load(group_dir / "3" / "checkpoint.pt")
    assert state["batch"] > 0  # saved in the middle of an epoch
    assert json.loads((group_dir / "3" / "result.json").read_text())["status"] == "interrupted"

    resumed = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as(group_dir, reference)


def test_training_longer_and_skipping_finished_seeds(workdir, tiny):
    tiny.update(seeds=[1], epochs=5, scheduler_config={"T_max": 5, "eta_min": 1e-5}, checkpoint_every_s=0,
                trainer={"deterministic": True})
    straight = run_main("--run_config", str(write_yaml(workdir / "a.yaml", {**tiny, "group": "straight"})),
                        cwd=workdir)
    assert straight.returncode == 0
    short = write_yaml(workdir / "b.yaml", {**tiny, "group": "longer", "epochs": 3})
    assert run_main("--run_config", str(short), cwd=workdir).returncode == 0
    longer = write_yaml(workdir / "b.yaml", {**tiny, "group": "longer"})  # epochs 3 -> 5
    assert run_main("--run_config", str(longer), "--resume", cwd=workdir).returncode == 0
    runs = workdir / "runs" / "test"
    assert_same_as(runs / "longer", runs / "straight", [1])

    seed_files = lambda: {p: p.stat().st_mtime_ns for p in (runs / "longer" / "1").rglob("*")}  # noqa: E731
    before = seed_files()
    again = run_main("--run_config", str(longer), "--resume", cwd=workdir)  # all finished: nothing to do
    assert again.returncode == 0 and "completed" in again.stdout
    assert seed_files() == before  # the seed's files are untouched (provenance.json gains an entry)


def test_resume_refuses_a_config_that_changed(workdir, tiny):
    path = write_yaml(workdir / "c.yaml", {**tiny, "group": "g"})
    assert run_main("--run_config", str(path), cwd=workdir).returncode == 0
    changed = write_yaml(workdir / "c.yaml", {**tiny, "group": "g", "optimizer_config": {"lr": 0.5},
                                              "net_config": {"nodes": 9, "layers": 2}})
    result = run_main("--run_config", str(changed), "--resume", cwd=workdir)
    assert result.returncode == 2
    assert "differs in net_config.nodes, optimizer_config.lr" in result.stderr

    # Without an explicit group the changed config names another folder: say which one is near.
    tiny.pop("group", None)
    assert run_main("--run_config", str(write_yaml(workdir / "d.yaml", tiny)), cwd=workdir).returncode == 0
    moved = write_yaml(workdir / "d.yaml", {**tiny, "batch_size": 32})
    result = run_main("--run_config", str(moved), "--resume", cwd=workdir)
    assert (result.returncode == 2 and "nothing to resume" in result.stderr
            and "differs in batch_size" in result.stderr)


def test_wandb_run_continues_with_the_same_id(workdir, slow):
    slow.update(seeds=[3], wandb={"mode": "offline", "tags": []}, group="w")
    path = write_yaml(workdir / "c.yaml", slow)
    proc = start(workdir, "--run_config", path)
    wait_for_rows(workdir / "runs" / "test" / "w" / "3" / "metrics.csv", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_main("--run_config", str(path), "--resume", cwd=workdir).returncode == 0
    run_id = (workdir / "runs" / "test" / "w" / "3" / "wandb_id").read_text()
    offline = sorted((workdir / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)


def test_pickle_payloads_are_never_run(workdir, tiny):
    marker = workdir / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, workdir / "evil.pt")
    with pytest.raises(ConfigError, match="refused"):
        checkpoint.load(workdir / "evil.pt")
    assert not marker.exists()

    # The same file planted as a seed's checkpoint: --resume refuses it, one line, exit 2.
    path = write_yaml(workdir / "c.yaml", {**tiny, "group": "g", "epochs": 2})
    group_dir = workdir / "runs" / "test" / "g"
    assert run_main("--run_config", str(path), cwd=workdir).returncode == 0
    (group_dir / "7" / "result.json").unlink()
    (workdir / "evil.pt").replace(group_dir / "7" / "checkpoint.pt")
    result = run_main("--run_config", str(path), "--resume", cwd=workdir)
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_unwritable_runs_folder_fails_before_training(workdir, tiny):
    (workdir / "runs").write_text("a file where a folder should be")
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: runs: exists and is not a folder, so runs cannot be written there"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_runs_folder_fails_before_training(workdir, tiny):
    (workdir / "runs").mkdir()
    (workdir / "runs").chmod(0o500)
    result = run_main("--run_config", str(write_yaml(workdir / "c.yaml", tiny)), cwd=workdir)
    assert result.returncode == 2 and "cannot write the run folder" in result.stderr


def test_killed_search_continues_and_fails_the_stale_trial(workdir, tiny):
    import optuna  # here: test_gpu.py imports this module's helpers where optuna may be missing
    from optuna.trial import TrialState
    tiny.update(epochs=6, batch_size=16,
                data_config={"n": 3000, "noise": 0.1, "val_fraction": 0.2, "seed": 0})
    write_yaml(workdir / "c.yaml", tiny)
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 0, "pruner": None, "heartbeat_interval": 1,
                                    "grace_period": 2, "study_name": "s", "search_space": {
                                        "optimizer_config": {
                                            "lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}})
    proc = start(workdir, "--run_config", "c.yaml", "--optimize_config", "o.yaml")
    wait_for_rows(workdir / "runs" / "test" / "s_t0001" / "7" / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    again = run_main("--run_config", "c.yaml", "--optimize_config", "o.yaml", cwd=workdir)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.COMPLETE and states[1] == TrialState.FAIL
    assert states.count(TrialState.COMPLETE) == 3  # the study still reached its 3 finished trials
