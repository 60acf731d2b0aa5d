"""The arm registry: one params entry per arm, and dvc.yaml lists exactly what each arm stage reads."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from judge3d.adapt.arms import arm_names, arm_paths, arm_spec
from judge3d.core.config import ParamsError, load_params
from judge3d.pipeline.dvcgen import ARM_STAGES, arm_stage_bodies, covers, report_arm_params
from judge3d.world.degrade import SEVERITIES, require_severities
from report_fixture import build_repo, run_stages

REPO = Path(__file__).resolve().parents[1]
NEW_ARM = {"dpo_quarter": {"kind": "dpo", "beta": 0.25}}


def resolved_params(stages: dict) -> dict[str, list[str]]:
    """Each stage's params list as DVC resolves it (``${key}``, ``${item}``, ``${item.f}``, ``${item.f[i]}``)."""
    out = {}
    for name, body in stages.items():
        foreach = body.get("foreach")
        if foreach is None:
            out[name] = [str(p) for p in body.get("params") or []]
            continue
        assert isinstance(foreach, (dict, list)), f"{name}: foreach over {foreach!r} is not resolved by this test"
        items = foreach.items() if isinstance(foreach, dict) else ((v, v) for v in foreach)
        for key, item in items:
            def sub(text: str) -> str:
                text = text.replace("${key}", str(key)).replace("${item}", str(item))
                text = re.sub(r"\$\{item\.(\w+)\[(\d+)\]\}", lambda m: str(item[m.group(1)][int(m.group(2))]), text)
                return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), text)
            out[f"{name}@{key}"] = [sub(str(p)) for p in body["do"].get("params") or []]
    return out


def test_method_beta_is_read_by_the_dpo_arm_and_the_report_only():
    """`dvc exp run -S method.beta=...` reruns train-adapter@dpo, judge-eval@dpo (through the adapter),
    arm-metrics@dpo and report; no other stage lists method.beta, dpo_strong (own β) included."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    reading = sorted(s for s, keys in resolved_params(stages).items() if covers(keys, "method.beta"))
    # from params alone: the DPO arms that do not set their own beta
    dpo = [a for a, entry in params["arms"].items() if entry["kind"] == "dpo" and "beta" not in entry]
    assert dpo == ["dpo"]
    assert reading == sorted([f"train-adapter@{a}" for a in dpo] + [f"arm-metrics@{a}" for a in dpo] + ["report"])
    # judge-eval@dpo reruns through its dependency on the adapter train-adapter@dpo writes
    assert "models/arms/${key}" in stages["judge-eval"]["do"]["deps"]
    assert "models/arms/${key}" in stages["train-adapter"]["do"]["outs"]


def test_a_new_arm_is_one_params_entry(tmp_path):
    params = load_params(REPO / "params.yaml")
    params["arms"].update(copy.deepcopy(NEW_ARM))
    spec = arm_spec(params, "dpo_quarter")
    assert (spec.kind, spec.regime, spec.family, spec.adapts_label) == ("dpo", "clean", "flow", "flow DiT")
    assert spec.display == "DPO β=0.25" and spec.settings["beta"] == 0.25
    assert "arms.dpo_quarter.beta" in spec.param_keys and "method.beta" not in spec.param_keys
    assert arm_names(params)[-1] == "dpo_quarter"               # study-table order = params order
    paths = arm_paths("dpo_quarter", spec.regime)
    assert paths.metrics.as_posix() == "metrics/arms/dpo_quarter.json"
    assert paths.base_manifest.as_posix() == "data/generated/heldout_clean/manifest.jsonl"

    bodies = arm_stage_bodies(params, repo=REPO)
    resolved = resolved_params(bodies)
    assert set(resolved) >= {f"{stage}@dpo_quarter" for stage in ARM_STAGES}
    assert set(resolved["train-adapter@dpo_quarter"]) == set(spec.param_keys)
    assert bodies["judge-eval"]["foreach"]["dpo_quarter"]["regime"] == "clean"
    assert not covers(resolved["arm-metrics@dpo_quarter"], "method.beta")
    assert covers(resolved["arm-metrics@dpo_quarter"], "arms.dpo_quarter.beta")
    assert "arms" in report_arm_params(params)

    root = tmp_path / "repo"
    built = build_repo(root, extra_arms=NEW_ARM, n_boot=100)
    run_stages(root, built)
    table = (root / "reports/study_table.md").read_text()
    assert "| DPO β=0.25 (flow DiT) | clean |" in table
    rows = [line for line in (root / "reports/study_table.csv").read_text().splitlines()[1:]]
    assert [r.split(",")[0] for r in rows] == arm_names(params)


def test_an_entry_sets_only_what_its_kind_reads():
    params = load_params(REPO / "params.yaml")
    for entry, match in (({"kind": "sft_best", "severity": "mild"}, "does not read"),
                         ({"kind": "repair"}, "severity"),
                         ({"kind": "repair", "severity": "extreme"}, "severity"),
                         ({"kind": "orpo", "display": "ORPO {beta}"}, "not a setting")):
        bad = copy.deepcopy(params)
        bad["arms"]["x"] = entry
        with pytest.raises(ParamsError, match=match):
            arm_spec(bad, "x")
    params["arms"]["x"] = {"kind": "orpo", "display": "ORPO λ={lambda}"}
    with pytest.raises(ParamsError, match="not a setting"):  # orpo.lambda is nested, not a top-level setting
        arm_spec(params, "x")


def test_one_severity_list():
    params = load_params(REPO / "params.yaml")
    assert tuple(params["degradations"]) == SEVERITIES          # one degradation block per severity
    assert require_severities(params, "calibrate.severities") == list(SEVERITIES)
    params["calibrate"]["severities"] = ["mild", "extreme"]
    with pytest.raises(ParamsError, match="calibrate.severities"):
        require_severities(params, "calibrate.severities")
