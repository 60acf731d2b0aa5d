"""Every stage's deps cover every project module it imports, so `dvc status` sees every code change."""
from __future__ import annotations

from pathlib import Path

import yaml

from judge3d.core.config import load_params
from judge3d.pipeline.dvcgen import (ARM_STAGES, arm_stage_bodies, extra_code_deps, import_closure, missing_code_deps,
                                     missing_report_params)

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_lists_its_import_closure():
    missing = missing_code_deps(REPO / "dvc.yaml")
    report = "\n".join(f"  {stage}: {' '.join(files)}" for stage, files in missing.items())
    assert not missing, ("dvc.yaml misses project modules its stages import (add them with "
                         f"`judge3d dvc-deps --write`):\n{report}")


def test_no_stage_lists_code_it_does_not_load():
    """Deps are the exact closure: a module a stage no longer imports would rerun it for nothing."""
    extra = extra_code_deps(REPO / "dvc.yaml")
    assert not extra, f"dvc.yaml lists code its stages do not load (`judge3d dvc-deps --write` drops it): {extra}"


def test_a_stage_that_renders_depends_on_the_shaders():
    """Package data read at run time counts as code: the montage renderer loads its GLSL files."""
    closure = {p.as_posix() for p in import_closure("stages/render.py", REPO)}
    assert "src/judge3d/render/shaders" in closure
    assert "src/judge3d/render/shaders" not in {p.as_posix() for p in import_closure("stages/calibrate.py", REPO)}


def test_closure_follows_lazy_and_transitive_imports():
    closure = {p.as_posix() for p in import_closure("stages/calibrate.py", REPO)}
    # imported inside functions / through other modules, never named by the stage script itself
    for needed in ("src/judge3d/core/stats.py", "src/judge3d/judges/verdict_log.py", "src/judge3d/core/seeding.py",
                   "src/judge3d/core/numerics.py", "stages/_stage_env.py", "src/judge3d/judges/__init__.py"):
        assert needed in closure, needed


def test_a_missing_dep_is_reported_by_stage_and_file(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "src" / "judge3d").mkdir(parents=True)
    (tmp_path / "src" / "judge3d" / "__init__.py").write_text("")
    (tmp_path / "src" / "judge3d" / "core").mkdir()
    (tmp_path / "src" / "judge3d" / "core" / "__init__.py").write_text("")
    (tmp_path / "src" / "judge3d" / "core" / "stats.py").write_text("import math\n")
    (tmp_path / "src" / "judge3d" / "metrics.py").write_text("def f():\n    from judge3d.core.stats import x\n")
    (tmp_path / "stages" / "s.py").write_text("from judge3d.metrics import f\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "python stages/s.py", "deps": ["stages/s.py", "src/judge3d/metrics.py"]}}}))
    assert missing_code_deps(tmp_path / "dvc.yaml") == {"s": ["src/judge3d/__init__.py", "src/judge3d/core/__init__.py",
                                                           "src/judge3d/core/stats.py"]}


def test_arm_stages_are_what_the_generator_writes():
    """The arm stages (train-adapter, judge-eval, arm-metrics) are generated from the arm registry
    (`judge3d dvc-deps --write`); dvc.yaml must hold exactly that, code deps included, and the report
    stage must list what it reads of the arms."""
    params = load_params(REPO / "params.yaml")
    generated = arm_stage_bodies(params, repo=REPO)
    committed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ARM_STAGES:
        assert committed[stage] == generated[stage], f"{stage}: regenerate it with `judge3d dvc-deps --write`"
    assert missing_report_params(REPO / "dvc.yaml", params) == []
