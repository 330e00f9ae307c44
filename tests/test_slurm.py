"""Slurm on a real one-node cluster that this module starts (munged, slurmctld and slurmd, their
state in a temp folder) and stops: submission (from a folder whose path needs quoting), a
training job and its resubmission, a job array search, and a job stopped by the warning signal,
a real preemption or a scancel, then requeued or resubmitted, resuming bit for bit; a job whose
runs make no progress stops requeueing; a storage password stays out of the script and of `ps`."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import ROOT, child_env, postgres_server, skip_or_fail, write_yaml
from engine.errors import ConfigError
from engine.slurm import SlurmConfig

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
# Requeued jobs wait `cred_expire` seconds (120 by default); the scheduler looks every 2 s. A job
# in `urgent` preempts one in `debug` as clusters do (PreemptMode=CANCEL, no grace time): TERM to
# every process of the job, its batch script included, and KILL after KillWait (30 s).
SLURM_CONF = """\
ClusterName=test
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={home}/munge.sock,cred_expire=10
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=2,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
MailProg=/bin/true
ReturnToService=2
NodeName=test-node NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=test-node Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=test-node MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a one-node cluster, for the module; its daemons are stopped afterwards."""
    path = f"{SBIN}:{os.environ.get('PATH', '')}"
    missing = [d for d in DAEMONS if shutil.which(d, path=path) is None]
    if missing or os.geteuid() != 0:
        reason = (f"Slurm not installed ({', '.join(missing)} missing); .ci/run installs Debian's slurmctld "
                  "slurmd slurm-client munge" if missing else "the test cluster's daemons run as root")
        skip_or_fail(reason, "REQUIRE_SLURM")  # CI must run these tests
    home = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (home / folder).mkdir()
    (home / "munge.key").write_bytes(os.urandom(1024))
    (home / "munge.key").chmod(0o400)
    conf = home / "slurm.conf"
    conf.write_text(SLURM_CONF.format(home=home, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": path}
    daemons = []
    try:
        daemons.append(subprocess.Popen(
            [shutil.which("munged", path=path), "--foreground", "--force", f"--socket={home}/munge.sock",
             f"--key-file={home}/munge.key", f"--pid-file={home}/munged.pid",
             f"--seed-file={home}/munge.seed", f"--log-file={home}/munged.log"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            if (home / "munge.sock").exists():
                break
            time.sleep(0.05)
        daemons.append(subprocess.Popen([shutil.which("slurmctld", path=path), "-D", "-f", str(conf)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        daemons.append(subprocess.Popen([shutil.which("slurmd", path=path), "-D", "-f", str(conf), "-N",
                                         "test-node"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        deadline = time.time() + 30
        while "idle" not in slurm(env, "sinfo", "-h", "-o", "%T", check=False).stdout:
            assert time.time() < deadline, (home / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.2)
        yield env
    finally:
        if len(daemons) == 3:  # a job left by a failed test would outlive the daemons: cancel it first
            slurm(env, "scancel", "--user=root", check=False)
            deadline = time.time() + 45  # KillWait is 30 s
            while slurm(env, "squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def slurm(env, *command, check=True):
    return subprocess.run(command, env=env, capture_output=True, text=True, check=check, timeout=30)


def submit(workdir, env, *args):
    """main.py ... --slurm s.yaml as a user runs it on the login node."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--slurm", "s.yaml"], cwd=workdir,
                          env=child_env({"SLURM_CONF": env["SLURM_CONF"], "PATH": env["PATH"]}),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def job_id(submitted):
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return submitted.stdout.split()[2]  # "submitted job 12 (...)"


def wait_until_gone(env, job, timeout=120):
    deadline = time.time() + timeout
    while slurm(env, "squeue", "-h", "-j", job, check=False).stdout.strip():
        assert time.time() < deadline, f"job {job} still queued or running"
        time.sleep(0.5)


def wait_for_rows(path, rows, timeout=90):
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) > rows):
        assert time.time() < deadline, f"no row {rows} in {path}"
        time.sleep(0.02)


def restarts(env, job):
    return int(slurm(env, "scontrol", "show", "job", job).stdout.split("Restarts=")[1].split()[0])


@pytest.fixture
def slurm_yaml(workdir):
    write_yaml(workdir / "s.yaml", {"time": "10:00", "cpus_per_task": 1, "signal_lead_s": 60})
    return workdir / "s.yaml"


# A folder that sbatch (#SBATCH lines, and %j in file names) and bash must both be told how to read.
AWKWARD = "a b $HOME 'q\" %j #x"


@pytest.mark.slow
def test_a_training_job_from_an_awkward_folder_writes_its_run_folder(workdir, tiny, cluster):
    here = workdir / AWKWARD
    here.mkdir()
    write_yaml(here / "s.yaml", {"time": "10:00", "cpus_per_task": 1, "signal_lead_s": 60})
    write_yaml(here / "c.yaml", {**tiny, "group": "g"})
    started = time.monotonic()
    submitted = submit(here, cluster, "--run_config", "c.yaml")
    assert time.monotonic() - started < 20  # it returns at once; the job runs without it
    job = job_id(submitted)
    folder = here / "runs" / "test" / "slurm" / f"g_{job}"
    assert f"logs: {folder.relative_to(here)}/log.txt" in submitted.stdout
    assert f"squeue -j {job}" in submitted.stdout
    wait_until_gone(cluster, job)
    assert (here / "runs" / "test" / "g" / "7" / "model.pt").exists(), (folder / "log.txt").read_text()
    assert "completed" in (folder / "log.txt").read_text()
    assert "#SBATCH --requeue" in (folder / "job.sbatch").read_text()
    assert not (workdir / "runs").exists() and not (Path("/tmp") / "runs" / "test" / "slurm").exists()


@pytest.mark.slow
def test_an_array_search_survives_preemption_with_the_exact_trial_count(workdir, tiny, cluster, slurm_yaml):
    tiny.update(epochs=6, batch_size=16,
                data_config={"n": 3000, "noise": 0.1, "val_fraction": 0.2, "seed": 0})
    write_yaml(workdir / "c.yaml", tiny)
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    write_yaml(workdir / "o.yaml", {"trials": 3, "seed": 0, "pruner": None, "study_name": "s",
                                    "search_space": space})
    job = job_id(submit(workdir, cluster, "--run_config", "c.yaml", "--optimize_config", "o.yaml",
                        "--workers", "2"))
    wait_for_rows(workdir / "runs" / "test" / "s_t0000" / "7" / "metrics.csv", 2)
    slurm(cluster, "scancel", "--signal=USR1", job)  # every worker, mid-trial
    wait_until_gone(cluster, job, timeout=180)
    storage = JournalStorage(JournalFileBackend(str(workdir / "runs" / "test" / "optuna.journal")))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    logs = "".join(p.read_text() for p in (workdir / "runs" / "test" / "slurm" / f"s_{job}").glob("*.log"))
    assert len(finished) == 3, logs  # exactly `trials`, not per worker, the stopped ones not counted
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped and all("stopped by a signal" in t.user_attrs["reason"] for t in stopped), logs
    for t in stopped:  # each retried with its parameters, in its own folder, from its checkpoint
        (retry,) = [r for r in finished if r.user_attrs.get("retry_of") == t.number]
        assert retry.params == t.params and retry.user_attrs["run_dir"] == t.user_attrs["run_dir"]
        assert len(retry.intermediate_values) == 6  # the curve before the signal, and after it
    assert len({t.user_attrs["run_dir"] for t in finished}) == 3


@pytest.fixture
def postgres_with_password():
    """A throwaway PostgreSQL server that asks for a password, and its URL with that password."""
    with postgres_server(PASSWORD) as url:
        yield url


PASSWORD = "Pw-5e1f9c-not-for-ps"


def command_lines(cwd):
    """The command lines of the processes running in `cwd` (a job's: other tests' jobs on this
    machine have command lines of the same form), read where `ps` reads them."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == str(cwd):
                yield (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


@pytest.mark.slow
def test_a_storage_password_stays_out_of_the_script_and_of_ps(workdir, tiny, cluster, slurm_yaml,
                                                             postgres_with_password):
    url = postgres_with_password
    with pytest.raises(Exception, match="password"):  # the server really asks for it
        optuna.load_study(study_name="s", storage=url.replace(PASSWORD, "wrong"))
    write_yaml(workdir / "c.yaml", {**tiny, "epochs": 3})
    space = {"optimizer_config": {"lr": {"type": "float", "min": 1e-3, "max": 1e-2}}}
    write_yaml(workdir / "o.yaml", {"trials": 2, "seed": 0, "pruner": None, "study_name": "s",
                                    "search_space": space})
    submitted = submit(workdir, cluster, "--run_config", "c.yaml", "--optimize_config", "o.yaml",
                       "--workers", "2", "--storage", url)
    job = job_id(submitted)
    assert PASSWORD not in submitted.stdout and "postgres:***@" in submitted.stdout
    seen = set()  # the job's command lines (srun's, Python's), as `ps` shows them to every user
    while slurm(cluster, "squeue", "-h", "-j", job, check=False).stdout.strip():
        seen |= set(command_lines(workdir))
        time.sleep(0.1)
    assert any(line.startswith("srun ") for line in seen), seen  # and Python's own, under srun:
    assert any("--slurm-job" in line and not line.startswith("srun ") for line in seen), seen
    assert not [line for line in seen if PASSWORD in line], seen
    folder = workdir / "runs" / "test" / "slurm" / f"s_{job}"
    assert (folder / "storage").stat().st_mode & 0o777 == 0o600
    assert PASSWORD in (folder / "storage").read_text()
    leaks = [p.name for p in folder.iterdir() if p.name != "storage" and PASSWORD in p.read_text()]
    assert not leaks and PASSWORD not in (folder / "job.sbatch").read_text(), leaks
    trials = optuna.load_study(study_name="s", storage=url).get_trials()  # the workers reached it
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, (folder / "worker0.log").read_text()


@pytest.mark.slow
def test_two_tasks_are_ddp_ranks(workdir, tiny, cluster):
    if os.cpu_count() < 2:
        pytest.skip("two tasks need two CPUs on the test node")
    write_yaml(workdir / "s.yaml", {"time": "10:00", "tasks_per_node": 2})
    write_yaml(workdir / "c.yaml", {**tiny, "group": "ddp"})
    job = job_id(submit(workdir, cluster, "--run_config", "c.yaml"))
    wait_until_gone(cluster, job)
    log = (workdir / "runs" / "test" / "slurm" / f"ddp_{job}" / "log.txt").read_text()
    # One report, rank 0's; were the tasks not ranks of one group, the second would be refused the seed.
    assert log.count("files: ") == 1 and "completed" in log and "error" not in log, log
    assert "ExitCode=0:0" in slurm(cluster, "scontrol", "show", "job", job).stdout


@pytest.mark.slow
def test_dry_run_and_bad_input_write_and_submit_nothing(workdir, tiny, cluster, slurm_yaml):
    write_yaml(workdir / "c.yaml", tiny)
    dry = submit(workdir, cluster, "--run_config", "c.yaml", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("#!/bin/bash")
    assert "#SBATCH --signal=USR1@60" in dry.stdout and '--slurm-job "$folder"' in dry.stdout

    write_yaml(workdir / "bad.yaml", {"time": "10:00", "partition": "nowhere"})
    os.replace(workdir / "bad.yaml", workdir / "s.yaml")
    refused = submit(workdir, cluster, "--run_config", "c.yaml")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: s.yaml: sbatch refused the job: ")
    assert "partition" in refused.stderr

    no_sbatch = subprocess.run([sys.executable, str(ROOT / "main.py"), "--run_config", "c.yaml",
                                "--slurm", "s.yaml"], cwd=workdir, env=child_env({"PATH": str(workdir)}),
                               capture_output=True, text=True, timeout=120)
    assert no_sbatch.returncode == 2 and len(no_sbatch.stderr.splitlines()) == 1, no_sbatch.stderr
    assert "sbatch is not on the PATH" in no_sbatch.stderr
    assert not (workdir / "runs").exists()
    assert slurm(cluster, "squeue", "-h").stdout.strip() == ""


@pytest.mark.parametrize("data, key", [({"time": 60}, "time"), ({"time": "1:00", "nodez": 2}, "nodez"),
                                       ({"time": "1:00", "signal": "KILL"}, "signal"),
                                       ({"time": "soon"}, "time"), ({"time": "1:00", "mem": "lots"}, "mem"),
                                       ({"time": "3:00"}, "signal_lead_s"),  # 180 s: the default lead
                                       ({"time": "1-0", "signal_lead_s": 70000}, "signal_lead_s"),
                                       ({"time": "10", "max_runs_without_progress": 0},
                                        "max_runs_without_progress")])
def test_bad_slurm_keys_are_one_line_naming_the_key(tmp_path, data, key):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        SlurmConfig.from_yaml(path)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_the_shipped_slurm_yaml_loads():
    config = SlurmConfig.from_yaml(ROOT / "configs" / "slurm.yaml")
    assert config.stop_signals == ["USR1", "TERM"]
