"""File locks for runs/: an flock per seed folder (and for provenance.json), which the kernel frees
when its process dies, even by SIGKILL; and whether the file system there gives locks that hold.

    with lock(seed_dir, wait=False) as mine:   # False: another process holds it
    check_locks(group_dir)                    # before a run writes: LockUnavailable where flock fails

Where flock fails (Lustre without flock: ENOSYS; NFS without its lock service: ENOLCK), one line
says so before anything is written. Where it holds only within one node (NFS local_lock, Lustre
localflock, BeeGFS without global locks), one warning per process says so (docs/runs.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from engine.errors import ConfigError

MOUNTINFO = Path("/proc/self/mountinfo")  # Linux: each mount's file system type and options


class LockUnavailable(ConfigError):
    """The file system under runs/ gives no working flock: every run there would fail the same way."""


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
