"""Experiment configuration: YAML in, validated frozen dataclasses out.

    cfg = RunConfig.from_yaml("configs/run_template.yaml")
    model = cfg.build_model(device)          # Cls(net_config, device=device)
    trial_cfg = cfg.with_overrides({"optimizer_config.lr": 3e-4})

Everything a YAML file names by import path (net, optimizer, scheduler,
criterion, data, sampler, pruner) goes through the one `resolve()` below.
Every mistake in a file raises `ConfigError`, which names the file and the key;
`main.py` prints it as one line and exits with status 2.

This module imports neither torch nor optuna at import time, so that
`python main.py --help` stays instant; `resolve()` imports what a path names.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Bad user input, reported as `<source>: <key>: <message>`."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# --------------------------------------------------------------------------- resolver

def resolve(path: str) -> Any:
    """Import "pkg.mod.Name" (or "pkg.mod.Outer.Inner") and return the object.

    Raises ImportError whose message names the part that failed, e.g.
    "module 'modle' not found" or "module 'model' has no attribute 'MLPP'".
    """
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path):
        raise ImportError(f"{path!r} is not an import path like 'package.module.Name'")
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
            module_name = f"{module_name}.{attr}"
        return obj
    raise ImportError(f"module '{parts[0]}' not found")


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
        hint = _did_you_mean(bad, names) if bad else ""
        raise TypeError(f"{e}{hint}") from None


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=3)
    # Among equally close names, a swap of letters ("stpe" for "step") is the likelier typo.
    close.sort(key=lambda c: sorted(c) != sorted(word))
    return f" (did you mean '{close[0]}'?)" if close else ""


def _resolved(config: Any, key: str) -> Any:
    """resolve() for a config's import-path key; failures name the file and the key."""
    try:
        return resolve(getattr(config, key))
    except ImportError as e:
        raise ConfigError(config.source, key, str(e)) from None


def _call(config: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build what `key` names; if the user's class rejects its arguments, name `<key>_config`."""
    cls = _resolved(config, key)
    try:
        return cls(*args, **kwargs)
    except Exception as e:
        raise ConfigError(config.source, f"{key}_config",
                          f"{getattr(config, key)} rejected it: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """Safe YAML loader that (1) reads 1e-3 as a float, as every user means, and
    (2) rejects duplicate keys instead of silently keeping the last one."""


# PyYAML follows YAML 1.1, whose float needs a dot: "1e-3" would load as a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"{where}invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", "expected a mapping of keys to values at the top level")
    return data


# --------------------------------------------------------------------------- typed loading

def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type hint; return it in canonical form."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(value, hint, key, source)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        return _from_mapping(hint, value, source, prefix=f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if value is None:  # `net_config:` with nothing under it
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    else:  # pragma: no cover - a field type this loader was not taught
        raise TypeError(f"unsupported field type {hint}")
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                list: "a list", dict: "a mapping"}[origin or hint]
    raise ConfigError(source, key, f"expected {expected}, got {value!r}")


def _from_mapping(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`: unknown keys (with a suggestion), missing
    keys and wrong types are ConfigErrors. Defaults fill keys that have one."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "source"}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(source, f"{prefix}{key}",
                              f"unknown key{_did_you_mean(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, f"{prefix}{name}", "missing required key")
    return cls(**values)


def _to_plain(obj: Any) -> Any:
    """Dataclass -> dicts and lists only (what YAML and JSON can hold)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if f.name != "source"}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


def set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    """Set data["a"]["b"] = value for "a.b"; every part of the path must already exist,
    so a misspelt override or search key fails instead of being silently ignored."""
    node = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth + 1])
            options = node if isinstance(node, dict) else {}
            raise ConfigError(source, dotted, f"no key '{where}' in the run config"
                              f"{_did_you_mean(part, options)}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
    """"optimizer_config.lr=3e-4" -> ("optimizer_config.lr", 0.0003): the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected key=value, e.g. --set optimizer_config.lr=3e-4")
    try:
        return key.strip(), yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError("--set", key.strip(), f"cannot read {value!r} as a YAML value: "
                                                f"{getattr(e, 'problem', None) or e}") from None


def _short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- RunConfig

@dataclass(frozen=True)
class EarlyStopping:
    patience: int | None = None  # epochs without improvement before stopping; None = never
    min_delta: float = 0.0       # an improvement must beat the best by more than this


@dataclass(frozen=True)
class TrainerConfig:
    """How the loop runs. All off by default; see README "Speed"."""
    precision: str = "fp32"              # fp32 | bf16 | fp16: autocast (fp16 with a gradient scaler)
    compile: bool = False                # torch.compile the model
    grad_clip: float | None = None       # clip the gradient norm to this
    grad_accum: int = 1                  # micro-batches per optimizer step
    deterministic: bool = False          # deterministic kernels; otherwise cudnn.benchmark on CUDA
    val_batch_size: int | None = None    # None: batch_size
    num_workers: int = 0                 # DataLoader settings, used for datasets that are
    pin_memory: bool = False             # not in-memory tensors
    persistent_workers: bool = False


@dataclass(frozen=True)
class WandbConfig:
    # auto: online when credentials exist (WANDB_API_KEY or ~/.netrc), else offline.
    mode: str = "auto"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


_PATH_KEYS = ("net", "optimizer", "scheduler", "criterion", "data")
# Keys that change how long, where or how visibly a group trains, not what it trains.
RUN_ONLY_KEYS = ("group", "seeds", "epochs", "device", "wandb", "checkpoint_every_s")
_MISSING = object()
_MODES = {"min": "minimize", "max": "maximize"}


@dataclass(frozen=True)
class RunConfig:
    """One experiment: which classes to build, with which keyword arguments, for which seeds."""

    project: str
    seeds: list[int]
    epochs: int
    batch_size: int
    net: str
    optimizer: str
    data: str
    net_config: dict[str, Any] = field(default_factory=dict)
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    criterion: str = "torch.nn.MSELoss"
    criterion_config: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    group: str | None = None     # None: "<Net>_<hash of what the config trains>"
    checkpoint_every_s: float = 10.0   # full-state checkpoint at most this often (0: every epoch)
    metrics: list[str] = field(default_factory=list)  # import paths of fn(pred, target) -> batch mean
    monitor: str = "val_loss"    # the metric for best weights, early stopping and search
    mode: str = "min"            # min or max
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source: str = field(default="<dict>", compare=False, repr=False)  # file it came from

    # ---- loading

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "RunConfig":
        config = _from_mapping(cls, data, source)
        object.__setattr__(config, "source", source)
        config._validate()
        return config

    def _validate(self) -> None:
        err = lambda key, msg: ConfigError(self.source, key, msg)  # noqa: E731
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise err(key, f"must be a positive integer, got {getattr(self, key)}")
        if not self.seeds:
            raise err("seeds", "must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise err("seeds", f"has duplicates: {self.seeds}")
        if not re.fullmatch(r"[\w.-]+", self.project):
            raise err("project", f"must be a folder name (letters, digits, _ . -), got {self.project!r}")
        if self.group is not None and not re.fullmatch(r"[\w.-]+", self.group):
            raise err("group", f"must be a folder name (letters, digits, _ . -), got {self.group!r}")
        if self.mode not in _MODES:
            raise err("mode", f"must be 'min' or 'max', got {self.mode!r}")
        if self.monitor not in self.columns():
            raise err("monitor", f"must be one of {', '.join(self.columns()[1:-2])}, got {self.monitor!r}"
                                 f"{_did_you_mean(self.monitor, self.columns())}")
        t = self.trainer
        if t.precision not in ("fp32", "bf16", "fp16"):
            raise err("trainer.precision", f"must be fp32, bf16 or fp16, got {t.precision!r}")
        for key, value in (("grad_clip", t.grad_clip), ("grad_accum", t.grad_accum),
                           ("val_batch_size", t.val_batch_size)):
            if value is not None and value <= 0:
                raise err(f"trainer.{key}", f"must be positive, got {value}")
        if t.num_workers < 0:
            raise err("trainer.num_workers", f"must be >= 0, got {t.num_workers}")
        if t.persistent_workers and t.num_workers == 0:
            raise err("trainer.persistent_workers", "needs num_workers > 0")
        if self.checkpoint_every_s < 0:
            raise err("checkpoint_every_s", f"must be >= 0, got {self.checkpoint_every_s}")
        if self.early_stopping.patience is not None and self.early_stopping.patience < 1:
            raise err("early_stopping.patience", "must be a positive integer or null")
        if self.early_stopping.min_delta < 0:
            raise err("early_stopping.min_delta", "must be >= 0")
        if self.wandb.mode not in ("auto", "online", "offline", "disabled"):
            raise err("wandb.mode", f"must be auto, online, offline or disabled, got {self.wandb.mode!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise err("device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        # Resolve every import path and check the keyword arguments against the
        # constructors now, so that a typo fails in a second, not after an epoch.
        for key in _PATH_KEYS:
            if getattr(self, key) is not None:
                self.resolved(key)
        for key, leading in (("optimizer", [[]]), ("scheduler", [None]),
                             ("criterion", []), ("data", [])):
            if getattr(self, key) is not None:
                try:
                    check_kwargs(self.resolved(key), getattr(self, f"{key}_config"), *leading)
                except TypeError as e:
                    raise err(f"{key}_config", str(e)) from None

    def metric_functions(self) -> dict[str, Any]:
        """{"val_<name>": fn} for each path in `metrics`; fn(pred, target) -> batch mean."""
        functions = {}
        for i, path in enumerate(self.metrics):
            name = f"val_{path.rsplit('.', 1)[-1]}"
            if name in functions or name == "val_loss":  # one column each, and never in place of the loss
                raise ConfigError(self.source, f"metrics[{i}]", f"{path} would be a second {name} column")
            try:
                functions[name] = resolve(path)
            except ImportError as e:
                raise ConfigError(self.source, f"metrics[{i}]", str(e)) from None
        return functions

    def columns(self) -> list[str]:
        """The columns of metrics.csv, in order."""
        return ["epoch", "train_loss", "val_loss", *self.metric_functions(), "lr", "wall_time"]

    def resolved(self, key: str) -> Any:
        """The object that import-path key `key` (net, optimizer, ...) names."""
        return _resolved(self, key)

    def with_overrides(self, overrides: dict[str, Any], source: str | None = None) -> "RunConfig":
        """A new, validated config with dotted keys replaced; this one is unchanged."""
        data = self.to_dict()
        source = source or self.source
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value, source)
        return RunConfig.from_dict(data, source=source)

    # ---- saving and naming

    def to_dict(self) -> dict:
        return _to_plain(self)

    def to_yaml(self, path: str | Path, comment: str = "") -> None:
        """Written atomically: a crash never leaves half a config where a run expects one."""
        import checkpoint  # here, not at the top: checkpoint imports this module (and torch)
        header = "".join(f"# {line}\n" for line in comment.splitlines())
        checkpoint.write_text(Path(path), header + yaml.safe_dump(self.to_dict(), sort_keys=False))

    def group_name(self) -> str:
        """The run folder's name: unique to what the config trains. Keys that only say how
        long, where and how a run is watched (RUN_ONLY_KEYS) are left out, so that
        `--resume` with more epochs or seeds continues the same group."""
        if self.group:
            return self.group
        data = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_KEYS}
        return f"{self.net.rsplit('.', 1)[-1]}_{_short_hash(data)}"

    def differences(self, other: "RunConfig") -> list[str]:
        """Dotted keys whose values differ, bar RUN_ONLY_KEYS: what makes a resume unsafe."""
        def flat(data: dict, prefix: str = "") -> dict:
            out = {}
            for key, value in data.items():
                if isinstance(value, dict) and value:
                    out.update(flat(value, f"{prefix}{key}."))
                else:
                    out[f"{prefix}{key}"] = value
            return out
        mine = flat({k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_KEYS})
        theirs = flat({k: v for k, v in other.to_dict().items() if k not in RUN_ONLY_KEYS})
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, _MISSING) != theirs.get(k, _MISSING))

    def config_hash(self) -> str:
        """A hash of every key: two runs with the same hash ran the same config."""
        return _short_hash(self.to_dict())

    @property
    def direction(self) -> str:
        return _MODES[self.mode]

    # ---- building the pieces (each failure names the key that caused it)

    def resolve_device(self) -> str:
        import torch
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(self.source, "device", f"'{self.device}' requested but CUDA is not available")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ConfigError(self.source, "device",
                                  f"'{self.device}' requested but only {torch.cuda.device_count()} GPU(s) exist")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(self.source, "device", "'mps' requested but MPS is not available")
        return self.device

    def build_model(self, device: str) -> Any:
        # The contract of the original design: Cls(net_config, device=device).
        model = _call(self, "net", dict(self.net_config), device=device)
        return model.to(device)

    def build_optimizer(self, model: Any) -> Any:
        return _call(self, "optimizer", model.parameters(), **self.optimizer_config)

    def build_scheduler(self, optimizer: Any) -> Any:
        return _call(self, "scheduler", optimizer, **self.scheduler_config) if self.scheduler else None

    def build_criterion(self) -> Any:
        return _call(self, "criterion", **self.criterion_config)

    def load_data(self) -> tuple[Any, Any]:
        import reproducibility  # noqa: F401  (importing it works around a oneMKL race before any data is built)
        datasets = _call(self, "data", **self.data_config)
        if not (isinstance(datasets, tuple) and len(datasets) == 2):
            raise ConfigError(self.source, "data",
                              f"{self.data} must return (train_dataset, val_dataset), got {type(datasets).__name__}")
        return datasets


# --------------------------------------------------------------------------- OptimizeConfig

_DISTRIBUTIONS = ("int", "float", "categorical")


@dataclass(frozen=True)
class OptimizeConfig:
    """An Optuna study over keys of a RunConfig (dotted paths, e.g. optimizer_config.lr)."""

    search_space: dict[str, Any]
    trials: int = 20
    seed: int = 42
    study_name: str | None = None  # None: derived from the run config and search space
    sampler: str = "optuna.samplers.TPESampler"
    sampler_config: dict[str, Any] = field(default_factory=dict)
    pruner: str | None = "pruner.PFLPruner"
    pruner_config: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # None: sqlite file runs/<project>/optuna.db
    # A trial whose process died stops beating; after grace_period seconds it is marked
    # failed, so a restarted study neither waits for it nor counts it.
    heartbeat_interval: int = 10
    grace_period: int | None = None  # None: 2 x heartbeat_interval
    source: str = field(default="<dict>", compare=False, repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "OptimizeConfig":
        return cls.from_dict(load_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "OptimizeConfig":
        config = _from_mapping(cls, data, source)
        object.__setattr__(config, "source", source)
        object.__setattr__(config, "search_space", config._flat_space())
        config._validate()
        return config

    def _flat_space(self) -> dict[str, dict]:
        """Nested sections become dotted keys; a leaf is a mapping with a `type`."""
        flat: dict[str, dict] = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                dotted = f"{prefix}{key}"
                if isinstance(value, dict) and "type" in value:
                    flat[dotted] = dict(value)
                elif isinstance(value, dict) and value:
                    walk(value, f"{dotted}.")
                else:
                    raise ConfigError(self.source, f"search_space.{dotted}",
                                      "expected a mapping with a 'type' (int, float or categorical)")
        walk(self.search_space, "")
        if not flat:
            raise ConfigError(self.source, "search_space", "must name at least one key to search")
        return flat

    def _validate(self) -> None:
        err = lambda key, msg: ConfigError(self.source, key, msg)  # noqa: E731
        for key in ("trials", "heartbeat_interval", "grace_period"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise err(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.study_name is not None and not re.fullmatch(r"[\w.-]+", self.study_name):
            raise err("study_name", f"must be letters, digits, _ . -, got {self.study_name!r}")
        for dotted, spec in self.search_space.items():
            _check_distribution(spec, f"search_space.{dotted}", err)
        for key, leading in (("sampler", []), ("pruner", [])):
            if getattr(self, key) is None:
                continue
            obj = _resolved(self, key)
            kwargs = dict(getattr(self, f"{key}_config"))
            if key == "sampler" and obj.__name__ == "GridSampler":
                kwargs.setdefault("search_space", {})
            try:
                check_kwargs(obj, kwargs, *leading)
            except TypeError as e:
                raise err(f"{key}_config", str(e)) from None
        if self.sampler.endswith("GridSampler"):
            for dotted, spec in self.search_space.items():
                if spec["type"] != "categorical":
                    raise err(f"search_space.{dotted}", "GridSampler needs categorical choices for every key")

    def check_against(self, run_config: RunConfig) -> None:
        """Every searched key must exist in the run config (typos fail before a trial runs)."""
        data = run_config.to_dict()
        for dotted, spec in self.search_space.items():
            try:
                set_dotted(data, dotted, None, self.source)
            except ConfigError as e:
                raise ConfigError(self.source, f"search_space.{dotted}", e.message) from None

    def name_for(self, run_config: RunConfig) -> str:
        """The study name: given, or a hash of what the trials train (so raising `trials`,
        or rerunning with another --device, storage or wandb mode continues the same study)."""
        if self.study_name:
            return self.study_name
        data = {k: v for k, v in _to_plain(self).items()
                if k not in ("trials", "storage", "heartbeat_interval", "grace_period")}
        # seeds and epochs stay in: they change what a trial's value means
        data["run_config"] = {k: v for k, v in run_config.to_dict().items()
                              if k not in ("group", "device", "wandb", "checkpoint_every_s")}
        return f"{run_config.net.rsplit('.', 1)[-1]}_search_{_short_hash(data)}"

    def build_sampler(self) -> Any:
        """The sampler, seeded from `seed` so that a search is repeatable."""
        kwargs = dict(self.sampler_config)
        if self.sampler.endswith("GridSampler"):
            kwargs["search_space"] = {k: spec["choices"] for k, spec in self.search_space.items()}
        if "seed" in inspect.signature(resolve(self.sampler)).parameters:
            kwargs.setdefault("seed", self.seed)
        return _call(self, "sampler", **kwargs)

    def build_pruner(self) -> Any:
        return _call(self, "pruner", **self.pruner_config) if self.pruner else None


def _check_distribution(spec: dict, key: str, err: Any) -> None:
    kind = spec.get("type")
    allowed = {"int": {"type", "min", "max", "step", "log"},
               "float": {"type", "min", "max", "step", "log"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        raise err(f"{key}.type", f"unknown distribution {kind!r}; use int, float or categorical")
    for name in spec:
        if name not in allowed[kind]:
            raise err(f"{key}.{name}", f"unknown key for a {kind} distribution"
                                       f"{_did_you_mean(str(name), allowed[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise err(f"{key}.choices", "must be a non-empty list")
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise err(f"{key}.choices", f"choices must be numbers, strings, booleans or null, got {choice!r}")
        return
    number = int if kind == "int" else (int, float)
    for bound in ("min", "max"):
        if bound not in spec:
            raise err(f"{key}.{bound}", "missing required key")
        if not isinstance(spec[bound], number) or isinstance(spec[bound], bool):
            raise err(f"{key}.{bound}", f"expected {'an integer' if kind == 'int' else 'a number'}, "
                                        f"got {spec[bound]!r}")
    if spec["min"] > spec["max"]:
        raise err(f"{key}.min", f"min ({spec['min']}) is greater than max ({spec['max']})")
    if not isinstance(spec.get("log", False), bool):
        raise err(f"{key}.log", "expected true or false")
    if spec.get("log") and spec["min"] <= 0:
        raise err(f"{key}.min", "a log-scale range needs min > 0")
    if "step" in spec and (not isinstance(spec["step"], number) or spec["step"] <= 0):
        raise err(f"{key}.step", "must be a positive number")
    if "step" in spec and spec.get("log"):
        raise err(f"{key}.step", "cannot be combined with log: true")

