"""How to reproduce a group: what ran, from which code, on what, and when.

run() writes runs/<project>/<group>/provenance.json with one entry per invocation
(a resume adds one): the command line and its overrides, the config hash, the git
commit and whether the tree was dirty, Python, torch, CUDA and package versions,
the device name and torch's CPU kernel set, whether the packages are requirements.lock's,
and the start and end time.
"""
from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from engine import checkpoint
from engine.folders import TEMPLATE_DIR
from engine.lockfile import normalized, only_for_torch, read_lock
from engine.locks import lock

PACKAGES = ("torch", "numpy", "optuna", "wandb", "pyyaml", "tqdm", "matplotlib")
LOCK = TEMPLATE_DIR / "requirements.lock"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=TEMPLATE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _installed() -> dict[str, str]:
    """name -> version of what this Python imports, from the `<name>-<version>.dist-info` folder
    names that installers write: reading each package's metadata instead costs ~100x more."""
    found: dict[str, str] = {}
    for folder in sys.path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in names:
            stem = entry[:-len(".dist-info")]
            if entry.endswith(".dist-info") and stem.count("-") == 1:
                name, installed = stem.split("-")
                found.setdefault(normalized(name), installed)  # the first on sys.path is imported
    return found


def lock_state(lock_file: Path = LOCK) -> dict:
    """Whether the installed packages are the lock's: each pin whose marker holds here, compared by
    public version (torch 2.13.0+cpu is the lock's 2.13.0). What the lock has only for torch may be
    missing: torch's builds need different packages (the CPU build needs no nvidia-*, no triton)."""
    state = {"file": lock_file.name, "matches": None, "differs": []}
    try:
        text = lock_file.read_text()
    except OSError:
        return {**state, "note": f"no {lock_file.name} next to main.py: nothing to compare with"}
    try:
        from packaging.markers import Marker
        from packaging.version import Version
        pins = read_lock(text)
        optional = only_for_torch(pins)
        installed = _installed()
        for name, _, pinned, marker, _ in pins:
            if marker and not Marker(marker).evaluate():
                continue
            found = installed.get(name)
            if found is None and name not in optional:
                found = _version(name)  # installed some other way (an .egg-info), or missing
                if found is None:
                    state["differs"].append(f"{name} missing (lock {pinned})")
            if found is not None and Version(found.split("+")[0]) != Version(pinned.split("+")[0]):
                state["differs"].append(f"{name} {found} (lock {pinned})")
    except (ImportError, ValueError) as e:  # packaging's InvalidMarker/InvalidVersion are ValueErrors
        return {**state, "note": f"{lock_file.name} could not be read: {e}"}
    return {**state, "matches": not state["differs"]}


def start(group_dir: Path, config_hash: str, device: str, overrides: list[str],
          how: dict | None = None) -> dict:
    """Append this invocation to provenance.json and return its entry (see finish). `how` says
    how the seeds train (together, or one by one and why)."""
    status = _git("status", "--porcelain")
    entry = {
        "id": secrets.token_hex(4),  # finish() updates this entry, whatever others append meanwhile
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),  # quoted: it can be pasted back
        "overrides": list(overrides),
        "config_hash": config_hash,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {p: _version(p) for p in PACKAGES},
        "lock": lock_state(),
        "device": device,
        "device_name": _device_name(device),
        # torch's SIMD kernels (e.g. AVX2 vs AVX512) sum in different orders: the same
        # seed can differ in its last bits between two machines whose values differ here.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "host": platform.node(),
        "cwd": os.getcwd(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ended": None,
        **(how or {}),
    }
    _append(group_dir / "provenance.json", config_hash, entry)
    return entry


def finish(group_dir: Path, entry: dict, status: str) -> None:
    entry["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry["status"] = status
    _append(group_dir / "provenance.json", entry["config_hash"], entry, replace_last=True)


def _append(path: Path, config_hash: str, entry: dict, replace_last: bool = False) -> None:
    with lock(path.parent, wait=True):  # two processes on one group (--resume) both append
        data = json.loads(path.read_text()) if path.exists() else {"invocations": []}
        data["config_hash"] = config_hash
        same = [i for i, e in enumerate(data["invocations"]) if e.get("id") == entry["id"]]
        if replace_last and same:
            data["invocations"][same[-1]] = entry
        else:
            data["invocations"].append(entry)
        checkpoint.write_json(path, data)
