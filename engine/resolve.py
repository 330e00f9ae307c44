"""The one door from a config to objects: `resolve("pkg.mod.Name")` for every import path a
YAML file names (net, optimizer, scheduler, criterion, data, metrics, sampler, pruner), and
`check_kwargs`, which binds a `*_config` mapping against its constructor before anything runs,
so that a typo fails in a second, not after an epoch. A model is built by `build_model`, in
the form its constructor's signature asks for (model.py's docstring gives the rule).

A config read back from a run folder (analyze.py, load_run) may come from someone else, and
importing and calling what it names runs code: `resolve(path, untrusted)` refuses, before it
imports anything, a path outside this project and the allowed packages (see `Untrusted`)."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import re
import site
import sys
import sysconfig
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NoReturn

from engine.errors import ConfigError


def resolve(path: str, untrusted: Untrusted | None = None) -> Any:
    """Import "pkg.mod.Name" (or "pkg.mod.Outer.Inner") and return the object.

    Raises ImportError whose message names the part that failed, e.g.
    "module 'modle' not found" or "module 'model' has no attribute 'MLPP'". With `untrusted`
    (a config from a run folder), a path outside this project and the allowed packages is
    refused (Refused, an ImportError) before anything is imported.
    """
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path):
        raise ImportError(f"{path!r} is not an import path like 'package.module.Name'")
    if untrusted is not None:
        untrusted.check(path)
    parts = path.split(".")
    # Try the longest importable module prefix, so nested names such as
    # torch.optim.lr_scheduler.StepLR and attributes of classes both work.
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # A missing module *inside* the user's module is its own bug, not a typo here.
            if e.name is not None and not module_name.startswith(e.name):
                raise ImportError(f"importing '{module_name}' failed: {e}") from e
            continue
        except Exception as e:  # the user's module raised while importing
            raise ImportError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ImportError(f"module '{module_name}' has no attribute '{attr}'")
            obj = getattr(obj, attr)
            if untrusted is not None and inspect.ismodule(obj):  # `torch.nn.functional.torch.load`
                untrusted.refuse(path, f"it reaches module '{obj.__name__}' through '{module_name}'")
            module_name = f"{module_name}.{attr}"
        if untrusted is not None:
            untrusted.check_defined(path, ".".join(parts[:cut]), obj)
        return obj
    raise ImportError(f"module '{parts[0]}' not found")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest of `choices`, or ''."""
    close = difflib.get_close_matches(word, sorted(choices), n=3)
    # Among equally close names, a swap of letters ("stpe" for "step") is the likelier typo.
    close.sort(key=lambda c: sorted(c) != sorted(word))
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_kwargs(func: Any, kwargs: dict, *leading: Any) -> None:
    """Raise TypeError now if `func(*leading, **kwargs)` would not bind (a typo'd keyword)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(*leading, **kwargs)
    except TypeError as e:
        names = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        bad = next((k for k in kwargs if k not in signature.parameters), None)
        hint = did_you_mean(bad, names) if bad else ""
        raise TypeError(f"{e}{hint}") from None


def resolve_key(config: Any, key: str) -> Any:
    """resolve() for a config's import-path key; a failure names the config's file and the key."""
    try:
        return resolve(getattr(config, key), getattr(config, "untrusted", None))
    except ImportError as e:
        raise ConfigError(config.source, key, str(e)) from None


def check_config_kwargs(config: Any, key: str, *leading: Any, kwargs: dict | None = None) -> None:
    """check_kwargs for `<key>_config`, as a ConfigError naming that key."""
    try:
        check_kwargs(resolve_key(config, key), getattr(config, f"{key}_config") if kwargs is None else kwargs,
                     *leading)
    except TypeError as e:
        raise ConfigError(config.source, f"{key}_config", str(e)) from None


def create(config: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build what import-path key `key` names; if the user's class rejects its arguments, the
    error names `<key>_config`, where those arguments came from."""
    cls = resolve_key(config, key)
    try:
        return cls(*args, **kwargs)
    except Exception as e:
        raise ConfigError(config.source, f"{key}_config",
                          f"{getattr(config, key)} rejected it: {type(e).__name__}: {e}") from e


# Names a constructor gives the one mapping of all its settings (the tutorial's `hparams`).
MAPPING_NAMES = {"hparams", "hp", "hparam", "config", "cfg", "conf", "net_config", "params", "settings",
                 "options", "opt", "args", "hyperparameters"}


def build_model(cls: type, net_config: dict, device: str, source: str, path: str) -> Any:
    """`cls` built from `net_config`, on `device`: `cls(net_config, device=device)` when its
    constructor takes the settings as one mapping (the tutorial's form), else
    `cls(**net_config)`, with device= only where the constructor has that parameter."""
    mapping, takes_device = check_net_config(cls, net_config, source, path)
    on = {"device": device} if takes_device and "device" not in net_config else {}
    try:
        model = cls(dict(net_config), **on) if mapping else cls(**net_config, **on)
    except Exception as e:
        form = f"{path}(net_config{', device=...' * bool(on)})" if mapping else f"{path}(**net_config)"
        message = f"{path} rejected it: {type(e).__name__}: {e} (built as {form})"
        raise ConfigError(source, "net_config", message.replace("\n", " ")) from e
    return model.to(device)


def check_net_config(cls: type, net_config: dict, source: str, path: str) -> tuple[bool, bool]:
    """(whether `cls` takes its settings as one mapping, whether it takes `device`), read from its
    signature before anything is built. With keywords, a key it cannot take or a required one
    missing is a ConfigError naming net_config, the key, the class and the nearest parameter."""
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the tutorial's form
        return True, True
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in named]
    if named and _takes_one_mapping(named[0], net_config, names):
        return True, "device" in names
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        for key in (k for k in net_config if k not in names):
            hint = did_you_mean(key, [n for n in names if n not in net_config]) or \
                f"; it takes {', '.join(names) or 'none'}"
            raise ConfigError(source, "net_config", f"unknown key '{key}' for {path}{hint}")
    for p in named:
        if p.default is p.empty and p.name not in net_config and p.name != "device":
            raise ConfigError(source, "net_config", f"missing key '{p.name}', which {path} needs "
                                                    f"(it takes {', '.join(names)})")
    return False, "device" in names


def _takes_one_mapping(first: inspect.Parameter, net_config: dict, names: list[str]) -> bool:
    """A required positional first parameter that no key names, and that says it is a mapping
    (its annotation or its name), or, unannotated, that no key comes near any parameter's name."""
    if first.kind == first.KEYWORD_ONLY or first.default is not first.empty or first.name in net_config:
        return False
    annotation = str(first.annotation).lower()
    return (any(word in annotation for word in ("dict", "mapping", "config")) or first.name in MAPPING_NAMES
            or first.annotation is first.empty and not any(did_you_mean(k, names) for k in net_config))


# ---- configs read back from run folders

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
