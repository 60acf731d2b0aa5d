"""Loading and checking ``params.yaml``.

Every stage reads its block through :func:`load_params` and :func:`require`, so a missing or
mistyped value fails at start-up with the key path and the fix, never mid-stage.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params value is missing or invalid; the message names the key and the fix."""


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run stages from the repository root (where dvc.yaml is).")
    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping at top level, got {type(params).__name__}.")
    return params


def require(params: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...] | None = None,
            *, check=None, hint: str = "") -> Any:
    """Return ``params[a][b]...`` for ``dotted='a.b'``; raise :class:`ParamsError` naming the key.

    ``check`` is an optional predicate on the value (e.g. ``lambda v: v > 0``).
    """
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ParamsError(f"params.yaml: missing key '{dotted}'. {hint}".strip())
        node = node[part]
    if kind is not None:
        # bool is an int in Python; refuse it where a number is asked for.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(node, bool) and bool not in kinds:
            raise ParamsError(f"params.yaml: '{dotted}' must be {_names(kinds)}, got a bool ({node!r}).")
        if float in kinds and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kinds):
            raise ParamsError(f"params.yaml: '{dotted}' must be {_names(kinds)}, got {node!r}. {hint}".strip())
    if check is not None and not check(node):
        raise ParamsError(f"params.yaml: '{dotted}' = {node!r} is out of range. {hint}".strip())
    return node


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (used to apply profiles)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
