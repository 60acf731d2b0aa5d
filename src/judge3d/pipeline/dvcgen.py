"""What dvc.yaml must list so that `dvc status` sees every code change: each stage's import closure.

A stage's result depends on every project module its script imports, directly or not. A module that
is imported but not listed in the stage's ``deps`` can change (how a CI is computed, say) while
``dvc status`` stays clean and the numbers go stale. This module computes the closure statically
(``ast``, nothing is imported or executed), follows ``stages/_stage_env.py`` and other helper
modules in ``stages/``, and compares it with ``dvc.yaml``.

Used by ``tests/test_stage_deps.py`` (fails naming the stage and the missing file), by
``judge3d dvc-deps --write`` (adds what is missing, keeping dvc.yaml's comments, and regenerates the
arm stages: one foreach item per entry of the arm registry, with the keys and data it reads).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

PACKAGE = "judge3d"
# Modules that read files of their package at run time (package data in pyproject.toml): a stage
# that imports one also depends on those files.
DATA_READ_BY = {"src/judge3d/render/montage.py": "src/judge3d/render/shaders"}
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
    ``__init__`` on the way), the data folders they read (``DATA_READ_BY``) and helper modules of
    ``stages/``, relative to ``repo``."""
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
    files |= {repo / data for module, data in DATA_READ_BY.items() if repo / module in files}
    return {f.relative_to(repo) for f in files}


def _covered(rel: str, deps: Iterable[str]) -> bool:
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def stage_script(body: dict[str, Any]) -> str | None:
    cmd = body.get("cmd", "")
    cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    match = _STAGE_CMD.search(cmd)
    return match.group(1) if match else None


def _stage_closures(dvc_yaml: str | Path) -> Iterator[tuple[str, list[str], set[str]]]:
    """(stage name, its deps, its script's import closure) for every stage that runs a stage script."""
    import yaml

    dvc_yaml = Path(dvc_yaml)
    repo = dvc_yaml.resolve().parent
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    for name, stage in (doc.get("stages") or {}).items():
        body = stage.get("do", stage)
        script = stage_script(body)
        if script is not None:
            yield name, [str(d) for d in body.get("deps") or []], {p.as_posix() for p in import_closure(script, repo)}


def missing_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """stage name -> project files its script imports that its ``deps`` do not cover (sorted)."""
    out: dict[str, list[str]] = {}
    for name, deps, closure in _stage_closures(dvc_yaml):
        missing = sorted(f for f in closure if not _covered(f, deps))
        if missing:
            out[name] = missing
    return out


def extra_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """stage name -> code deps (``src/``, ``stages/``) its script no longer loads: each reruns the
    stage for a change that cannot affect it."""
    out: dict[str, list[str]] = {}
    for name, deps, closure in _stage_closures(dvc_yaml):
        extra = [d for d in deps if d.startswith(("src/", "stages/")) and d.rstrip("/") not in closure]
        if extra:
            out[name] = extra
    return out


def remove_extra_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Drop each stage's :func:`extra_code_deps` from dvc.yaml in place (comments kept)."""
    extra = extra_code_deps(dvc_yaml)
    if not extra:
        return {}
    dvc_yaml = Path(dvc_yaml)
    rt, doc = _round_trip(dvc_yaml)
    for name, files in extra.items():
        body = doc["stages"][name]
        deps = body.get("do", body)["deps"]
        for rel in files:
            deps.remove(rel)
    with dvc_yaml.open("w") as fh:
        rt.dump(doc, fh)
    return extra


def _round_trip(dvc_yaml: Path):
    """dvc.yaml loaded for editing with its comments and layout (ruamel, the YAML library DVC uses)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt, rt.load(dvc_yaml.read_text())


def write_missing_code_deps(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """Add each stage's missing code deps to dvc.yaml in place, after its last code dep; comments and
    layout are kept (ruamel round trip, the YAML library DVC itself uses). Returns what was added."""
    dvc_yaml = Path(dvc_yaml)
    missing = missing_code_deps(dvc_yaml)
    if not missing:
        return {}
    rt, doc = _round_trip(dvc_yaml)
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


# ---------------------------------------------------------------------------------------------
# The arm stages, generated from the arm registry (judge3d.adapt.arms)
# ---------------------------------------------------------------------------------------------
# DVC cannot splice a list into `params:`/`deps:`, so each foreach item carries its own keys in a
# fixed number of slots (`${item.params[i]}`), padded by repeating one of them (DVC accepts duplicates).
ARM_STAGES = ("train-adapter", "judge-eval", "arm-metrics")
JUDGE_EVAL_PARAMS = ("seed", "base.device", "sampler", "geometry", "render", "judge", "judges.eval.model",
                     "judges.eval.reference", "arm_eval", "generate.batch_size")
EVAL_JUDGE_DIR = "models/judges/eval"
ARM_METRICS_PARAMS = ("report.bar", "report.n_boot", "report.seed", "report.keys")
REPORT_STAGE = "report"


def code_deps(script: str, repo: str | Path = ".") -> tuple[str, ...]:
    """A stage's code deps: its script's whole import closure, file by file (a whole package folder
    would also rerun the stage for a module it never imports)."""
    return tuple(sorted(p.as_posix() for p in import_closure(script, repo)))


def covers(listed: Iterable[str], key: str) -> bool:
    """Whether a params list covers ``key``, itself or through a parent key."""
    return any(key == k or key.startswith(k + ".") for k in listed)


def _slots(per_arm: dict[str, list[str]]) -> tuple[dict[str, list[str]], int]:
    """Each arm's list padded to the longest with its own first entry, and that length."""
    n = max(len(v) for v in per_arm.values())
    return {arm: v + [v[0]] * (n - len(v)) for arm, v in per_arm.items()}, n


def _refs(field: str, n: int) -> list[str]:
    return [f"${{item.{field}[{i}]}}" for i in range(n)]


def arm_stage_bodies(params: dict[str, Any], inputs: Any = None, repo: str | Path = ".") -> dict[str, dict[str, Any]]:
    """The train-adapter, judge-eval and arm-metrics stages of dvc.yaml, one foreach item per arm:
    the params keys each reads (so `-S method.beta=...` reruns only the arms that read it), its
    severity-specific data and its regime's base reference."""
    from judge3d.adapt.arms import ArmInputs, arm_paths, arm_specs

    inputs = inputs or ArmInputs()
    specs = list(arm_specs(params))
    at = arm_paths("${key}", "${item.regime}")
    train_keys, n_keys = _slots({s.arm: s.param_keys for s in specs})
    train_data, n_data = _slots({s.arm: inputs.training_data(s) for s in specs})
    eval_keys, n_eval = _slots({s.arm: s.regime_keys for s in specs})
    label_keys, n_labels = _slots({s.arm: s.label_keys for s in specs})
    world_dir = str(Path(inputs.world).parent)
    return {
        "train-adapter": {
            "foreach": {s.arm: {"params": train_keys[s.arm], "deps": train_data[s.arm]} for s in specs},
            "do": {"cmd": "python stages/train_adapter.py --arm ${key}",
                   "params": _refs("params", n_keys),
                   "deps": [*code_deps("stages/train_adapter.py", repo), inputs.base, world_dir,
                            *_refs("deps", n_data)],
                   "outs": [at.model_dir.as_posix(), at.train_metrics.as_posix(), at.live_dir.as_posix()]}},
        "judge-eval": {
            "foreach": {s.arm: {"regime": s.regime, "params": eval_keys[s.arm]} for s in specs},
            "do": {"cmd": "python stages/judge_eval.py --arm ${key}",
                   # the world: the objects' meshes (oracle) and input images (a reference-aware judge's)
                   "deps": [*code_deps("stages/judge_eval.py", repo), inputs.base, world_dir,
                            at.model_dir.as_posix(), EVAL_JUDGE_DIR, at.base_montages.parent.as_posix()],
                   "params": [*JUDGE_EVAL_PARAMS, *_refs("params", n_eval)],
                   "outs": [at.eval_dir.as_posix()]}},
        "arm-metrics": {
            "foreach": {s.arm: {"regime": s.regime, "params": label_keys[s.arm]} for s in specs},
            "do": {"cmd": "python stages/arm_metrics.py --arm ${key}",
                   "deps": [*code_deps("stages/arm_metrics.py", repo), at.eval_dir.as_posix(),
                            at.train_metrics.as_posix(), at.base_manifest.as_posix()],
                   "params": [*ARM_METRICS_PARAMS, *_refs("params", n_labels)],
                   "metrics": [{at.metrics.as_posix(): {"cache": False}}]}},
    }


def report_arm_params(params: dict[str, Any]) -> list[str]:
    """What the report stage reads of the arms: the whole registry (rows, order, labels) and the
    settings its labels are filled with."""
    from judge3d.adapt.arms import arm_specs

    outside = [k for s in arm_specs(params) for k in s.label_keys if not k.startswith("arms.")]
    return ["arms", *dict.fromkeys(outside)]


def stanza_text(name: str, body: dict[str, Any]) -> str:
    """One stage as dvc.yaml text (indented under ``stages:``, sequences indented as in the file)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False):
            return super().increase_indent(flow, False)

    text = yaml.dump({name: body}, Dumper=Dumper, sort_keys=False, width=4096, allow_unicode=True)
    return "".join("  " + line if line.strip() else line for line in text.splitlines(True))


def write_arm_stanzas(dvc_yaml: str | Path, params: dict[str, Any]) -> list[str]:
    """Rewrite the generated arm stages in dvc.yaml (text outside them, comments included, is kept)
    and add what the report stage reads of the arms to its params; returns what changed."""
    dvc_yaml = Path(dvc_yaml)
    repo = dvc_yaml.resolve().parent
    text = dvc_yaml.read_text()
    changed = []
    for name, body in arm_stage_bodies(params, repo=repo).items():
        start = text.index(f"\n  {name}:\n") + 1
        nxt = re.compile(r"^(?:  \S|\S)", re.M).search(text, start + 1)
        end = nxt.start() if nxt else len(text)
        new = stanza_text(name, body) + "\n"
        if text[start:end] != new:
            changed.append(name)
            text = text[:start] + new + text[end:]
    dvc_yaml.write_text(text)
    missing = missing_report_params(dvc_yaml, params)
    if missing:
        rt, doc = _round_trip(dvc_yaml)
        doc["stages"][REPORT_STAGE]["params"].extend(missing)
        with dvc_yaml.open("w") as fh:
            rt.dump(doc, fh)
        changed.append(REPORT_STAGE)
    return changed


def missing_report_params(dvc_yaml: str | Path, params: dict[str, Any]) -> list[str]:
    """Keys the report stage reads of the arms that dvc.yaml does not list for it."""
    import yaml

    doc = yaml.safe_load(Path(dvc_yaml).read_text()) or {}
    listed = [str(k) for k in doc["stages"][REPORT_STAGE].get("params") or []]
    return [k for k in report_arm_params(params) if not covers(listed, k)]
