"""paper-smoke end to end: the paper profile's code path through the whole DVC pipeline on the CPU.

``judge3d profile apply paper-smoke`` then ``make repro`` in a temporary clone: the TRELLIS backend
on random tiny models of TRELLIS's own classes (pretrain-base writes them as a pipeline folder, with
a random tiny DINOv2-with-registers), RGBA input renders, TRELLIS's two flow stages with the
evaluation budget taken from the pipeline's own settings, every arm on the SLat flow or the
conditioning tokens, and the tiny judges. Its numbers mean nothing; the plumbing is what is tested.

What a CPU lacks for TRELLIS (tests/trellis_stand_ins.py) reaches the stage processes through
``JUDGE3D_TRELLIS_PATCHES`` (tests/trellis_cpu_patches.py), the backend's hook for a site's fixes;
with ``JUDGE3D_TRELLIS_SRC``, that is all the test adds to a user's environment. Slow (minutes); it
runs in ``make test``, and skips, saying how to enable it, without TRELLIS's source or spconv.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from PIL import Image

import trellis_stand_ins as stand_ins
from test_e2e import REPO, _check, _clone, _keep_arms, _sh, _user_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(stand_ins.missing_requirement() is not None,
                                 reason=f"{stand_ins.missing_requirement()}: {stand_ins.ENABLE_HINT}")]


# A LoRA arm that trains without judged pairs (on the SLat flow) and a conditioner repair (on the
# conditioning tokens); the preference arms' TRELLIS path is in tests/test_trellis_arms.py.
PAPER_SMOKE_ARMS = ("sft_clean", "repair_severe")


def _trellis_env() -> dict[str, str]:
    env = _user_env()
    env["JUDGE3D_TRELLIS_SRC"] = str(stand_ins.trellis_test_source())
    env["JUDGE3D_TRELLIS_PATCHES"] = str(REPO / "tests" / "trellis_cpu_patches.py")
    return env


def _make(target: str, cwd, timeout: int = 1500) -> str:
    proc = subprocess.run(["make", target], cwd=cwd, env=_trellis_env(), capture_output=True, text=True,
                          timeout=timeout)
    return _check(proc, f"make {target} (paper-smoke)")


def test_paper_smoke_pipeline_end_to_end(tmp_path):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("git and make are needed")
    clone = tmp_path / "clone"
    _clone(REPO, clone)
    _sh("judge3d profile apply paper-smoke", clone)
    _keep_arms(clone, PAPER_SMOKE_ARMS)
    out = _make("repro", clone)
    assert "Running stage 'report'" in out
    assert "Data and pipelines are up to date" in _check(subprocess.run(
        ["bash", "-c", ". .venv/bin/activate && dvc status"], cwd=clone, env=_trellis_env(), capture_output=True,
        text=True), "dvc status")

    # The base generator is TRELLIS: pretrain-base wrote a pipeline folder TRELLIS's loader reads.
    base = json.loads((clone / "models" / "base" / "config.json").read_text())
    assert base["backend"] == "trellis" and base["pipeline"] == "pipeline"
    assert (clone / "models" / "base" / "pipeline" / "pipeline.json").is_file()
    pipeline_params = json.loads((clone / "models" / "base" / "pipeline" / "pipeline.json").read_text())["args"]

    # Inputs are RGBA cut-outs; candidates carry both stages' latents; the default budget is the pipeline's.
    world = [json.loads(line) for line in (clone / "data" / "world" / "manifest.jsonl").read_text().splitlines()]
    with Image.open(clone / world[0]["image_path"]) as image:
        assert image.mode == "RGBA"
    rows = [json.loads(line) for line in
            (clone / "data" / "generated" / "heldout_clean" / "manifest.jsonl").read_text().splitlines()]
    default = next(r for r in rows if r["budget"] == "default")
    assert set(default["sampler"]) == {"ss", "slat"}         # the generator's stages only (no mini `flow`)
    assert default["sampler"]["ss"]["steps"] == pipeline_params["sparse_structure_sampler"]["params"]["steps"]
    assert default["sampler"]["slat"]["cfg_strength"] == pipeline_params["slat_sampler"]["params"]["cfg_strength"]
    from safetensors import safe_open

    with safe_open(str(clone / default["latents_path"]), "pt") as latents:
        assert {"ss", "slat.coords", "slat.feats"} <= set(latents.keys())

    # Every arm ran and trained on TRELLIS: the LoRA arm on the SLat flow, the repair arm on the
    # conditioning tokens.
    for arm in PAPER_SMOKE_ARMS:
        train = json.loads((clone / "data" / "arms" / arm / "train_metrics.json").read_text())
        assert (clone / "metrics" / "arms" / f"{arm}.json").is_file(), arm
        assert (clone / "data" / "evals" / arm / "verdicts.jsonl").is_file(), arm
        assert train.get("trained", True), f"{arm} did not train: {train}"
        before, after = ("feat_mse_before", "feat_mse_after") if arm.startswith("repair") else \
            ("fm_mse_before", "fm_mse_after")
        assert train[before] is not None and train[after] is not None, train
    sft_clean = json.loads((clone / "models" / "arms" / "sft_clean" / "adapter_config.json").read_text())
    assert "mlp.0" in sft_clean["target_modules"] or "mlp.0" in str(sft_clean["target_modules"])
    assert (clone / "reports" / "study_table.md").is_file()
    assert "matches" in _make("verify", clone)
