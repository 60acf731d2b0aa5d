"""What dvc.yaml must list so that `dvc status` sees every code change: each stage's import closure.

A stage's result depends on every project module its script imports, directly or not. A module that
is imported but not listed in the stage's ``deps`` can change (how a CI is computed, say) while
``dvc status`` stays clean and the numbers go stale. This module computes the closure statically
(``ast``, nothing is imported or executed), follows ``stages/_stage_env.py`` and other helper
modules in ``stages/``, and compares it with ``dvc.yaml``.

Used by ``tests/test_stage_deps.py`` (fails naming the stage and the missing file), by
``judge3d dvc-deps --write`` (adds what is missing, keeping dvc.yaml's comments), and by the
generator of the ``train-adapter`` stanza, which lists the same closure.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterable

PACKAGE = "judge3d"
_STAGE_CMD = re.compile(r"python3?\s+(stages/\S+\.py)")


def _module_file(src: Path, module: str) -> Path | None:
    path = src / Path(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` may load (lazy imports
    inside functions included: they run when the stage runs)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # may name a submodule
    return found


def import_closure(script: str | Path, repo: str | Path = ".") -> set[Path]:
    """The project files ``script`` loads: ``src/judge3d/**`` modules (with every package
    ``__init__`` on the way) and helper modules of ``stages/``, relative to ``repo``."""
    repo = Path(repo).resolve()
    src, stages_dir = repo / "src", repo / "stages"
    script = (repo / script).resolve()
    files: set[Path] = {script}
    todo: list[tuple[Path, str]] = [(script, "")]
    while todo:
        path, package = todo.pop()
        for module in _imported_modules(path, package):
            if path.parent == stages_dir and "." not in module:
                local = stages_dir / f"{module}.py"  # a stage helper, imported from sys.path[0]
                if local.is_file() and local not in files:
                    files.add(local)
                    todo.append((local, ""))
                    continue
            if module.split(".")[0] != PACKAGE:
                continue
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                name = ".".join(parts[:i])
                found = _module_file(src, name)
                if found is not None and found not in files:
                    files.add(found)
                    todo.append((found, name if found.name == "__init__.py" else ".".join(parts[: i - 1])))
    return {f.relative_to(repo) for f in files}


def _covered(rel: str, deps: Iterable[str]) -> bool:
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def stage_script(body: dict[str, Any]) -> str | None:
    cmd = body.get("cmd", "")
    cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    match = _STAGE_CMD.search(cmd)
    return match.group(1) if match else None


def missing_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """stage name -> project files its script imports that its ``deps`` do not cover (sorted)."""
    import yaml

    dvc_yaml = Path(dvc_yaml)
    repo = dvc_yaml.resolve().parent
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    out: dict[str, list[str]] = {}
    for name, stage in (doc.get("stages") or {}).items():
        body = stage.get("do", stage)
        script = stage_script(body)
        if script is None:
            continue
        deps = [str(d) for d in body.get("deps") or []]
        missing = sorted(p.as_posix() for p in import_closure(script, repo) if not _covered(p.as_posix(), deps))
        if missing:
            out[name] = missing
    return out


def write_missing_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Add each stage's missing code deps to dvc.yaml in place, after its last code dep; comments and
    layout are kept (ruamel round trip, the YAML library DVC itself uses). Returns what was added."""
    from ruamel.yaml import YAML

    dvc_yaml = Path(dvc_yaml)
    missing = missing_code_deps(dvc_yaml)
    if not missing:
        return {}
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(dvc_yaml.read_text())
    for name, files in missing.items():
        body = doc["stages"][name]
        body = body.get("do", body)
        deps = body["deps"]
        code = [i for i, d in enumerate(deps) if str(d).startswith(("src/", "stages/"))]
        at = (code[-1] + 1) if code else 0
        for offset, rel in enumerate(files):
            deps.insert(at + offset, rel)
    with dvc_yaml.open("w") as fh:
        rt.dump(doc, fh)
    return missing
