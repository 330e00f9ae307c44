"""What a Slurm job does in its own processes (engine/slurm_job.py, and the script's requeue):
stopped by the warning signal or a real preemption it checkpoints, requeues itself and resumes bit
for bit; a scancel cancels it, and `sbatch job.sbatch` continues it; runs that make no progress
stop the requeues. On a real one-node cluster (tests/test_slurm.py's fixture, started again for
this module). Then the decisions themselves, without Slurm: the GPU a rank picks, and the books
that stop the requeues."""
import json
import subprocess
import time

import pytest

from conftest import assert_same_as, write_yaml
from engine import checkpoint
from engine.distributed import cuda_device
from engine.errors import ConfigError
from engine.slurm_job import STOP_FILE, SlurmJob, progress, tasks_on_node
from test_resume import reference, references, slow_config  # noqa: F401  (fixtures)
from test_slurm import (AWKWARD, cluster, job_id, restarts, slurm, submit,  # noqa: F401  (a fixture)
                        wait_for_rows, wait_until_gone)


def cancelled(cluster, job):
    """Cancelled, and its processes gone: its last checkpoint is written."""
    return "JobState=CANCELLED" in slurm(cluster, "scontrol", "show", "job", job).stdout


def preempt(cluster, job):
    """A job in the `urgent` partition, which needs the whole node, preempts `job`."""
    slurm(cluster, "sbatch", "--partition=urgent", "--exclusive", "--output=/dev/null", "--wrap", "true")
    deadline = time.time() + 60
    while "PreemptTime=None" in slurm(cluster, "scontrol", "show", "job", job).stdout:
        assert time.time() < deadline, "not preempted"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["warning", "preemption", "scancel"])
def test_a_stopped_training_job_resumes_bit_for_bit(workdir, cluster, reference, stop):  # noqa: F811
    """The warning signal (scancel --signal=USR1) or a preemption (TERM to the batch script too):
    the job checkpoints, requeues itself and resumes. A scancel cancels it; `sbatch job.sbatch`
    in its folder then continues it. All from a folder whose path needs quoting."""
    here = workdir / AWKWARD
    here.mkdir()
    write_yaml(here / "s.yaml", {"time": "10:00", "cpus_per_task": 1, "signal_lead_s": 60})
    write_yaml(here / "c.yaml", {**slow_config(), "group": "stopped"})
    job = job_id(submit(here, cluster, "--run_config", "c.yaml"))
    group_dir = here / "runs" / "test" / "stopped"
    folder = here / "runs" / "test" / "slurm" / f"stopped_{job}"
    wait_for_rows(group_dir / "3" / "metrics.csv", 2)
    time.sleep(0.05)
    if stop == "warning":
        slurm(cluster, "scancel", "--signal=USR1", job)
    elif stop == "preemption":
        preempt(cluster, job)
    else:
        slurm(cluster, "scancel", job)
    # Requeued, the job waits ~10 s before its rerun; cancelled, its processes are gone.
    done = (lambda: cancelled(cluster, job)) if stop == "scancel" else (lambda: restarts(cluster, job) > 0)
    deadline = time.time() + 90
    while not done():
        assert time.time() < deadline, (folder / "log.txt").read_text()
        time.sleep(0.1)
    assert checkpoint.load(group_dir / "3" / "checkpoint.pt")["batch"] > 0  # saved mid-epoch, where it stood
    wait_until_gone(cluster, job)
    if stop == "scancel":
        assert restarts(cluster, job) == 0 and not (group_dir / "4" / "model.pt").exists()  # cut short
        again = subprocess.run(["sbatch", "--parsable", "job.sbatch"], cwd=folder, env=cluster,
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 0, again.stderr
        wait_until_gone(cluster, again.stdout.strip().split(";")[0])
    log = (folder / "log.txt").read_text()
    assert restarts(cluster, job) == (0 if stop == "scancel" else 1), log
    told = "not requeued: the job was cancelled" if stop == "scancel" else "requeued: the rerun resumes"
    assert told in log and log.count("files: ") == 1, log
    assert_same_as(group_dir, reference)


SLOW_START = """\
import pathlib, time
def load(n: int = 10):
    pathlib.Path("loading").touch()
    time.sleep(300)  # a start-up longer than time - signal_lead_s: the signal always comes first
"""


@pytest.mark.slow
def test_a_job_whose_runs_make_no_progress_stops_requeueing(workdir, tiny, cluster):
    (workdir / "slow_start.py").write_text(SLOW_START)
    write_yaml(workdir / "s.yaml", {"time": "10:00", "signal_lead_s": 60, "max_runs_without_progress": 2})
    write_yaml(workdir / "c.yaml", {**tiny, "group": "stuck", "data": "slow_start.load", "data_config": {}})
    job = job_id(submit(workdir, cluster, "--run_config", "c.yaml"))
    for _ in range(2):  # each run is stopped while it loads its data, before any checkpoint
        deadline = time.time() + 90
        while not (workdir / "loading").exists():
            assert time.time() < deadline, "the job did not start (again)"
            time.sleep(0.1)
        (workdir / "loading").unlink()
        slurm(cluster, "scancel", "--signal=USR1", job)
    wait_until_gone(cluster, job, timeout=60)
    folder = workdir / "runs" / "test" / "slurm" / f"stuck_{job}"
    log = (folder / "log.txt").read_text()
    assert restarts(cluster, job) == 1 and "not requeued: its last 2 runs ended on a signal without " \
        "progress" in log, log
    assert (folder / "no_requeue").exists() and not (workdir / "loading").exists()


# --------------------------------------------------------------------------- the decisions, without Slurm

@pytest.mark.parametrize("env, visible, device", [  # visible: what torch.cuda.device_count() says
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "3"}, 1, "cuda:0"),  # gpus_per_task
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "2,3"}, 2, "cuda:0"),  # 2 each
    ({"SLURM_LOCALID": "2", "CUDA_VISIBLE_DEVICES": "2"}, 1, "cuda:0"),  # Slurm's variable alone
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, "cuda:3"),  # torchrun: every process sees all four
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4, "cuda:1"),
    ({"LOCAL_RANK": "2"}, 8, "cuda:2"),  # all of them, the count of local ranks unknown
])
def test_a_rank_trains_on_a_gpu_it_can_see(env, visible, device):
    assert cuda_device(env, visible) == device
    assert int(device.split(":")[1]) < visible


@pytest.mark.parametrize("env, visible", [({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}, 0),
                                          ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 2),  # 4 share 2
                                          ({"LOCAL_RANK": "1"}, 1)])
def test_a_rank_without_a_gpu_of_its_own_is_one_line(env, visible):
    with pytest.raises(ConfigError) as caught:
        cuda_device(env, visible)
    assert "\n" not in str(caught.value) and "GPU" in str(caught.value)


def test_slurms_tasks_per_node_are_read_per_node():
    assert [tasks_on_node("4(x2)", n) for n in (0, 1)] == [4, 4]
    assert [tasks_on_node("3,2(x2)", n) for n in (0, 1, 2)] == [3, 2, 2]


def test_the_books_stop_requeueing_after_runs_without_progress_and_only_then(workdir):
    folder = workdir / "runs" / "p" / "slurm" / "g_1"
    folder.mkdir(parents=True)
    seed = workdir / "runs" / "p" / "g" / "3"

    def run(stalled_before):  # a run of the job, and where its seed folders stood when it started
        return SlurmJob(folder, "runs/p/g/*", 2, None, books=True, task="",
                        progress_at_start=progress("runs/p/g/*"), runs_without_progress=stalled_before)

    def books():
        stalled = json.loads((folder / "progress.json").read_text())["runs_without_progress"]
        return stalled, (folder / STOP_FILE).exists()

    run(0).stopped()  # stopped before it wrote anything
    assert books() == (1, False)
    run(1).stopped()  # the second such run in a row: no more requeues
    assert books() == (2, True)
    seed.mkdir(parents=True)
    checkpoint.save(seed / "checkpoint.pt", {"epoch": 2, "batch": 5})
    moving = run(2)
    checkpoint.save(seed / "checkpoint.pt", {"epoch": 2, "batch": 9})  # this one got somewhere
    moving.stopped()
    assert books() == (0, False)
    standing = run(1)
    checkpoint.save(seed / "checkpoint.pt", {"epoch": 2, "batch": 9})  # saved again where it stood
    standing.stopped()
    assert books() == (2, True)
    (seed / "result.json").write_text(json.dumps({"status": "completed"}))  # a finished seed moved too
    assert progress("runs/p/g/*") != standing.progress_at_start
