"""The one door from a config to objects: `resolve("pkg.mod.Name")` for every import path a
YAML file names (net, optimizer, scheduler, criterion, data, metrics, sampler, pruner), and
`check_kwargs`, which binds a `*_config` mapping against its constructor before anything runs,
so that a typo fails in a second, not after an epoch. A model is built by `build_model`, in
the form its constructor's signature asks for (model.py's docstring gives the rule).

A config read back from a run folder (analyze.py, load_run) may come from someone else, and
importing and calling what it names runs code: `resolve(path, untrusted)` refuses, before it
imports anything, a path outside this project and the allowed packages (engine/trust.py)."""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import TYPE_CHECKING, Any, Iterable

from engine.errors import ConfigError

if TYPE_CHECKING:  # the check itself is engine/trust.py's, imported only where a folder is untrusted
    from engine.trust import Untrusted


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
