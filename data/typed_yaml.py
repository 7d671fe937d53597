"""Typed YAML: a file's mapping loaded into a dataclass, every value checked against its field's annotation.

Shared by the training recipes (`train.config`) and the scenes config (`data.scenes.SceneConfig`). Unknown keys
are refused with a did-you-mean, values that do not fit their type with the dotted key that holds them, and a
file's errors name the file.
"""

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from vlm.cli import did_you_mean


class ConfigError(ValueError):
    """A config file, mapping or override that does not fit its dataclass."""


def read_mapping(path) -> dict:
    """The top-level mapping of a YAML (or JSON) file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return loaded


def load_dataclass(cls, path):
    """A `cls` from the YAML file at `path`; errors (also those of the dataclass's own checks) name the file."""
    try:
        return from_mapping(cls, read_mapping(path))
    except ValueError as error:
        raise ConfigError(str(error) if str(error).startswith(str(path)) else f"{path}: {error}") from None


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value, annotation, key: str):
    """`value` checked (and, where lossless, converted) against the type `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(annotation)}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_mapping(annotation, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (object,)
        return [_convert(item, item_type, f"{key}.{index}") for index, item in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        # YAML reads "1e-3" (no dot) as a string; ints are fine as floats
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is object:
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(annotation)}")


def from_mapping(cls, values: dict, prefix: str = ""):
    """A `cls` from nested plain values (as YAML reads them), each checked against its field's type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(f"unknown key {key!r} ({did_you_mean(name, known)}known keys{' under ' + prefix if prefix else ''}: "
                              f"{', '.join(sorted(known))})")
        kwargs[name] = _convert(value, hints[name], key)
    for item in dataclasses.fields(cls):
        if item.name not in kwargs and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix or cls.__name__}: the required key {item.name!r} is missing")
    return cls(**kwargs)
