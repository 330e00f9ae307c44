"""Checkpoints that survive crashes: atomic writes, safe loads, and the RNG states
that make a resumed run continue exactly where the original would have gone.

    save(path, state)        # temporary file, flush, fsync, rename, fsync the folder
    save(path, state, keep_previous=True)   # the file it replaces becomes <name>.prev.pt
    write_text(path, text)   # the same for the text files a run writes (config, JSON)
    write_json(path, data)
    state = load(path)       # checksums first, then torch.load(weights_only=True)

A process killed during a write leaves the previous file intact (the rename is the
only step that replaces it, and it is atomic on POSIX file systems). A write that fails
(a full disk) leaves no temporary file and raises WriteError, saying how much was written.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from engine.errors import ConfigError, first_line


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota): one line says which, how big."""

    def __str__(self) -> str:
        return self.strerror


class Unreadable(ConfigError):
    """A file cut short or corrupt, as opposed to one refused for carrying code."""


def save(path: Path, state: Any, keep_previous: bool = False) -> None:
    """torch.save, atomically. With keep_previous the file it replaces is renamed to
    <stem>.prev<suffix> (a rename: no extra write), for when the newest one turns out damaged."""
    previous = previous_of(path) if keep_previous else None
    _write_atomically(path, lambda f: torch.save(state, f), previous)


def previous_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _write_atomically(path: Path, write: Callable[[IO[bytes]], Any], previous: Path | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind; the old file stays
        full = disk_full(e)
        if full is not None:
            raise _write_error(path, write, full) from None
        raise
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk only when the folder is synced
        os.fsync(directory)
    finally:
        os.close(directory)


def disk_full(error: BaseException) -> OSError | None:
    """The "no space" (or quota) error in `error`'s chain: torch.save, for one, reports a
    failed write as a RuntimeError raised while it handles the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__context__
    return None


class _Counter:
    """A file that only counts what is written to it: the size of what did not fit."""
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _write_error(path: Path, write: Callable[[Any], Any], error: OSError) -> WriteError:
    counter = _Counter()
    write(counter)
    stat = os.statvfs(path.parent)
    return WriteError(error.errno, f"{path}: cannot write {_size(counter.size)}: {error.strerror} "
                                   f"({_size(stat.f_bavail * stat.f_frsize)} free there); the previous "
                                   "version is intact: free some space, then continue with --resume")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def load(path: Path) -> Any:
    """Load tensors and plain containers only, on the CPU, from a file whose checksums hold.

    The file is read once: the checksums and the load use the same bytes, which matters for a
    large checkpoint on a network file system. A damaged file (cut short, or bit rot: torch.load
    itself checks no checksum) raises Unreadable; a file carrying code is refused (ConfigError)
    and never run. Always on the CPU, whichever device wrote the file: the RNG states in a
    checkpoint must stay CPU ByteTensors, and load_state_dict moves weights and optimizer state
    to wherever the model already is."""
    try:
        data = io.BytesIO(Path(path).read_bytes())
    except OSError as e:
        raise Unreadable(str(path), "", f"cannot be read: {e.strerror or e}") from None
    problem = damage(data)
    if problem is not None:
        raise Unreadable(str(path), "", problem)
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # intact, but it holds more than tensors and plain data
        reason = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise ConfigError(str(path), "", "refused: not a plain weights/checkpoint file (anything that "
                          f"would run code is never loaded): {(reason or ['weights_only'])[0]}") from None
    except Exception as e:
        raise Unreadable(str(path), "", f"cannot be read: {first_line(e)}") from None


def damage(file: Path | IO[bytes]) -> str | None:
    """What is wrong with a file torch.save wrote (a zip archive with a CRC-32 per record), or None."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError):
        bad = "the archive"
    if hasattr(file, "seek"):
        file.seek(0)
    return None if bad is None else f"cannot be read: truncated or corrupt ({bad} is incomplete or fails " \
                                    "its checksum)"


def rng_states() -> dict:
    """Python, NumPy, torch and CUDA generator states, in types weights_only can load."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np_state = states["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # Saved on a machine with more GPUs than this one: restore those that exist here.
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
