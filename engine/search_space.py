"""The `search_space:` of an optimize config: nested sections flattened to dotted keys,
each distribution checked, and sampled through an Optuna trial. Imports no optuna."""
from __future__ import annotations

from typing import Any, Callable

from engine.errors import ConfigError
from engine.resolve import did_you_mean

KINDS = {"int": {"type", "min", "max", "step", "log"},
         "float": {"type", "min", "max", "step", "log"},
         "categorical": {"type", "choices"}}


def flatten_space(space: dict, source: str) -> dict[str, dict]:
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
                raise ConfigError(source, f"search_space.{dotted}",
                                  "expected a mapping with a 'type' (int, float or categorical)")
    walk(space, "")
    if not flat:
        raise ConfigError(source, "search_space", "must name at least one key to search")
    return flat


def check_distribution(spec: dict, key: str, err: Callable[[str, str], ConfigError]) -> None:
    """Raise err(key, message) for anything Optuna would reject, or only notice mid-search."""
    kind = spec.get("type")
    if kind not in KINDS:
        raise err(f"{key}.type", f"unknown distribution {kind!r}; use int, float or categorical")
    for name in spec:
        if name not in KINDS[kind]:
            raise err(f"{key}.{name}",
                      f"unknown key for a {kind} distribution{did_you_mean(str(name), KINDS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise err(f"{key}.choices", "must be a non-empty list")
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise err(f"{key}.choices",
                          f"choices must be numbers, strings, booleans or null, got {choice!r}")
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


def suggest(trial: Any, name: str, spec: dict) -> Any:
    """One sampled value of a checked distribution, through an optuna.Trial."""
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    suggest_number = trial.suggest_int if spec["type"] == "int" else trial.suggest_float
    return suggest_number(name, spec["min"], spec["max"], log=spec.get("log", False),
                          **({"step": spec["step"]} if "step" in spec else {}))
