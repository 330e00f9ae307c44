"""Checkpoints that survive crashes: atomic writes, safe loads, and the RNG states
that make a resumed run continue exactly where the original would have gone.

    save(path, state)        # temporary file, flush, fsync, rename, fsync the folder
    write_text(path, text)   # the same for the text files a run writes (config, JSON)
    write_json(path, data)
    state = load(path)       # torch.load(weights_only=True): never runs pickled code

A process killed during a write leaves the previous file intact (the rename is the
only step that replaces it, and it is atomic on POSIX file systems).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from engine.errors import ConfigError


def save(path: Path, state: Any) -> None:
    _write_atomically(path, lambda f: torch.save(state, f))


def write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk only when the folder is synced
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> Any:
    """Load tensors and plain containers only, on the CPU; a file carrying code is refused.

    Always on the CPU, whichever device wrote the file: the RNG states in a checkpoint must
    stay CPU ByteTensors, and load_state_dict moves weights and optimizer state to wherever
    the model already is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(str(path), "", "refused: not a plain weights/checkpoint file (anything that "
                          f"would run code is never loaded): {str(e).splitlines()[0]}") from None


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
