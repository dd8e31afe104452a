"""Typed, validated settings: plain mappings (from YAML) in, frozen dataclasses out.

Every setting lives in the study config; ``load_section(cls, study, "a.b")`` turns one section of it into a dataclass
and names the offending key (with its dotted path) when the section is missing, a key is unknown or a value has the
wrong type. ``optional_section`` is the one way to read a section that may be left out.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names its dotted key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError naming the file when it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML: {' '.join(str(err).split())}") from err  # one line
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def section(config: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    """Return ``config["a"]["b"]`` for ``dotted="a.b"``; raise ConfigError naming the missing key."""
    keys = dotted.split(".")
    node: Any = config
    for depth, key in enumerate(keys, 1):
        if not isinstance(node, Mapping):
            parent = f"config section {'.'.join(keys[: depth - 1])!r}" if depth > 1 else "config"
            raise ConfigError(f"{parent} must be a mapping, got {type(node).__name__}")
        if key not in node:
            missing = ".".join(keys[:depth])
            raise ConfigError(f"config has no section {dotted!r}" + (f" (no {missing!r})" if missing != dotted else ""))
        node = node[key]
    if not isinstance(node, Mapping):
        raise ConfigError(f"config section {dotted!r} must be a mapping, got {type(node).__name__}")
    return node


def optional_section(config: Mapping[str, Any], dotted: str) -> Mapping[str, Any] | None:
    """``section(config, dotted)`` for a section that may be left out: None where a key on its path is absent or
    null (YAML's empty value). A value on the path that is present but not a mapping still raises ConfigError."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping):
            break  # section() names the offending key
        node = node.get(key)
        if node is None:
            return None
    return section(config, dotted)


def load_section(cls: type[T], study: Mapping[str, Any], dotted: str) -> T:
    """Dataclass ``cls`` built from the section at ``dotted`` (e.g. ``"downstream.classify.linear"``): the one door
    into the study config. A missing section, a non-mapping and an unknown or mistyped key raise ConfigError naming
    the dotted key."""
    return from_mapping(cls, section(study, dotted), dotted)


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys and mistyped values (a float that is not finite
    included) raise ConfigError.

    Nested dataclass fields are built recursively; ``where`` is the dotted path used in messages.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise  # it names its key already
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_mapping(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):  # YAML's .inf and .nan: no setting means them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def to_mapping(obj: Any) -> Any:
    """Plain, YAML/JSON-ready values from a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
