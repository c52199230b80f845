"""Turning plain YAML mappings into typed, frozen dataclasses, with errors that name the key.

The loader walks the dataclass's type hints, so a schema is written once as dataclasses
(``fedqc.config``) and validated here: unknown keys, wrong types, values outside a ``Literal``
and missing required keys each raise :class:`ConfigError` naming the dotted key path and,
where there is a closed set, the allowed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fedqc.core.errors import ConfigError


def build(cls: type, data: Any, key: str, source: Path | None) -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), validating every field.

    Args:
        cls: a (frozen) dataclass type.
        data: the parsed YAML mapping for it (``None`` means all defaults).
        key: the dotted key path of ``data`` inside the file, for messages.
        source: the config file, for messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(key or "<root>", f"expected a mapping of keys, got {_describe(data)}", source)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    yaml_names = {name.replace("_", "-"): name for name in fields} | {name: name for name in fields}
    unknown = [k for k in data if k not in yaml_names]
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(_join(key, str(unknown[0])), f"unknown key; allowed keys here: {allowed}", source)
    values: dict[str, Any] = {}
    for raw_key, raw_value in data.items():
        name = yaml_names[raw_key]
        values[name] = convert(hints[name], raw_value, _join(key, name), source)
    missing = [
        name for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_join(key, missing[0]), "required key is missing", source)
    try:
        return cls(**values)
    except ConfigError as exc:  # a __post_init__ check naming its field: qualify it with this section
        raise ConfigError(_join(key, exc.key), exc.problem, source) from None
    except (ValueError, TypeError) as exc:  # __post_init__ checks of cross-field rules
        raise ConfigError(key or "<root>", str(exc), source) from None


def convert(hint: Any, value: Any, key: str, source: Path | None) -> Any:
    """Convert one YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [option for option in args if option is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error, naming its own key (privacy.dp.epsilon)
            return convert(options[0], value, key, source)
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return convert(option, value, key, source)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(key, " or ".join(errors), source)
    if origin is Literal:
        if value in args:
            return value
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(key, f"got {value!r}; allowed values: {allowed}", source)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {_describe(value)}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {len(value)}", source)
        return tuple(convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (Mapping, dict, typing.Mapping) or hint is dict:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {_describe(value)}", source)
        kt, vt = args if args else (Any, Any)
        return types.MappingProxyType(
            {convert(kt, k, key, source): convert(vt, v, f"{key}.{k}", source) for k, v in value.items()}
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {_describe(value)}", source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {_describe(value)}", source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {_describe(value)}", source)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {_describe(value)}", source)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path string, got {_describe(value)}", source)
        path = Path(value).expanduser()
        if not path.is_absolute() and source is not None:
            path = (source.parent / path).resolve()
        return path
    raise TypeError(f"unsupported config annotation {hint!r} at {key}")  # a schema bug, not user input


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, Mapping) else "a mapping"
