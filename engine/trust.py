"""Configs read back from run folders (analyze.py, load_run): a folder is shared like a checkpoint,
and importing and calling what its config.yaml names runs code. `Untrusted.check` refuses, before
anything is imported, an import path outside this project's own files and ALLOWED; `--trust`
(`load_run(..., trust=True)`) lifts it. engine/folders.py's `untrusted()` makes one; the one
import-path resolver, engine/resolve.py, asks it. docs/trust.md has the rules and why.
"""
from __future__ import annotations

import importlib.util
import site
import sys
import sysconfig
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# What a run folder's config may name besides this project's own files: the layers, losses,
# optimizers, schedulers, samplers and pruners that configs are made of. Sub-packages, not whole
# packages: torch and numpy also hold torch.load, torch.hub.load, numpy.load and
# torch.utils.cpp_extension.load, which run whatever a file or the network hands them.
ALLOWED = ("torch.nn", "torch.optim", "optuna.samplers", "optuna.pruners", "engine.pruner")
# The template's machinery writes files, starts processes and trains configs (main.main would
# train a config of the folder's choosing, as the user's own): no config names it.
MACHINERY = ("engine", "main", "analyze", "config", "bootstrap", "bench", "conftest")


class Refused(ImportError):
    """An import path that a config from a run folder may name only if the user trusts it."""


@dataclass(frozen=True)
class Untrusted:
    """A config's origin when it is not the user's own: a run folder, shared like a checkpoint
    (engine/folders.py's `untrusted` makes one). Its import paths must name this project's own
    files (modules under `own`, bar installed packages and whatever came with the run folder)
    or ALLOWED; `hint` says how the user trusts the folder instead."""
    folder: Path                 # the run folder the config came from
    own: tuple[Path, ...]        # the project's folders: the template's and the current one
    results: Path                # where runs go (runs/): results, never code
    hint: str = "pass --trust if you trust this folder"

    def refuse(self, path: str, why: str) -> NoReturn:
        raise Refused(f"refusing {path!r} from a run folder: {why}; {self.hint}")

    def check(self, path: str) -> None:
        """Refuse `path` before anything is imported: importing a module runs it."""
        parts = path.split(".")
        if any(part.startswith("_") for part in parts):  # __init__.__globals__ reaches anything
            self.refuse(path, "it names a private attribute")
        shipped = self._places()[1]
        for entry in (e for e in sys.path if isinstance(e, str)):  # it would make its files look like ours
            if _inside(Path(entry or "."), shipped):
                self.refuse(path, f"Python imports from {Path(entry or '.').resolve()}, which came with "
                                  "the run folder")
        if _under_allowed(path):
            spec = _find_spec(parts[0])
            if spec is not None and _inside_any(_locations(spec), shipped):  # a torch.py it ships
                self.refuse(path, "it is code that came with the run folder")
            return
        if parts[0] in MACHINERY:
            self.refuse(path, "it is the template's machinery, which a config does not name")
        for cut in range(1, len(parts)):  # each level's parent has passed, so may be imported
            spec = _find_spec(".".join(parts[:cut]))
            if spec is None:  # attributes from here on (or nothing: resolve() says which)
                return
            why = self._why_not_own(spec)
            if why:
                self.refuse(path, f"it is {why}")

    def check_defined(self, path: str, found_in: str, obj: Any) -> None:
        """After the import: refuse what `path` finds in an allowed or own module but is defined
        elsewhere (`util.run` after `from subprocess import run` in util.py)."""
        where = getattr(obj, "__module__", None)
        if not isinstance(where, str) or where == found_in or _under_allowed(where):
            return
        if isinstance(obj, types.BuiltinFunctionType) and _under_allowed(found_in) and \
                where.partition(".")[0] == "torch":  # the tensor ops torch.nn.functional re-exports
            return
        spec = getattr(sys.modules.get(where), "__spec__", None)
        why = "the template's machinery" if where.partition(".")[0] in MACHINERY else \
            "outside this project and the allowed packages" if spec is None else self._why_not_own(spec)
        name = f"{where}.{obj.__qualname__}" if isinstance(getattr(obj, "__qualname__", None), str) else where
        if why:
            self.refuse(path, f"it is {name}, {why}")

    def _places(self) -> tuple[list[Path], list[Path], list[Path]]:
        """(the project's folders, what came with the run folder, installed code). A run folder
        sits at runs/<project>/<group>: the highest of those levels that holds none of the
        project's folders came with it, and so did all of `results`."""
        folder = self.folder.resolve()
        roots = [r.resolve() for r in self.own if not _inside(r, [folder])]
        zone = next(p for p in (folder.parent.parent, folder.parent, folder) if not _inside_any(roots, [p]))
        return roots, [zone, self.results.resolve()], _installed()

    def _why_not_own(self, spec: Any) -> str | None:
        """None for a module of this project's own files, else what it is."""
        roots, shipped, installed = self._places()
        places = _locations(spec)
        if _inside_any(places, shipped):
            return "code that came with the run folder"
        if places and all(_inside(p, roots) and not _inside(p, installed) for p in places):
            return None
        return "outside this project and the allowed packages"


def _under_allowed(dotted: str) -> bool:
    return any(dotted == name or dotted.startswith(f"{name}.") for name in ALLOWED)


# The spec of a module whose file cannot be told: it is not the project's own.
NOWHERE = types.SimpleNamespace(has_location=False, origin=None, submodule_search_locations=None)


def _find_spec(name: str) -> Any:
    """The module's spec without importing it (find_spec imports its parents, which have passed),
    or None when `name` is no module (an attribute, or a typo that resolve() reports)."""
    if name in sys.modules:  # imported already: its spec says where from (find_spec may raise)
        return getattr(sys.modules[name], "__spec__", None) or NOWHERE
    try:
        return importlib.util.find_spec(name)
    except Exception:  # a parent that is not a package, or whose import raised: resolve() reports it
        return None if "." in name else NOWHERE


def _locations(spec: Any) -> list[Path]:
    """The file a module comes from, or a namespace package's folders; none for built-ins."""
    if spec.has_location and spec.origin:
        return [Path(spec.origin)]
    return [Path(p) for p in (spec.submodule_search_locations or [])]


def _installed() -> list[Path]:
    """The standard library and installed packages' folders (a virtual environment may lie
    inside the project: what pip put there is still not the project's own)."""
    paths = sysconfig.get_paths()
    installed = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    installed.update(getattr(site, "getsitepackages", list)())
    installed.add(site.getusersitepackages())
    return [Path(p).resolve() for p in installed]


def _inside(path: Path, folders: list[Path]) -> bool:
    path = Path(path).resolve()
    return any(path == f or f in path.parents for f in folders)


def _inside_any(paths: list[Path], folders: list[Path]) -> bool:
    return any(_inside(p, folders) for p in paths)
