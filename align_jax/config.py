"""YAML experiment configs mapped onto frozen dataclasses, with file:line errors.

A config class is a frozen dataclass whose fields are ``int``, ``float``,
``bool``, ``str``, ``Optional[...]``, ``list[...]``, ``dict[str, list]`` or a
nested config dataclass.  :func:`load_config` reads a YAML file, rejects
unknown keys and wrongly typed values, runs the classes' own validation
(``__post_init__`` raising :class:`FieldError` or any error with a ``field``
attribute) and reports every problem as ``file:line: section.key: message``
before anything is compiled or loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from typing import Any, Union

import yaml

__all__ = ["ConfigError", "FieldError", "load_config", "config_from_dict", "config_to_dict"]


class ConfigError(ValueError):
    """A config file is wrong; the message names the file, line and field."""


class FieldError(ValueError):
    """Raised by a config dataclass's validation; ``field`` names the key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _line_index(node, path=(), index=None) -> dict:
    """Maps key paths (tuples) to 1-based line numbers of the YAML node tree."""
    if index is None:
        index = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            index[key] = key_node.start_mark.line + 1
            _line_index(value_node, key, index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*path, i)
            index[key] = item.start_mark.line + 1
            _line_index(item, key, index)
    return index


class _Context:
    def __init__(self, source: str, lines: dict):
        self.source = source
        self.lines = lines

    def fail(self, path: tuple, message: str):
        line = None
        probe = tuple(path)
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        where = f"{self.source}:{line}" if line is not None else self.source
        name = ".".join(str(p) for p in path) if path else "<top level>"
        raise ConfigError(f"{where}: {name}: {message}")


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: tuple, ctx: _Context):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, ctx)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        ctx.fail(path, f"expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(path, f"expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, path, ctx)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            ctx.fail(path, f"expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, (*path, i), ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            ctx.fail(path, f"expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, value_type, (*path, str(k)), ctx) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            ctx.fail(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e5" as a string
                except ValueError:
                    pass
            ctx.fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            ctx.fail(path, f"expected a string, got {value!r}")
        return value
    return value


@functools.lru_cache(maxsize=None)
def _schema(cls) -> tuple[dict, dict]:
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build(cls, data: dict, path: tuple, ctx: _Context):
    hints, fields = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            ctx.fail((*path, key), f"unknown key (known keys here: {known})")
        kwargs[key] = _convert(value, hints[key], (*path, key), ctx)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        ctx.fail(path, f"missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        field = getattr(exc, "field", None)
        if not field:
            ctx.fail(path, str(exc))
        parts = tuple(int(p) if p.isdigit() else p for p in str(field).split("."))
        ctx.fail((*path, *parts), str(exc))


def load_config(path: Union[str, os.PathLike], cls):
    """Reads a YAML file into the config dataclass ``cls``.

    Raises:
      ConfigError: missing file, YAML syntax error, unknown key, wrong type or
        out-of-range value; the message has ``file:line`` and the key path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    ctx = _Context(path, _line_index(node) if node is not None else {})
    if not isinstance(data, dict):
        ctx.fail((), "the top level of a config must be a mapping")
    return _build(cls, data, (), ctx)


def config_from_dict(cls, data: dict, source: str = "<dict>"):
    """Like :func:`load_config` for an in-memory mapping (no line numbers)."""
    return _build(cls, data, (), _Context(source, {}))


def config_to_dict(config) -> dict:
    """A config dataclass as plain JSON/YAML-serialisable data."""
    return dataclasses.asdict(config)
