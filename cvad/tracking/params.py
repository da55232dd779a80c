"""A run config as MLflow params and back: flattened dotted keys, values as text that reads back typed."""

from __future__ import annotations

import json
from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a.b.c": value} -> nested config: ``flatten`` read back."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def param_text(value: Any) -> str:
    """A config value as a trial's MLflow param; ``param_value`` reads it back."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def param_value(text: str) -> Any:
    """A logged param as its config value: None, booleans, numbers and lists come back typed, the rest as text."""
    constants = {"None": None, "True": True, "False": False}
    if text in constants:
        return constants[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def config_of(params: dict[str, str], prefixes: tuple[str, ...] = ("",)) -> dict:
    """The nested run config a run's params spell out (only the keys under ``prefixes``)."""
    return unflatten({k: param_value(v) for k, v in params.items() if k.startswith(prefixes)})
