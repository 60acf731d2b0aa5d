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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently,
    so a second ``render:`` block would replace the first without a word)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(f"{loader.name}: key {key!r} appears twice in one block (lines {seen[key]} and "
                              f"{key_node.start_mark.line + 1}); YAML would keep only the second. Merge the two "
                              "into one block.")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: str | Path) -> Any:
    """YAML from ``path`` (safe types only); a key repeated within one mapping is a ParamsError."""
    path = Path(path)
    with path.open() as fh:
        loader = _UniqueKeyLoader(fh)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run stages from the repository root (where dvc.yaml is).")
    params = load_yaml(path) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping at top level, got {type(params).__name__}.")
    check_known_keys(params, str(path))
    return params


def _key_paths(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of nested mappings (a list is a value, not a block)."""
    out = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _key_paths(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def _matches(dotted: str, pattern: str) -> bool:
    parts, pats = dotted.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(p == "*" or p == k for k, p in zip(parts, pats))


KNOWN_KEYS_FILE = Path(__file__).with_name("params_keys.txt")


def known_keys() -> tuple[str, ...]:
    """The key paths of params_keys.txt (one per line; '#' starts a comment)."""
    keys = (line.split("#", 1)[0].strip() for line in KNOWN_KEYS_FILE.read_text().splitlines())
    return tuple(k for k in keys if k)


def check_known_keys(params: Mapping[str, Any], source: str = PARAMS_FILE) -> None:
    """Raise ParamsError on a key path that no stage reads (a typo is otherwise ignored and the
    default silently used), naming the nearest known key. The known paths: src/judge3d/core/params_keys.txt."""
    import difflib

    KNOWN_KEYS = known_keys()
    unknown = [k for k in _key_paths(params) if not any(_matches(k, p) for p in KNOWN_KEYS)]
    if not unknown:
        return
    lines = []
    for key in unknown:
        parts = key.split(".")
        # fill each '*' with the name used here, so 'arms.dpo.bta' can be matched to 'arms.dpo.beta'
        candidates = [".".join(k if p == "*" else p for k, p in zip(parts, pat.split(".")))
                      + "".join("." + p for p in pat.split(".")[len(parts):]) for pat in KNOWN_KEYS]
        near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        lines.append(f"'{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    raise ParamsError(f"{source}: unknown key(s) {', '.join(lines)}. No stage reads them, so the value would be "
                      "ignored; fix the spelling, or, for a new parameter, add it to src/judge3d/core/params_keys.txt.")


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
