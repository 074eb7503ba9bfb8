"""Typed YAML: files read as mappings, and mappings checked against dataclasses.

Every YAML file make-dist reads (training configs, column mappings, class
lists, sweep files) goes through `read_yaml`, and every section through
`build_section`, so a bad file fails the same way everywhere: one line that
names the file (or --set), the key and what was expected.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import fsspec
import yaml

from .errors import ConfigError


def read_yaml(path: str | Path, what: str, expect: type | tuple[type, ...] = dict) -> Any:
    """The YAML document of a file, of the expected type (an empty file is an empty mapping)."""
    try:
        with fsspec.open(str(path), "rt") as f:  # a local path or any URL (a class list on s3://)
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except Exception as e:  # an object store's own errors: credentials, endpoint
        raise ConfigError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from None
    try:
        value = parse_yaml(text)
    except yaml.MarkedYAMLError as e:  # where and what, on one line
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if value is None and expect is dict:
        value = {}
    if not isinstance(value, expect):
        kinds = " or a ".join({"dict": "mapping"}.get(t.__name__, t.__name__)
                              for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise ConfigError(f"{path}: the top level of {what} must be a YAML {kinds}, got {type(value).__name__}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: the
    safe loader keeps the last value without a word, so a file that says
    `lr: 1e-3` near the top and `lr: 1e-5` further down would train at the second."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (a second value would silently win)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """A YAML value from text (a --set value), read as files are."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def build_section(cls, values: dict[str, Any], section: str, where):
    """A dataclass from a mapping, each value checked against its type hint;
    `where(section, key)` names the source in errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{where(section, key)}: unknown key {section}.{key} (known in {section}: {', '.join(hints)})"
            )
        try:
            kwargs[key] = coerce(value, hints[key])
        except TypeError as e:
            raise ConfigError(f"{where(section, key)}: {section}.{key} = {value!r}: {e}") from None
    return cls(**kwargs)


def coerce(value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; widen int to float, lists to tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(" or ".join(errors))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        return [coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError("expected a mapping")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"expected a list of {len(args)} values")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise TypeError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        if not math.isfinite(value):  # .inf, .nan or "inf": no setting of a run means either
            raise TypeError("expected a finite number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    raise TypeError(f"unsupported type {hint}")
