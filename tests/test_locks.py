"""The per-seed lock (an flock) on file systems where it fails or holds only within one node.

No file system here lacks flock (tmpfs, ext4 and overlay all have it), so a child's flock is made
to fail at the OS-call boundary: a sitecustomize.py on PYTHONPATH replaces fcntl.flock with one
that raises ENOSYS, as Lustre mounted without flock does. Node-local mounts (NFS local_lock,
Lustre localflock, BeeGFS) are read from /proc/self/mountinfo; their lines are given here."""
import errno
import os
import re
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, child_env, write_yaml
from engine import locks
from engine.locks import lock, mount_of, node_local_locks

NO_FLOCK = f"""import errno, fcntl, os
def flock(fd, operation):
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
fcntl.flock = flock
"""


def without_flock(workdir, *args):
    """main.py ARGS in a process (and its workers) whose flock fails as on Lustre without flock."""
    (workdir / "no_flock").mkdir(exist_ok=True)
    (workdir / "no_flock" / "sitecustomize.py").write_text(NO_FLOCK)
    env = child_env({"PYTHONPATH": str(workdir / "no_flock")})
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)


def assert_one_line_about_locks(stderr, where, workdir):
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]  # beside Optuna's log
    mount = mount_of(workdir)  # named in the line, as the user's own mount would be
    which = re.escape(f"this file system ({mount['type']} at {mount['point']})")
    assert re.fullmatch(rf"error: {where}: {which} gives no file locks .*", line), line
    assert "gives no file locks (flock: Function not implemented)" in line


@pytest.mark.slow
def test_a_file_system_without_flock_is_one_line_and_nothing_is_written(workdir, tiny):
    write_yaml(workdir / "c.yaml", {**tiny, "group": "g"})
    result = without_flock(workdir, "--run_config", "c.yaml")
    assert result.returncode == 2
    assert_one_line_about_locks(result.stderr, "runs/test/g", workdir)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "runs" / "test" / "g").exists()  # a rerun elsewhere starts clean
    assert not list(workdir.rglob(".lock-probe-*"))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_search_without_flock_stops_at_its_first_trial(workdir, tiny, workers):
    write_yaml(workdir / "c.yaml", tiny)
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    write_yaml(workdir / "o.yaml", {"trials": 4, "seed": 0, "pruner": None, "study_name": "s",
                                    "search_space": space})
    result = without_flock(workdir, "--run_config", "c.yaml", "--optimize_config", "o.yaml", *workers)
    assert result.returncode == 2, result.stdout + result.stderr
    where = r"worker 0 \(runs/test/s_worker0.log\): runs/test/s_t000[01]" if workers else "runs/test/s_t0000"
    assert_one_line_about_locks(result.stderr, where, workdir)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{workdir / 'runs' / 'test' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * (2 if workers else 1)  # not all 4


def fake_mountinfo(tmp_path, monkeypatch, fs_type, options, point=None):
    """/proc/self/mountinfo as the kernel writes it, with tmp_path's device mounted as `fs_type`."""
    device = tmp_path.stat().st_dev
    point = point or str(tmp_path).replace(" ", "\\040")
    text = (f"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
            f"612 27 {os.major(device)}:{os.minor(device)} / {point} rw,relatime shared:301 - {fs_type} "
            f"server:/export {options}\n")
    (tmp_path / "mountinfo").write_text(text)
    monkeypatch.setattr(locks, "MOUNTINFO", tmp_path / "mountinfo")
    monkeypatch.setattr(locks, "_warned", set())


def test_a_node_local_lock_is_said_once_in_one_line(tmp_path, monkeypatch, capsys):
    fake_mountinfo(tmp_path, monkeypatch, "nfs4", "rw,vers=4.2,hard,proto=tcp,local_lock=all,addr=10.0.0.1")
    for _ in range(2):
        with lock(tmp_path, wait=False) as mine:
            assert mine  # taken: within one node the lock still works
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"warning: {tmp_path} is on NFS mounted with local_lock=all, whose locks hold only "
                    "within one node: never run two processes on one group from two nodes "
                    "(see docs/runs.md)")


def test_a_lock_that_works_across_nodes_says_nothing(tmp_path, monkeypatch, capsys):
    fake_mountinfo(tmp_path, monkeypatch, "nfs4", "rw,vers=4.2,hard,proto=tcp,local_lock=none,addr=10.0.0.1")
    with lock(tmp_path, wait=False) as mine:
        assert mine
    assert capsys.readouterr().err == ""


def test_mountinfo_is_read_for_the_folders_own_mount(tmp_path, monkeypatch):
    fake_mountinfo(tmp_path, monkeypatch, "lustre", "rw,localflock,lazystatfs", point="/lus/my\\040scratch")
    mount = mount_of(tmp_path)
    assert mount["type"] == "lustre" and mount["point"] == "/lus/my scratch"
    assert "localflock" in mount["options"]


@pytest.mark.parametrize("fs_type,options,said", [
    ("nfs4", "rw,vers=4.2,local_lock=none", None),  # NFS's own lock service: coherent across nodes
    ("nfs", "rw,vers=3,local_lock=all", "NFS mounted with local_lock=all"),
    ("nfs", "rw,vers=3,local_lock=flock", "NFS mounted with local_lock=flock"),
    ("nfs", "rw,vers=3,nolock", "NFS mounted with nolock"),
    ("lustre", "rw,flock,lazystatfs", None),
    ("lustre", "rw,localflock,lazystatfs", "Lustre mounted with localflock"),
    ("beegfs", "rw,cfgFile={off},_netdev", "BeeGFS without tuneUseGlobalFileLocks"),
    ("beegfs", "rw,cfgFile={on},_netdev", None),
    ("gpfs", "rw", None), ("ext4", "rw,relatime", None), ("tmpfs", "rw", None),
])
def test_which_mounts_keep_locks_within_one_node(tmp_path, fs_type, options, said):
    (tmp_path / "on.conf").write_text("sysMgmtdHost = mgmt\ntuneUseGlobalFileLocks = true\n")
    (tmp_path / "off.conf").write_text("sysMgmtdHost = mgmt\ntuneUseGlobalFileLocks = false\n")
    options = options.format(on=tmp_path / "on.conf", off=tmp_path / "off.conf")
    assert node_local_locks(fs_type, set(options.split(","))) == said


def test_a_failing_flock_in_lock_itself_is_a_config_error(tmp_path, monkeypatch):
    """lock() raises the same one line where the probe before the run could not see the failure."""
    import fcntl

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # NFS without its lock service
    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(locks.LockUnavailable, match=r"gives no file locks \(flock: No locks available"):
        with lock(tmp_path, wait=True):
            pass
