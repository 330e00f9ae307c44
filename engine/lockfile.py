"""Reading the lock files (requirements.lock, requirements-dev.lock) that `python3 bootstrap.py
lock` makes with uv: each pin, and what it is there for. The standard library only: bootstrap.py
reads the locks before any environment exists, and provenance.py compares the environment with
them (importing `engine` imports nothing else).

    pins = read_lock(Path("requirements.lock").read_text())   # [Pin(name, line, version, marker, via)]
    only_for_torch(pins)                                       # {"torch", "nvidia-...", "triton", ...}
"""
from __future__ import annotations

import re
from typing import NamedTuple


class Pin(NamedTuple):
    name: str      # normalised: lower case, runs of - _ . as one -
    line: str      # as the lock has it, marker included
    version: str
    marker: str    # "" where it holds everywhere
    via: set[str]  # the `# via` names: a package, "-r requirements.txt" (a requirement), "-c ..."


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def read_lock(text: str) -> list[Pin]:
    pins: list[Pin] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement, _, marker = line.partition(";")
            name, _, version = requirement.partition("==")  # uv pins exactly: name[extras]==version
            pins.append(Pin(normalized(name.split("[")[0]), line, version.strip(), marker.strip(), set()))
        elif pins and line.lstrip().startswith("#"):
            via = re.sub(r"^via(\s+|$)", "", line.strip().lstrip("#").strip())
            if via:
                pins[-1].via.add(via)
    return pins


def only_for_torch(pins: list[Pin]) -> set[str]:
    """The names the lock has only because torch needs them, torch included: those that no
    requirement but torch leads to through the `# via` chains (the CUDA packages of PyPI's
    Linux torch, for one), which a CPU build of torch does without."""
    wanted_by: dict[str, set[str]] = {}
    for pin in pins:
        wanted_by.setdefault(pin.name, set()).update(pin.via)
    kept = {name for name, via in wanted_by.items()
            if name != "torch" and any(v.startswith("-r ") for v in via)}
    while grown := {name for name, via in wanted_by.items() if name not in kept and name != "torch"
                    and via & kept}:
        kept |= grown
    return set(wanted_by) - kept
