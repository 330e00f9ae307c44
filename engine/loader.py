"""YAML in, typed and frozen dataclasses out (the dataclasses themselves are in config.py).

    data = load_yaml("configs/run_template.yaml")    # safe, 1e-3 is a float, duplicate keys fail
    config = from_mapping(RunConfig, data, source)   # unknown keys, missing keys, wrong types fail

Every failure is a ConfigError naming the file and the key. Imports no torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError
from engine.resolve import did_you_mean


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


# Aliases are legitimate YAML, but a few nested ones expand to billions of values (an
# "alias bomb"): counted on the composed nodes, where an alias costs nothing yet.
MAX_VALUES = 100_000


def _load(text: str, source: str, where: str = "") -> Any:
    """YAML text -> Python values, refusing alias bombs and self-referring aliases."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        memo: dict[int, int] = {}
        if isinstance(node, yaml.MappingNode):  # name the key whose values pass the limit
            total = 0
            for key_node, value_node in node.value:
                total += _count_values(value_node, memo, set(), source, where or str(key_node.value))
                _check_total(total, source, where or str(key_node.value))
        elif node is not None:
            _count_values(node, memo, set(), source, where)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _count_values(node: yaml.Node, memo: dict[int, int], open_nodes: set[int], source: str,
                  key: str) -> int:
    """How many values `node` holds with every alias expanded (each node counted once)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(source, key, "refers to itself (a YAML alias inside its own anchor)")
    children = ([] if isinstance(node, yaml.ScalarNode) else node.value if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair])
    open_nodes.add(id(node))
    total = 1 + sum(_count_values(child, memo, open_nodes, source, key) for child in children)
    open_nodes.discard(id(node))
    _check_total(total, source, key)
    memo[id(node)] = total
    return total


def _check_total(total: int, source: str, key: str) -> None:
    if total > MAX_VALUES:
        raise ConfigError(source, key, f"expands to more than {MAX_VALUES} values (YAML aliases); "
                                       "large data belongs in your data function, not the config")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror}") from None
    try:
        data = _load(text, source)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"{where}invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", "expected a mapping of keys to values at the top level")
    return data


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def parse_override(text: str) -> tuple[str, Any]:
    """"optimizer_config.lr=3e-4" -> ("optimizer_config.lr", 0.0003): the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected key=value, e.g. --set optimizer_config.lr=3e-4")
    try:
        return key.strip(), _load(value, "--set", key.strip())
    except yaml.YAMLError as e:
        raise ConfigError("--set", key.strip(), f"cannot read {value!r} as a YAML value: "
                                                f"{getattr(e, 'problem', None) or e}") from None


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
        return from_mapping(hint, value, source, prefix=f"{key}.")
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


def _loaded_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a file may set: not `source`, nor anything the class fills in itself."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "source"}


def from_mapping(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`: unknown keys (with a suggestion), missing
    keys and wrong types are ConfigErrors. Defaults fill keys that have one."""
    fields = _loaded_fields(cls)
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(source, f"{prefix}{key}", f"unknown key{did_you_mean(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, f"{prefix}{name}", "missing required key")
    config = cls(**values)
    if "source" in {f.name for f in dataclasses.fields(cls)}:
        object.__setattr__(config, "source", source)  # frozen: set once, here
    return config


def to_plain(obj: Any) -> Any:
    """Dataclass -> dicts and lists only (what YAML and JSON can hold), as a file would say it."""
    if dataclasses.is_dataclass(obj):
        return {name: to_plain(getattr(obj, name)) for name in _loaded_fields(type(obj))}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
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
            raise ConfigError(source, dotted,
                              f"no key '{where}' in the run config{did_you_mean(part, options)}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def flatten(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty mappings stay as values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
