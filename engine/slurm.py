"""Slurm: a training or a search as a batch job that survives preemption and time limits.

    python main.py --run_config configs/run_template.yaml --slurm configs/slurm.yaml [--dry-run]
    python main.py --run_config configs/run_template.yaml --optimize_config configs/optimize_template.yaml \\
                   --workers 4 --slurm configs/slurm.yaml

Submitting (on the login node): `submit()` writes an sbatch script and submits it held, saves
the script and the files it runs in runs/<project>/slurm/<name>_<job id>/ (where its logs go
too), then releases it, and returns at once. A search is a job array, one worker per task.

In the job, main.py runs under `srun` with `--slurm-job FOLDER`: engine/slurm_job.py makes the
job's signals (the warning before the time limit, a preemption) stop it with a checkpoint and
exit status 130; the script then requeues the job, and the rerun resumes. Slurm does all the
scheduling: this module only writes the script and calls sbatch and scontrol.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.folders import RUNS_DIR, TEMPLATE_DIR, check_group
from engine.loader import dump_yaml, from_mapping, load_yaml, to_plain
from engine.slurm_job import REQUEUE_STATUS, STOP_FILE, STORAGE_FILE, stop_signal
from engine.studies import hide_password

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import OptimizeConfig, RunConfig

# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_FORMAT = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
MAX_SIGNAL_LEAD_S = 65535  # the most --signal=SIG@<seconds> takes


@dataclass(frozen=True)
class SlurmConfig:
    """How to ask Slurm for the job (configs/slurm.yaml says what each key means)."""
    time: str                     # the time limit, in Slurm's format ("04:00:00", "1-00:00:00")
    partition: str | None = None  # None: the cluster's default partition
    nodes: int = 1
    tasks_per_node: int = 1       # processes per node; more than one in all is DDP (one per GPU)
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem: str | None = None        # per node, e.g. 16G; None: the partition's default
    signal: str = "USR1"          # sent signal_lead_s before the time limit: checkpoint, requeue
    signal_lead_s: int = 180
    max_runs_without_progress: int = 3  # signal-stopped runs in a row that gained nothing: no requeue
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --account=lab
    setup: list[str] = field(default_factory=list)         # shell lines run before Python
    python: str | None = None     # None: the Python that submits (its path, as on the login node)
    source: str = field(default="<dict>", compare=False, repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SlurmConfig:
        data = load_yaml(path)
        if isinstance(data.get("time"), int):  # YAML 1.1 reads an unquoted 1:00:00 as 3600
            raise ConfigError(str(path), "time", f"write it in quotes, e.g. \"01:00:00\" (unquoted, YAML "
                                                 f"reads it as the number {data['time']})")
        config = from_mapping(cls, data, str(path))
        config._validate()
        return config

    def _validate(self) -> None:
        err = lambda key, msg: ConfigError(self.source, key, msg)  # noqa: E731
        if not TIME_FORMAT.fullmatch(self.time):
            raise err("time", f"must be Slurm's minutes, HH:MM:SS or D-HH:MM:SS, got {self.time!r}")
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "signal_lead_s",
                    "max_runs_without_progress"):
            if getattr(self, key) < 1:
                raise err(key, f"must be at least 1, got {getattr(self, key)}")
        if self.gpus_per_task < 0:
            raise err("gpus_per_task", f"must be 0 or more, got {self.gpus_per_task}")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise err("mem", f"must be a size such as 16G or 4000M, got {self.mem!r}")
        if stop_signal(self.signal) is None:
            raise err("signal", f"must be a signal that can be caught (USR1, USR2, TERM, HUP, INT), "
                                f"got {self.signal!r}")
        for i, line in enumerate(self.extra_sbatch):
            if not line.startswith("--"):
                raise err(f"extra_sbatch[{i}]", f"must be an sbatch option, e.g. --account=lab, got {line!r}")
        limit = time_seconds(self.time)  # 0: no time limit, so no warning either
        if limit and self.signal_lead_s >= limit:
            raise err("signal_lead_s", f"must be below `time` ({self.time} is {limit} s), got "
                                       f"{self.signal_lead_s}: the warning would come before any training")
        if self.signal_lead_s > MAX_SIGNAL_LEAD_S:
            raise err("signal_lead_s", f"must be at most {MAX_SIGNAL_LEAD_S} (Slurm's limit), "
                                       f"got {self.signal_lead_s}")

    @property
    def stop_signals(self) -> list[str]:
        """The signals that checkpoint and requeue: the warning signal, and TERM (a preemption)."""
        return list(dict.fromkeys([self.signal.upper().removeprefix("SIG"), "TERM"]))


def time_seconds(time: str) -> int:
    """Slurm's time limit in seconds: minutes, MM:SS, HH:MM:SS, or with days D-HH[:MM[:SS]]."""
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = [(0, parts[0], 0), (0, *parts), tuple(parts)][len(parts) - 1]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


# --------------------------------------------------------------------------- on the login node

@dataclass
class Job:
    """What one submission runs: a name, the command's arguments, and the files it reads."""
    name: str                      # the group or the study
    project: str
    files: dict[str, str]          # file name in the job's folder -> its text
    arguments: list[str]           # main.py's arguments; {folder} stands for the job's folder
    results: str                   # a glob of the seed folders it writes: what progress is measured on
    array: int | None = None       # a search: this many workers, one per array task
    storage: str | None = None     # a search's storage, in a file of the job's folder, never in argv
    watch: list[str] = dataclasses.field(default_factory=list)


def training_job(run_config: RunConfig, resume: bool) -> Job:
    """One job per config. Refuses now, not in the job, what main.py would refuse there."""
    group = run_config.group_name()
    check_group(run_config, RUNS_DIR / run_config.project / group, resume)
    config = run_config.with_overrides({"group": group})
    arguments = ["--run_config", "{folder}/run_config.yaml", *(["--resume"] if resume else [])]
    return Job(group, run_config.project, {"run_config.yaml": dump_yaml(config.to_dict())}, arguments,
               results=f"{RUNS_DIR / run_config.project / group}/*",
               watch=[f"results: {RUNS_DIR / run_config.project / group}/"])


def search_job(run_config: RunConfig, opt_config: OptimizeConfig, workers: int) -> Job:
    """A job array of `workers` workers on one study. The default storage is Optuna's journal
    file, which (unlike SQLite) is safe on the shared filesystems of clusters."""
    opt_config.check_against(run_config)
    study = opt_config.name_for(run_config)
    storage = opt_config.storage or str(RUNS_DIR / run_config.project / "optuna.journal")
    optimize = {k: v for k, v in to_plain(opt_config).items() if k != "storage"}
    files = {"run_config.yaml": dump_yaml(run_config.to_dict()), "optimize_config.yaml": dump_yaml(optimize)}
    arguments = ["--run_config", "{folder}/run_config.yaml",
                 "--optimize_config", "{folder}/optimize_config.yaml"]
    watch = [f"study: {study} in {hide_password(storage)}",
             f"results: {RUNS_DIR / run_config.project}/{study}_t*/"]
    return Job(study, run_config.project, files, arguments,
               results=f"{RUNS_DIR / run_config.project}/{study}_t*/*", array=workers, storage=storage,
               watch=watch)


def sbatch_value(text: str) -> str:
    """`text` as one value in an #SBATCH line, which sbatch reads, not bash: in double quotes, with
    a double quote and a backslash escaped (tested on Slurm 22.05 with spaces, quotes, $ and #)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script(job: Job, slurm: SlurmConfig, cwd: Path, job_id: str | None = None) -> str:
    """The sbatch script. Submitted, its folder is named by its own job id; the copy saved there
    (`job_id` given) names that folder, so that `sbatch job.sbatch` reruns it in the same place."""
    if "\\" in str(cwd) or "\n" in str(cwd):  # Slurm's file name patterns take no backslash
        raise ConfigError(str(cwd).replace("\n", "\\n"), "", "a Slurm job cannot run from a folder whose "
                                                             "path holds a backslash or a line break")
    jobs = f"{RUNS_DIR / job.project}/slurm/{job.name}_"
    folder = shlex.quote(jobs + job_id) if job_id else \
        shlex.quote(jobs) + '"${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"'
    # Absolute, with the folder's own % doubled: sbatch expands %j and %a, also in the folder part.
    log = (f"{str(cwd).replace('%', '%%')}/{jobs}{job_id or ('%A' if job.array else '%j')}/"
           + ("worker%a.log" if job.array else "log.txt"))
    options = [f"--job-name={job.name}", f"--chdir={sbatch_value(str(cwd))}",
               f"--output={sbatch_value(log)}",
               "--open-mode=append",  # a requeued job adds to its log
               "--requeue", f"--signal={slurm.signal.upper().removeprefix('SIG')}@{slurm.signal_lead_s}",
               f"--time={slurm.time}", f"--nodes={slurm.nodes}", f"--ntasks-per-node={slurm.tasks_per_node}",
               f"--cpus-per-task={slurm.cpus_per_task}"]
    options += [f"--partition={sbatch_value(slurm.partition)}"] if slurm.partition else []
    options += [f"--gpus-per-task={slurm.gpus_per_task}"] if slurm.gpus_per_task else []
    options += [f"--mem={slurm.mem}"] if slurm.mem else []
    options += [f"--array=0-{job.array - 1}"] if job.array else []
    python = shlex.quote(slurm.python or sys.executable)
    arguments = " ".join(f'"$folder"{shlex.quote(a.removeprefix("{folder}"))}' if a.startswith("{folder}")
                         else shlex.quote(a) for a in job.arguments)
    source = shlex.quote(slurm.source).replace("\n", "\\n")  # a line break would end the comment
    lines = ["#!/bin/bash",
             f"# Written by main.py --slurm {source}. Resubmit it as it is: sbatch <this file>",
             *(f"#SBATCH {option}" for option in [*options, *slurm.extra_sbatch]), "",
             "# Where --chdir is gone, Slurm would run the job in /tmp: never write runs/ there.",
             f"cd {shlex.quote(str(cwd))} || exit 1",
             *([*slurm.setup, ""] if slurm.setup else []),
             f"folder={folder}",
             "export TQDM_DISABLE=1 OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK"]
    if slurm.nodes * slurm.tasks_per_node > 1:  # DDP: every task is a rank; rank 0's node is the host
        addr = "scontrol show node \"$first\" | grep -o 'NodeAddr=[^ ]*' | cut -c10-"  # Slurm's own address
        lines += ['first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  f"export MASTER_ADDR=$({addr})",
                  "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"]
    stop = f'"$folder"/{STOP_FILE}${{SLURM_ARRAY_TASK_ID:+.$SLURM_ARRAY_TASK_ID}}'
    main = shlex.quote(str(TEMPLATE_DIR / "main.py"))
    lines += ["# A preemption, the time limit or a scancel sends TERM to this script too: noted, and the",
              "# script lives on, waits for Python's checkpoint and can still requeue.",
              "terminated=''",
              "trap 'terminated=1' TERM",
              "# Under srun, Slurm's signals reach Python (a batch script's own child would miss them).",
              f'srun {python} {main} {arguments} --slurm-job "$folder"',
              "status=$?",
              f"# {REQUEUE_STATUS}: a signal stopped Python after a checkpoint. Back in the queue, where the "
              "rerun resumes,",
              f"# unless Python left {STOP_FILE} (its last runs made no progress), or TERM came for another",
              "# reason than a preemption or the time limit (a plain scancel cancels).",
              f'if [ "$status" -eq {REQUEUE_STATUS} ] && [ ! -e {stop} ]; then',
              '  if [ -z "$terminated" ] || scontrol show job "$SLURM_JOB_ID" | grep -qE '
              "'Reason=TimeLimit|PreemptTime=[0-9]'; then",
              '    echo "requeued: the rerun resumes from the checkpoints"',
              '    scontrol requeue "$SLURM_JOB_ID"',
              "  else",
              '    echo "not requeued: the job was cancelled; sbatch job.sbatch in $folder continues it"',
              "  fi",
              "fi",
              'exit "$status"', ""]
    return "\n".join(lines)


def submit(slurm_path: str, job: Job, dry_run: bool) -> int:
    """Submit the job held, save its script and files, release it; print where to look."""
    slurm = SlurmConfig.from_yaml(slurm_path)
    text = script(job, slurm, Path.cwd())
    if dry_run:
        print(text, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--slurm", "", "sbatch is not on the PATH: submit from a Slurm login node "
                                         "(--dry-run prints the script without it)")
    # Held until its files are in place, so that it never starts without them.
    done = subprocess.run([sbatch, "--parsable", "--hold"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(slurm.source, "", f"sbatch refused the job: "
                                            f"{one_line(done.stderr or done.stdout)}")
    job_id = done.stdout.strip().split(";")[0]
    folder = RUNS_DIR / job.project / "slurm" / f"{job.name}_{job_id}"
    spec = {"signals": slurm.stop_signals, "results": job.results,
            "max_runs_without_progress": slurm.max_runs_without_progress}
    try:
        folder.mkdir(parents=True)
        for name, content in {**job.files, "job.json": json.dumps(spec, indent=2) + "\n",
                              "job.sbatch": script(job, slurm, Path.cwd(), job_id)}.items():
            (folder / name).write_text(content)
        if job.storage is not None:  # it may hold a password: its owner alone may read it
            private = os.open(folder / STORAGE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(private, "w") as f:
                f.write(job.storage + "\n")
    except OSError as e:
        subprocess.run(["scancel", job_id], capture_output=True)
        raise ConfigError(str(folder), "", f"cannot write the job's files ({e.strerror or e}); "
                                           f"job {job_id} was cancelled") from None
    released = subprocess.run(["scontrol", "release", job_id], capture_output=True, text=True)
    if released.returncode != 0:
        raise ConfigError(slurm.source, "", f"job {job_id} is held: scontrol release failed: "
                                            f"{one_line(released.stderr)}")
    logs = folder / ("worker<i>.log" if job.array else "log.txt")
    workers = f"{job.array} worker(s), array tasks 0-{job.array - 1}" if job.array else "training"
    print("\n".join([f"submitted job {job_id} ({workers}): {job.name}",
                     f"script and configs: {folder}/", f"logs: {logs}",
                     f"watch: squeue -j {job_id}; tail -f {logs}".replace("<i>", "0"), *job.watch]))
    return 0


def one_line(text: str) -> str:
    """sbatch's message in one line, without its "sbatch: error: " prefixes."""
    return "; ".join(re.sub(r"^\w+: error: ", "", line).strip() for line in text.strip().splitlines()) \
        or "no message"
