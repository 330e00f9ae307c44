"""Where things are: the template's own folder, and runs/<project>/<group>/<seed>/, where
results go, with the checks made before anything is written there: results are never
overwritten, a resume never mixes two configs, and two processes never train one seed
(an flock per seed, on a file system whose flock works; see docs/runs.md)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from engine.errors import ConfigError
from engine.loader import from_mapping, load_yaml
from engine.resolve import Untrusted

if TYPE_CHECKING:  # types only: the engine imports none of your files when it runs
    from config import RunConfig

RUNS_DIR = Path("runs")                            # relative: results land where you run from
TEMPLATE_DIR = Path(__file__).resolve().parent.parent  # main.py, and the git checkout provenance reads
# The statuses of a seed that has nothing left to train (unless `epochs` is raised).
FINISHED_STATUSES = ("completed", "early_stopped", "diverged")
MOUNTINFO = Path("/proc/self/mountinfo")  # Linux: each mount's file system type and options


class LockUnavailable(ConfigError):
    """The file system under runs/ gives no working flock: every run there would fail the same way."""


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder under runs/ (a project, group or study), or None."""
    if not re.fullmatch(r"[\w.-]+", name):
        return f"must be a folder name (letters, digits, _ . -), got {name!r}"
    if name in (".", ".."):  # allowed characters, but they mean "here" and "the folder above"
        return f"must name a folder of its own, not {name!r}"
    return None


def check_group(config: RunConfig, group_dir: Path, resume: bool) -> None:
    """Refuse, before writing anything, to overwrite results or to resume another config.
    The saved config is read back only to compare (saved_config): nothing it names is imported."""
    for key, name in (("project", group_dir.parent.name), ("group", group_dir.name)):
        if name_problem(name) or group_dir.parent.parent != RUNS_DIR:  # a group given by code
            raise ConfigError(config.source, key, name_problem(name) or f"{group_dir} is not in {RUNS_DIR}/")
    if group_dir.exists() and not group_dir.is_dir():
        raise ConfigError(config.source, "project", f"{group_dir} exists and is not a folder")
    for parent in (RUNS_DIR, RUNS_DIR / config.project):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(str(parent), "", "exists and is not a folder, so runs cannot be written there")
    started = [str(s) for s in config.seeds if (group_dir / str(s)).exists()]
    saved = group_dir / "config.yaml"
    if not resume:
        if started:
            raise ConfigError(config.source, "seeds",
                              f"{group_dir}/ already holds seed(s) {', '.join(started)}; results are never "
                              "overwritten: pass --resume to continue unfinished seeds (finished ones are "
                              "kept), or delete that folder to train again")
    elif not saved.exists():
        nearest = nearest_group(config, group_dir.parent)
        hint = f"; the nearest, {nearest[0]}, differs in {', '.join(nearest[1])}" if nearest else ""
        raise ConfigError(config.source, "group", f"nothing to resume at {group_dir}/{hint}")
    if saved.exists():
        differing = saved_config(config, saved).differences(config)
        if differing:
            raise ConfigError(config.source, differing[0],
                              f"{group_dir}/ was trained with a different config (differs in "
                              f"{', '.join(differing)}); only {', '.join(config.run_only_keys)} may change")
    check_locks(group_dir)


def check_locks(group_dir: Path) -> None:
    """Raise LockUnavailable, before anything is written, where flock fails (Lustre mounted
    without flock: ENOSYS; NFS without its lock service: ENOLCK). The probe is a temporary file
    in the nearest folder that exists; where none can be made, the first write reports why."""
    folder = next(p for p in (group_dir, *group_dir.parents) if p.is_dir())
    try:
        fd, probe = tempfile.mkstemp(prefix=".lock-probe-", dir=folder)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a fresh file that someone else locked: flock works
        pass
    except OSError as e:
        raise no_locks(group_dir, folder, e) from None
    finally:
        os.close(fd)
        os.unlink(probe)


def no_locks(where: Path, folder: Path, error: OSError) -> LockUnavailable:
    mount = mount_of(folder)
    which = f"this file system ({mount['type']} at {mount['point']})" if mount else "this file system"
    return LockUnavailable(str(where), "", f"{which} gives no file locks (flock: {error.strerror}), and "
                           "without them two processes could train one seed; run from a folder on one that "
                           "has them: a local disk, NFS with its lock service, Lustre mounted with -o flock")


def nearest_group(config: RunConfig, project_dir: Path) -> tuple[str, list[str]] | None:
    """The saved group whose config differs from `config` in the fewest keys, and those keys."""
    candidates = []
    for saved in sorted(project_dir.glob("*/config.yaml")):
        try:
            candidates.append((saved.parent.name, saved_config(config, saved).differences(config)))
        except ConfigError:
            continue
    return min(candidates, key=lambda c: len(c[1])) if candidates else None


def saved_config(config: RunConfig, path: Path) -> RunConfig:
    """A saved config, read with the class of `config` only to compare with it: typed and checked
    like any file, but nothing it names is imported, so a folder copied in runs no code."""
    return from_mapping(type(config), load_yaml(path), str(path))


def untrusted(folder: Path, hint: str = "pass --trust if you trust this folder") -> Untrusted:
    """How a config read from the run folder `folder` is checked (engine/resolve.py): the
    project's own code is what lies under the template's folder and the current one (which
    main.py and analyze.py put on sys.path, and where users keep their models); runs/ holds
    results, never code."""
    return Untrusted(folder, (TEMPLATE_DIR, Path.cwd()), RUNS_DIR, hint)


def claim_seeds(config: RunConfig, group_dir: Path) -> None:
    """Make a fresh run's seed folders, each with an exclusive mkdir: of two processes that both
    passed check_group (two identical commands started together), exactly one gets them."""
    made = []
    for seed in config.seeds:
        try:
            (group_dir / str(seed)).mkdir()
        except FileExistsError:
            for folder in made:
                folder.rmdir()
            raise ConfigError(config.source, "seeds", f"{group_dir}/{seed} was just made by another process "
                              "running this config; results are never overwritten (with --resume, "
                              "processes share the unfinished seeds)") from None
        made.append(group_dir / str(seed))


@contextlib.contextmanager
def lock(folder: Path, wait: bool) -> Iterator[bool]:
    """Hold folder/.lock while the block runs; yields False when another process holds it and
    `wait` is False. An flock: the kernel releases it when its process dies, even by SIGKILL.
    Where the file system keeps flocks within one node, says so once (see node_local_locks)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: check_locks catches these before a run writes
            raise no_locks(folder, folder, e) from None
        warn_if_node_local(folder)
        yield True
    finally:
        os.close(fd)  # closing the file releases the lock


_warned: set[int] = set()  # the devices (file systems) already warned about, once per process


def warn_if_node_local(folder: Path) -> None:
    device = folder.stat().st_dev
    if device in _warned:
        return
    _warned.add(device)
    mount = mount_of(folder)
    reason = mount and node_local_locks(mount["type"], mount["options"])
    if reason:
        print(f"warning: {folder} is on {reason}, whose locks hold only within one node: never run two "
              f"processes on one group from two nodes (see docs/runs.md)", file=sys.stderr)


def mount_of(folder: Path) -> dict | None:
    """The mount that holds `folder`, from /proc/self/mountinfo, matched by device number (and,
    among bind mounts of one device, by path): {"type", "point", "options"}, with the mount's
    and the file system's options together."""
    try:
        device, lines = folder.stat().st_dev, MOUNTINFO.read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return None
    mounts = []
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:] or fields[2] != f"{os.major(device)}:{os.minor(device)}":
            continue
        rest = fields[fields.index("-", 6) + 1:]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
        options = set(fields[5].split(",")) | set(rest[2].split(",") if len(rest) > 2 else ())
        mounts.append({"type": rest[0], "point": point, "options": options})
    path = os.path.realpath(folder)
    holding = [m for m in mounts if os.path.commonpath([path, m["point"]]) == m["point"]]
    return max(holding, key=lambda m: len(m["point"]), default=mounts[-1] if mounts else None)


def node_local_locks(fs_type: str, options: set[str]) -> str | None:
    """Why flock on this mount holds only within the node that took it, or None where it is
    coherent across nodes (or local, or unknown)."""
    if fs_type in ("nfs", "nfs4"):
        local = next((o.split("=", 1)[1] for o in options if o.startswith("local_lock=")), "none")
        if "nolock" in options or local in ("flock", "all"):
            return f"NFS mounted with {'nolock' if 'nolock' in options else f'local_lock={local}'}"
    if fs_type == "lustre" and "localflock" in options:
        return "Lustre mounted with localflock"
    if fs_type == "beegfs" and not beegfs_global_locks(options):
        return "BeeGFS without tuneUseGlobalFileLocks"
    return None


def beegfs_global_locks(options: set[str]) -> bool:
    """BeeGFS keeps flocks on each client unless its client config sets tuneUseGlobalFileLocks."""
    config = next((o.split("=", 1)[1] for o in options if o.startswith("cfgFile=")),
                  "/etc/beegfs/beegfs-client.conf")
    try:
        text = Path(config).read_text()
    except OSError:
        return False
    return re.search(r"^\s*tuneUseGlobalFileLocks\s*=\s*true\b", text, re.M | re.I) is not None
