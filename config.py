"""The experiment's schema: every key a run or optimize YAML file may hold, with its meaning.

    cfg = RunConfig.from_yaml("configs/run_template.yaml")
    model = cfg.create_model()                       # Net(net_config, device=...) or Net(**net_config)
    optimizer = cfg.create_optimizer(model)
    trial_cfg = cfg.with_overrides({"optimizer_config.lr": 3e-4})   # a copy; cfg is unchanged

Every key is checked on load: unknown keys (with the nearest valid one suggested), missing
keys, wrong types, import paths that do not resolve and keyword arguments that do not bind.
Each mistake raises ConfigError naming the file and the key; main.py prints it as one line
and exits with status 2. Add a key here and it is loaded, checked and saved like the rest.
Loading (YAML, coercion, overrides) is engine/loader.py's, and every import path goes through
engine/resolve.py. Importing this module imports no torch.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import ConfigError
from engine.folders import name_problem
from engine.loader import dump_yaml, flatten, from_mapping, load_yaml, set_dotted, short_hash, to_plain
from engine.resolve import build_model, check_config_kwargs, check_net_config, create, resolve, resolve_key
from engine.search_space import check_distribution, flatten_space
from engine.settings import Settings, SettingsError
if TYPE_CHECKING:  # the check is imported only where a run folder is not trusted
    from engine.trust import Untrusted

__all__ = ["ConfigError", "RunConfig", "OptimizeConfig", "load_yaml", "resolve"]

# Keys that change how long, where, how fast or how visibly a group trains, not what it
# trains: they are left out of the group's name, and a --resume may change them.
RUN_ONLY_KEYS = ("group", "seeds", "epochs", "device", "wandb", "checkpoint_every_s", "trainer.compile",
                 "trainer.num_workers", "trainer.pin_memory", "trainer.persistent_workers",
                 "trainer.vectorize_seeds")
DIRECTIONS = {"min": "minimize", "max": "maximize"}


@dataclass(frozen=True)
class EarlyStopping:
    patience: int | None = None  # epochs without improvement before stopping; None = never
    min_delta: float = 0.0       # an improvement must beat the best by more than this


@dataclass(frozen=True)
class TrainerConfig:
    """How the loop runs. All off by default; see README "Speed"."""
    precision: str = "fp32"              # fp32 | bf16 | fp16: autocast (fp16 with a gradient scaler)
    compile: bool = False                # torch.compile the loss step (the model and the criterion)
    grad_clip: float | None = None       # clip the gradient norm to this
    grad_accum: int = 1                  # micro-batches per optimizer step
    deterministic: bool = False          # deterministic kernels; otherwise cudnn.benchmark on CUDA
    val_batch_size: int | None = None    # None: batch_size
    num_workers: int = 0                 # DataLoader settings, used for datasets that are
    pin_memory: bool = False             # not in-memory tensors
    persistent_workers: bool = False
    vectorize_seeds: bool = True         # train the seeds as one stacked model where the model allows it


@dataclass(frozen=True)
class WandbConfig:
    # auto: online when credentials exist (WANDB_API_KEY or ~/.netrc), else offline.
    mode: str = "auto"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunConfig:
    """One experiment: which classes to build, with which keyword arguments, for which seeds."""

    project: str
    seeds: list[int]
    epochs: int
    batch_size: int              # per optimizer step (the global batch under torchrun)
    net: str                     # import path of the model class, built as Net(net_config, device=...)
    optimizer: str               # e.g. torch.optim.AdamW, built as Optimizer(params, **optimizer_config)
    data: str                    # a function returning (train_dataset, val_dataset)
    net_config: dict[str, Any] = field(default_factory=dict)
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None  # stepped once per epoch (ReduceLROnPlateau gets the monitored value)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    criterion: str = "torch.nn.MSELoss"  # the loss, unless the model defines loss(x, y, criterion)
    criterion_config: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"         # auto | cpu | cuda | cuda:N | mps; `auto` is resolved on load
    group: str | None = None     # None: "<Net>_<hash of what the config trains>"
    checkpoint_every_s: float = 10.0   # full-state checkpoint at most this often (0: every epoch)
    metrics: list[str] = field(default_factory=list)  # import paths of fn(pred, target) -> batch mean
    monitor: str = "val_loss"    # the metric for best weights, early stopping and search
    mode: str = "min"            # min or max
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source: str = field(default="<dict>", compare=False, repr=False)  # the file it came from
    written_device: str = field(default="auto", init=False, repr=False)  # `device` as the file says it
    untrusted: Any = field(default=None, init=False, compare=False, repr=False)  # a run folder's: Untrusted
    run_only_keys: ClassVar[tuple[str, ...]] = RUN_ONLY_KEYS

    # ---- loading and saving

    @classmethod
    def from_yaml(cls, path: str | Path, untrusted: Untrusted | None = None) -> RunConfig:
        return cls.from_dict(load_yaml(path), source=str(path), untrusted=untrusted)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", untrusted: Untrusted | None = None) -> RunConfig:
        config = from_mapping(cls, data, source)
        object.__setattr__(config, "untrusted", untrusted)  # a run folder's: checked before importing
        config._validate()
        # `device` is what .to() takes; the file (and every copy of it) keeps what the user wrote.
        object.__setattr__(config, "written_device", config.device)
        if config.device == "auto":
            import torch
            object.__setattr__(config, "device", "cuda" if torch.cuda.is_available() else "cpu")
        return config

    def _validate(self) -> None:
        err = lambda key, msg: ConfigError(self.source, key, msg)  # noqa: E731
        if not self.seeds:
            raise err("seeds", "must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise err("seeds", f"has duplicates: {self.seeds}")
        for key, name in (("project", self.project), ("group", self.group)):
            if name is not None and name_problem(name):
                raise err(key, name_problem(name))
        try:  # the loop's own checks (epochs, batch_size, monitor, mode, trainer: and early_stopping:)
            self.trainer_settings()
        except SettingsError as e:
            section = ("trainer." if hasattr(self.trainer, e.name) else
                       "early_stopping." if hasattr(self.early_stopping, e.name) else "")
            raise err(f"{section}{e.name}", e.message) from None
        if self.wandb.mode not in ("auto", "online", "offline", "disabled"):
            raise err("wandb.mode", f"must be auto, online, offline or disabled, got {self.wandb.mode!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise err("device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        # Resolve every import path and bind the keyword arguments against the constructors
        # now, so that a typo fails in a second, not after an epoch.
        check_net_config(resolve_key(self, "net"), self.net_config, self.source, self.net)
        for key, leading in (("optimizer", [[]]), ("scheduler", [None]), ("criterion", []), ("data", [])):
            if getattr(self, key) is not None:
                check_config_kwargs(self, key, *leading)

    def with_overrides(self, overrides: dict[str, Any], source: str | None = None) -> RunConfig:
        """A new, validated config with dotted keys replaced; this one is unchanged."""
        data = self.to_dict()
        source = source or self.source
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value, source)
        return RunConfig.from_dict(data, source=source, untrusted=self.untrusted)

    def to_dict(self) -> dict:
        """The config as its file says it (device: auto stays auto)."""
        return {**to_plain(self), "device": self.written_device}

    def to_yaml(self, path: str | Path, comment: str = "") -> None:
        """Written atomically: a crash never leaves half a config where a run expects one."""
        from engine import checkpoint  # imports torch: only when a config is saved
        header = "".join(f"# {line}\n" for line in comment.splitlines())
        checkpoint.write_text(Path(path), header + dump_yaml(self.to_dict()))

    # ---- names and comparisons

    def group_name(self) -> str:
        """The run folder's name: unique to what the config trains. RUN_ONLY_KEYS are left
        out, so that `--resume` with more epochs or seeds continues the same group."""
        if self.group:
            return self.group
        return f"{self.net.rsplit('.', 1)[-1]}_{short_hash(self.what_it_trains())}"

    def what_it_trains(self, keep: tuple[str, ...] = ()) -> dict:
        """to_dict() bar RUN_ONLY_KEYS (except those in `keep`): top-level ones are left out, the
        trainer's are reset to their defaults (not removed, so that group names stay valid)."""
        data = self.to_dict()
        for key in (k for k in RUN_ONLY_KEYS if k not in keep):
            section, _, name = key.partition(".")
            if name == "vectorize_seeds":  # newer than the group names on disk: never in them
                del data[section][name]
            elif name:
                data[section][name] = getattr(TrainerConfig(), name)
            else:
                del data[key]
        return data

    def differences(self, other: RunConfig) -> list[str]:
        """Dotted keys whose values differ, bar RUN_ONLY_KEYS: what makes a resume unsafe."""
        mine, theirs = (flatten(c.what_it_trains()) for c in (self, other))
        missing = object()
        return sorted(k for k in mine.keys() | theirs.keys()
                      if mine.get(k, missing) != theirs.get(k, missing))

    def config_hash(self) -> str:
        """A hash of every key: two runs with the same hash ran the same config."""
        return short_hash(self.to_dict())

    @property
    def direction(self) -> str:
        """Optuna's name for `mode`."""
        return DIRECTIONS[self.mode]

    # ---- building the pieces (each failure names the key that caused it)

    def check_device(self) -> None:
        """Raise ConfigError when the device does not exist on this machine."""
        import torch
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(self.source, "device",
                                  f"'{self.device}' requested but CUDA is not available")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ConfigError(self.source, "device", f"'{self.device}' requested but only "
                                                         f"{torch.cuda.device_count()} GPU(s) exist")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(self.source, "device", "'mps' requested but MPS is not available")

    def create_model(self, device: str | None = None) -> Any:
        """Net(net_config, device=device) or Net(**net_config), by Net's signature (see model.py),
        on `device` (default: the config's)."""
        return build_model(resolve_key(self, "net"), self.net_config, device or self.device, self.source,
                           self.net)

    def create_optimizer(self, model: Any) -> Any:
        return create(self, "optimizer", model.parameters(), **self.optimizer_config)

    def create_scheduler(self, optimizer: Any) -> Any:
        return create(self, "scheduler", optimizer, **self.scheduler_config) if self.scheduler else None

    def create_criterion(self) -> Any:
        return create(self, "criterion", **self.criterion_config)

    def load_data(self) -> tuple[Any, Any]:
        """(train_dataset, val_dataset) from the `data` function."""
        from engine import reproducibility  # noqa: F401  (importing it works around a oneMKL race first)
        datasets = create(self, "data", **self.data_config)
        if not (isinstance(datasets, tuple) and len(datasets) == 2):
            raise ConfigError(self.source, "data", f"{self.data} must return (train_dataset, val_dataset), "
                                                   f"got {type(datasets).__name__}")
        return datasets

    def metric_functions(self) -> dict[str, Any]:
        """{"val_<name>": fn} for each path in `metrics`; fn(pred, target) -> batch mean."""
        functions = {}
        for i, path in enumerate(self.metrics):
            name = f"val_{path.rsplit('.', 1)[-1]}"
            if name in functions or name == "val_loss":  # one column each, never in place of the loss
                raise ConfigError(self.source, f"metrics[{i}]", f"{path} would be a second {name} column")
            try:
                functions[name] = resolve(path, self.untrusted)
            except ImportError as e:
                raise ConfigError(self.source, f"metrics[{i}]", str(e)) from None
        return functions

    def columns(self) -> list[str]:
        """The columns of metrics.csv, in order."""
        return ["epoch", "train_loss", "val_loss", *self.metric_functions(), "lr", "wall_time"]

    def trainer_settings(self) -> Settings:
        """The loop's settings: all the Trainer reads of a config."""
        options = {k: v for k, v in dataclasses.asdict(self.trainer).items()
                   if k not in ("deterministic", "vectorize_seeds")}
        return Settings(epochs=self.epochs, batch_size=self.batch_size, monitor=self.monitor, mode=self.mode,
                        patience=self.early_stopping.patience, min_delta=self.early_stopping.min_delta,
                        checkpoint_every_s=self.checkpoint_every_s, metrics=self.metric_functions(),
                        **options)


@dataclass(frozen=True)
class OptimizeConfig:
    """An Optuna study over keys of a RunConfig (dotted paths, e.g. optimizer_config.lr)."""

    search_space: dict[str, Any]  # {key: {type: int|float|categorical, min, max, step, log | choices}}
    trials: int = 20             # finished (complete or pruned) trials the study should hold
    seed: int = 42               # seeds the sampler: the same search twice gives the same trials
    study_name: str | None = None  # None: derived from the run config and search space
    sampler: str = "optuna.samplers.TPESampler"
    sampler_config: dict[str, Any] = field(default_factory=dict)
    pruner: str | None = "engine.pruner.PFLPruner"
    pruner_config: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None   # an Optuna storage URL; None: sqlite file runs/<project>/optuna.db
    # A trial whose process died stops beating; after grace_period seconds it is marked
    # failed, so a restarted study neither waits for it nor counts it.
    heartbeat_interval: int = 10
    grace_period: int | None = None  # None: 2 x heartbeat_interval
    source: str = field(default="<dict>", compare=False, repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OptimizeConfig:
        return cls.from_dict(load_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> OptimizeConfig:
        config = from_mapping(cls, data, source)
        object.__setattr__(config, "search_space", flatten_space(config.search_space, source))
        config._validate()
        return config

    def _validate(self) -> None:
        err = lambda key, msg: ConfigError(self.source, key, msg)  # noqa: E731
        for key in ("trials", "heartbeat_interval", "grace_period"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise err(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.study_name is not None and name_problem(self.study_name):
            raise err("study_name", name_problem(self.study_name))
        for dotted, spec in self.search_space.items():
            check_distribution(spec, f"search_space.{dotted}", err)
        grid = self.sampler.endswith("GridSampler")
        sampler_kwargs = {"search_space": {}, **self.sampler_config} if grid else None
        check_config_kwargs(self, "sampler", kwargs=sampler_kwargs)
        if self.pruner is not None:
            check_config_kwargs(self, "pruner")
        for dotted, spec in self.search_space.items():
            if grid and spec["type"] != "categorical":
                raise err(f"search_space.{dotted}", "GridSampler needs categorical choices for every key")

    def check_against(self, run_config: RunConfig) -> None:
        """Every searched key must exist in the run config (typos fail before a trial runs)."""
        data = run_config.to_dict()
        for dotted in self.search_space:
            try:
                set_dotted(data, dotted, None, self.source)
            except ConfigError as e:
                raise ConfigError(self.source, f"search_space.{dotted}", e.message) from None

    def name_for(self, run_config: RunConfig) -> str:
        """The study name: given, or a hash of what the trials train (so raising `trials`,
        or rerunning with another --device, storage or wandb mode continues the same study)."""
        if self.study_name:
            return self.study_name
        data = {k: v for k, v in to_plain(self).items()
                if k not in ("trials", "storage", "heartbeat_interval", "grace_period")}
        # seeds and epochs stay in: they change what a trial's value means
        data["run_config"] = run_config.what_it_trains(keep=("seeds", "epochs"))
        return f"{run_config.net.rsplit('.', 1)[-1]}_search_{short_hash(data)}"

    def create_sampler(self) -> Any:
        """The sampler, seeded from `seed` so that a search is repeatable."""
        kwargs = dict(self.sampler_config)
        if self.sampler.endswith("GridSampler"):
            kwargs["search_space"] = {k: spec["choices"] for k, spec in self.search_space.items()}
        if "seed" in inspect.signature(resolve(self.sampler)).parameters:
            kwargs.setdefault("seed", self.seed)
        return create(self, "sampler", **kwargs)

    def create_pruner(self) -> Any:
        return create(self, "pruner", **self.pruner_config) if self.pruner else None
