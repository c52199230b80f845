"""Nested config sections <-> the flat scalar keys Flower's run config carries (``train.epochs``).

Flower 1.42 run-config values must be scalars: the coordinator flattens the method's settings
(:func:`flatten`), every site rebuilds them (:func:`unflatten`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

Scalar = bool | int | float | str


def unflatten(flat: Mapping[str, Scalar]) -> dict[str, Any]:
    """``{"train.epochs": 3}`` -> ``{"train": {"epochs": 3}}``; flow-YAML lists and mappings are decoded."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, str) and value[:1] in "[{":
            value = yaml.safe_load(value)
        node[parts[-1]] = value
    return nested


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Inverse of :func:`unflatten`: lists and mappings below the sections become flow-style YAML.

    (Flow YAML quotes with single quotes: Flower's run-config parser stops at a double quote.)
    """
    flat: dict[str, Scalar] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not prefix:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            flat[name] = encode_value(value)
        elif value is not None:
            flat[name] = value
    return flat


def encode_value(value: Any) -> str:
    """A list or mapping as one line of flow-style YAML (no double quotes)."""
    plain = json.loads(json.dumps(value))  # tuples -> lists, mapping proxies -> dicts
    return yaml.safe_dump(plain, default_flow_style=True, width=1 << 30).strip()


def decode_value(value: Any) -> Any:
    return yaml.safe_load(value) if isinstance(value, str) and value else {}
