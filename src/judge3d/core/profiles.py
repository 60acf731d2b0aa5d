"""Parameter profiles: partial overrides of params.yaml, kept in ``profiles/<name>.yaml``.

A profile sets leaves of params.yaml (a partial block merges into the block; a list is one value).
It reaches DVC two ways: as ``dvc exp run -S key=value`` arguments (:func:`set_param_args`), or
written into the workspace params.yaml by :func:`apply_profile`. DVC's own ``-S`` writer re-dumps
the whole file (flow lists become block lists, quotes and line breaks change), so applying splices
instead: each overridden value's text is replaced by the profile's text for it, re-indented, and
every other byte of params.yaml, comments included, stays. ``profiles/mini.yaml`` holds
params.yaml's own text for every key another profile sets, so applying it restores the default
byte for byte.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from judge3d.core.config import PARAMS_FILE, ParamsError, check_known_keys, deep_merge, load_params, load_yaml

PROFILES_DIR = Path("profiles")
DEFAULT_PROFILE = "mini"  # the values params.yaml is committed with

Leaf = tuple[str, ...]


def profile_path(name: str, profiles_dir: str | Path = PROFILES_DIR) -> Path:
    path = Path(profiles_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise ParamsError(f"profile '{name}' not found at {path}; known profiles: {known}")
    return path


EXTENDS = "extends"   # a profile's top-level key naming the profile(s) it builds on, applied first


def _read_profile(name: str, profiles_dir: str | Path) -> tuple[list[str], dict[str, Any]]:
    """The profiles ``name`` extends, and its own overrides."""
    path = profile_path(name, profiles_dir)
    profile = load_yaml(path) or {}
    if not isinstance(profile, dict):
        raise ParamsError(f"{path} must hold a mapping at top level, got {type(profile).__name__}.")
    parents = profile.pop(EXTENDS, [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ParamsError(f"{path}: '{EXTENDS}' must name a profile or a list of profiles, got {parents!r}")
    check_known_keys(profile, str(path))
    return parents, profile


def _lineage(name: str, profiles_dir: str | Path, seen: tuple[str, ...] = ()) -> list[str]:
    """``name`` and every profile it extends, parents first (each once)."""
    if name in seen:
        raise ParamsError(f"profile '{name}' extends itself (through {' -> '.join(seen + (name,))})")
    order: list[str] = []
    for parent in _read_profile(name, profiles_dir)[0]:
        order += [p for p in _lineage(parent, profiles_dir, seen + (name,)) if p not in order]
    return order + [name]


def load_profile(name: str, profiles_dir: str | Path = PROFILES_DIR) -> dict[str, Any]:
    """The profile's overrides, over those of the profiles it ``extends`` (in order, parents first);
    a repeated or unknown key is a ParamsError (it would be ignored)."""
    merged: dict[str, Any] = {}
    for member in _lineage(name, profiles_dir):
        merged = deep_merge(merged, _read_profile(member, profiles_dir)[1])
    return merged


def leaves(node: Mapping[str, Any], prefix: Leaf = ()) -> dict[Leaf, Any]:
    """Key path -> value of every leaf (a non-empty mapping is a block; anything else a value)."""
    out: dict[Leaf, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            out.update(leaves(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


# ---- dvc exp run -S ----------------------------------------------------------------------------

_HYDRA_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*$")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S key=VALUE`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr keeps a float a float (3.0, 2e-05, inf)
    if isinstance(value, str):
        # Quoted: Hydra reads an unquoted 3 or true as a number or bool. A backslash run before a
        # quote (or the end) is doubled, and '${' escaped so OmegaConf keeps it as text.
        escaped = re.sub(r'(\\+)(?="|$)', r"\1\1", value).replace('"', '\\"').replace("${", "\\${")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        for key in value:
            if not _HYDRA_KEY.match(str(key)):
                raise ParamsError(f"key {key!r} cannot be written as a `dvc exp run -S` dict key")
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"{value!r} ({type(value).__name__}) has no `dvc exp run -S` form")


def set_param_args(name: str, params_path: str | Path = PARAMS_FILE,
                   profiles_dir: str | Path = PROFILES_DIR) -> list[str]:
    """``['-S', 'key=value', ...]`` for ``dvc exp run``, one pair per leaf of the profile.

    A key params.yaml lacks is written ``++key=value`` (Hydra's "add or override").
    """
    params = load_params(params_path)
    args = []
    for path, value in leaves(load_profile(name, profiles_dir)).items():
        add = "" if _has(params, path) else "++"
        args += ["-S", f"{add}{'.'.join(path)}={hydra_value(value)}"]
    return args


def _has(tree: Mapping[str, Any], path: Leaf) -> bool:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


# ---- in-place apply: splice value text ---------------------------------------------------------

@dataclass
class _Source:
    """A profile leaf's value as written in the profile file."""

    text: str
    column: int       # where the value starts
    key_column: int   # where its key starts
    block: bool       # a block (indented, multi-line) list or mapping


def _is_block(node: Node) -> bool:
    return isinstance(node, (SequenceNode, MappingNode)) and not node.flow_style


def _value_end(node: Node, text: str) -> int:
    """Index just past a value's own text (a block's trailing comments and blank lines excluded)."""
    if _is_block(node):
        last = node.value[-1]
        return _value_end(last[1] if isinstance(node, MappingNode) else last, text)
    start, end = node.start_mark.index, node.end_mark.index
    return start + len(text[start:end].rstrip())


def _child(mapping: Node, key: str) -> tuple[ScalarNode, Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _locate(root: Node, path: Leaf, source: str) -> tuple[MappingNode, tuple[ScalarNode, Node] | None]:
    """The mapping that holds ``path``'s last key, and that key's (key, value) nodes if present."""
    node = root
    for i, key in enumerate(path):
        if not isinstance(node, MappingNode):
            raise ParamsError(f"{source}: '{'.'.join(path[:i])}' is not a block, so it cannot hold "
                              f"'{'.'.join(path)}'")
        hit = _child(node, key)
        if i == len(path) - 1:
            return node, hit
        if hit is None:
            raise ParamsError(f"{source}: no block '{'.'.join(path[:i + 1])}' to hold '{'.'.join(path)}'")
        node = hit[1]
    raise AssertionError("empty key path")


def _shift(text: str, delta: int) -> str:
    """Indent every line after the first by ``delta`` columns (negative: dedent)."""
    lines = text.split("\n")
    for i in range(1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        if delta < 0 and line[:-delta].strip():
            raise ParamsError(f"cannot dedent {line!r} by {-delta} columns")
        lines[i] = " " * delta + line if delta >= 0 else line[-delta:]
    return "\n".join(lines)


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _after_line(text: str, index: int) -> int:
    """Index just past the line break that ends the line holding ``index``."""
    end = text.find("\n", index)
    return len(text) if end < 0 else end + 1


def _profile_sources(name: str, profiles_dir: Path) -> dict[Leaf, _Source]:
    """Every leaf's text over the profile's lineage: a later profile's leaf replaces an earlier one's,
    and any earlier leaf inside or above it (as :func:`deep_merge` replaces a value)."""
    out: dict[Leaf, _Source] = {}
    for member in _lineage(name, profiles_dir):
        own = _sources(profile_path(member, profiles_dir))
        for leaf in own:
            out = {k: v for k, v in out.items() if k[:len(leaf)] != leaf and leaf[:len(k)] != k}
        out.update(own)
    return out


def _sources(path: Path) -> dict[Leaf, _Source]:
    text = path.read_text()
    root = yaml.compose(text)
    out = {}

    def walk(node: Node, prefix: Leaf) -> None:
        for key_node, value_node in node.value:
            leaf = prefix + (key_node.value,)
            if leaf == (EXTENDS,):
                continue
            if isinstance(value_node, MappingNode) and value_node.value:
                walk(value_node, leaf)
            else:
                start = value_node.start_mark.index
                out[leaf] = _Source(text[start:_value_end(value_node, text)], value_node.start_mark.column,
                                    key_node.start_mark.column, _is_block(value_node))
    if root is not None:
        walk(root, ())
    return out


def _edit(text: str, root: Node, path: Leaf, source: _Source | None, where: str) -> tuple[int, int, str]:
    """(start, end, new text) that sets ``path`` to ``source`` (None: removes the key)."""
    parent, hit = _locate(root, path, where)
    if source is None:  # remove the key's whole lines
        key_node, value_node = hit
        start, end = _line_start(text, key_node.start_mark.index), _value_end(value_node, text)
        if text[start:key_node.start_mark.index].strip():
            raise ParamsError(f"{where}: '{'.'.join(path)}' does not start its line; remove it by hand")
        return start, _after_line(text, end), ""
    if hit is None:  # add the key as the block's last line(s)
        if parent.flow_style:
            raise ParamsError(f"{where}: '{'.'.join(path[:-1])}' is a {{flow}} block; write it as an "
                              f"indented block so '{path[-1]}' can be added")
        last_key, last_value = parent.value[-1]
        column = last_key.start_mark.column
        at = _after_line(text, _value_end(last_value, text))
        prefix = "" if text[:at].endswith("\n") else "\n"
        if source.block:
            value_column = column + source.column - source.key_column
            value = "\n" + " " * value_column + _shift(source.text, value_column - source.column)
        else:
            value = " " + _shift(source.text, column - source.key_column)
        return at, at, f"{prefix}{' ' * column}{path[-1]}:{value}\n"
    key_node, value_node = hit
    end = _value_end(value_node, text)
    if source.block == _is_block(value_node):  # same layout: replace the value's text only
        start = value_node.start_mark.index
        if source.block:
            return start, end, _shift(source.text, value_node.start_mark.column - source.column)
        new = _shift(source.text, key_node.start_mark.column - source.key_column)
        return start, end, new if start < end or text[start - 1] == " " else " " + new
    colon = text.index(":", key_node.end_mark.index) + 1  # layout changes: rewrite from the ':'
    if source.block:
        value_column = key_node.start_mark.column + source.column - source.key_column
        return colon, end, "\n" + " " * value_column + _shift(source.text, value_column - source.column)
    return colon, end, " " + _shift(source.text, key_node.start_mark.column - source.key_column)


def _remove(tree: dict, path: Leaf) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)


def apply_profile(name: str, params_path: str | Path = PARAMS_FILE,
                  profiles_dir: str | Path = PROFILES_DIR) -> dict[str, Any]:
    """Set params.yaml's values to the profile's, in place, and return the new params.

    Only the overridden values' text changes. The default profile (mini) also removes the keys
    other profiles add that params.yaml does not have, so applying it undoes any profile.
    """
    params_path, profiles_dir = Path(params_path), Path(profiles_dir)
    profile = load_profile(name, profiles_dir)
    sources = _profile_sources(name, profiles_dir)
    removals: list[Leaf] = []
    if name == DEFAULT_PROFILE:
        others = set().union(*(leaves(load_profile(p.stem, profiles_dir)) for p in profiles_dir.glob("*.yaml")))
        removals = sorted(others - set(sources))

    before = load_params(params_path)
    text = params_path.read_text()
    root = yaml.compose(text)
    current = leaves(before)
    removals = [path for path in removals if path in current]
    edits = [(*_edit(text, root, path, sources[path], str(params_path)), i) for i, path in enumerate(sources)]
    edits += [(*_edit(text, root, path, None, str(params_path)), len(edits) + i) for i, path in enumerate(removals)]
    # From the end of the file back, so earlier offsets stay valid; two keys added at one place
    # keep the profile's order.
    for start, end, new, _ in sorted(edits, key=lambda e: (e[0], e[3]), reverse=True):
        text = text[:start] + new + text[end:]

    expected = deep_merge(before, profile)
    for path in removals:
        _remove(expected, path)
    after = yaml.safe_load(text)
    if after != expected:
        got, want = leaves(after), leaves(expected)
        wrong = sorted(".".join(k) for k in got.keys() | want.keys() if got.get(k, got) != want.get(k, got))
        raise ParamsError(f"applying profile '{name}' would not give its values (at {wrong[:5]}); "
                          f"{params_path} is left unchanged")
    check_known_keys(after, str(params_path))
    params_path.write_text(text)
    return after
