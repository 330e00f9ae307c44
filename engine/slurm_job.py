"""Inside a Slurm job: what main.py does when the script that engine/slurm.py wrote runs it as
`main.py ... --slurm-job FOLDER` (FOLDER: runs/<project>/slurm/<name>_<job id>/).

    job = start(folder)        # first: Slurm's signals stop training, srun's tasks become ranks
    resume = job.resume(run_config)  # continue the group that an earlier run of this job made
    job.stopped()              # after a signal: no more requeues when the last runs made no progress

A signal (the warning before the time limit, a preemption) raises KeyboardInterrupt, as Ctrl-C
does: the Trainer saves a checkpoint of the exact position and main.py exits 130, which tells
the script to requeue the job. Task 0 (of each array task) keeps the job's books in FOLDER: how
many runs in a row ended on a signal without progress, and, once that reaches the YAML's
`max_runs_without_progress`, the file that tells the script not to requeue (STOP_FILE).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.folders import FINISHED_STATUSES, RUNS_DIR

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig

REQUEUE_STATUS = 130         # main.py's exit status after a signal stopped it with a checkpoint saved
STOP_FILE = "no_requeue"     # in the job's folder (.<array task> appended): the script does not requeue
STORAGE_FILE = "storage"     # a search's storage URL, readable by its owner only: never in argv


def stop_signal(name: str) -> signal.Signals | None:
    """The signal called `name` (USR1 or SIGUSR1), when a process can catch it; else None."""
    try:
        sig = signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"]
    except KeyError:
        return None
    return None if sig in (signal.SIGKILL, signal.SIGSTOP) else sig


@dataclass
class SlurmJob:
    """One run of a job, in one of its tasks: its folder, and what it found there when it started."""
    folder: Path
    results: str                  # a glob of the seed folders the job writes, from where it runs
    max_runs_without_progress: int
    storage: str | None           # a search's storage URL (the file's, not the command line's)
    books: bool                   # task 0 keeps the books (under DDP, rank 0: the one that writes)
    task: str                     # ".<array task id>" in a job array, else ""
    progress_at_start: dict | None = None
    runs_without_progress: int = 0

    def resume(self, run_config: RunConfig) -> bool:
        """Whether this run continues the group: yes once an earlier run of this job saved its
        config.yaml (a requeue, or `sbatch job.sbatch` again). Submission refused a group with
        results unless --resume, and run() refuses a group trained with another config. Every rank
        decides before run() lets rank 0 write (a barrier), so all ranks decide alike."""
        return (RUNS_DIR / run_config.project / run_config.group_name() / "config.yaml").exists()

    def stopped(self) -> None:
        """After a signal stopped this run, task 0 keeps the books: when this run and the ones
        before it, `max_runs_without_progress` in a row, ended on a signal with the job's seed
        folders where they stood (a start-up that outlasts time - signal_lead_s would otherwise be
        requeued forever), it writes STOP_FILE, which the script reads, and says so in the log."""
        if not self.books:
            return
        stalled = 0 if progress(self.results) != self.progress_at_start else self.runs_without_progress + 1
        stop = self.folder / f"{STOP_FILE}{self.task}"
        with contextlib.suppress(OSError):  # without its books the job requeues, as it did before
            (self.folder / f"progress{self.task}.json").write_text(
                json.dumps({"runs_without_progress": stalled}) + "\n")
            if stalled < self.max_runs_without_progress:
                stop.unlink(missing_ok=True)
                return
            line = (f"not requeued: its last {stalled} runs ended on a signal without progress (no "
                    "checkpoint moved, no seed or trial finished); make start-up shorter or `time` longer "
                    f"in the Slurm YAML, then resubmit: sbatch {self.folder}/job.sbatch")
            stop.write_text(line + "\n")
            print(line, file=sys.stderr)


def start(folder: str) -> SlurmJob:
    """Called first in the job: the job's signals raise KeyboardInterrupt, srun's tasks become
    torch.distributed ranks, and task 0 notes where the job's seed folders stand."""
    path = Path(folder)
    try:
        spec = json.loads((path / "job.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(path / "job.json"), "", f"cannot be read ({e}): submit again with --slurm") \
            from None
    for name in spec["signals"]:
        sig = stop_signal(name)
        if sig is None:
            raise ConfigError(str(path / "job.json"), "signals", f"{name!r} is not a signal that can be "
                                                                 "caught")
        signal.signal(sig, signal.default_int_handler)
    env = os.environ
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if tasks > 1 and "WORLD_SIZE" not in env:  # srun's tasks, not torchrun's
        env.update(WORLD_SIZE=str(tasks), RANK=env["SLURM_PROCID"], LOCAL_RANK=env["SLURM_LOCALID"])
        if "SLURM_STEP_TASKS_PER_NODE" in env:  # e.g. "4(x2)": what the GPU choice compares with
            env["LOCAL_WORLD_SIZE"] = str(tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"],
                                                        int(env.get("SLURM_NODEID", "0"))))
    storage = path / STORAGE_FILE
    job = SlurmJob(path, spec["results"], spec["max_runs_without_progress"],
                   storage.read_text().strip() if storage.exists() else None,
                   books=env.get("SLURM_PROCID", "0") == "0",
                   task=f".{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID") else "")
    if job.books:
        if int(env.get("SLURM_RESTART_COUNT", "0")) == 0:  # a new submission starts a new count
            (path / f"{STOP_FILE}{job.task}").unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError, ValueError, KeyError):  # none: the count starts again
                books = json.loads((path / f"progress{job.task}.json").read_text())
                job.runs_without_progress = int(books["runs_without_progress"])
        job.progress_at_start = progress(job.results)
    return job


def tasks_on_node(spec: str, node: int) -> int:
    """The tasks on node `node` from Slurm's per-node counts, e.g. "4(x2)" or "3,2"."""
    counts: list[int] = []
    for part in spec.split(","):
        count, _, times = part.partition("(x")
        counts += [int(count)] * int(times.rstrip(")") or 1)
    return counts[node]


def progress(results: str) -> dict[str, list]:
    """Where each seed folder matching `results` stands: a finished seed's (or trial's) status,
    else its checkpoint's epoch and batch. It changes exactly when a run got somewhere."""
    found = {}
    for folder in sorted(Path().glob(results)):
        if folder.is_dir():
            found[str(folder)] = _position(folder)
    return found


def _position(folder: Path) -> list:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        status = json.loads((folder / "result.json").read_text()).get("status")
        if status in (*FINISHED_STATUSES, "pruned", "failed"):
            return [status]
    if not (folder / "checkpoint.pt").exists():
        return []
    import torch  # only where a checkpoint exists: a job's first start reads none
    try:  # mmap: only the small record is read, however large the weights
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
        return [state["epoch"], state["batch"]]
    except Exception:  # damaged, or mid-rename: the resume that reads it says what is wrong
        return ["unreadable"]
