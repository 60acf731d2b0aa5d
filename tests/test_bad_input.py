"""Issue 12, bad input: one test per case that passed silently or crashed without naming the file / fix
(benchmarks/bad_input_audit.py reruns the same cases against any source tree and tabulates them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from judge3d.core.config import ParamsError, load_params
from judge3d.core.io import ModelFileError, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
PARAMS_TEXT = (REPO / "params.yaml").read_text()


# ------------------------------------------------------------------ meshes and render flags
def test_degenerate_mesh_renders_flagged_empty():
    from judge3d.render.montage import MontageRenderer

    one_line = trimesh.Trimesh(np.array([[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0]], float), np.array([[0, 1, 2]]),
                               process=False)
    with MontageRenderer.from_params(PARAMS) as r:
        image, info = r.render(one_line)
    assert info["empty"] and info["degenerate"] and info["coverage"] == 0.0
    assert np.all(image == r.background)


def _heldout(tmp_path, blank_object="h0"):
    """heldout_clean (default s0/s1, high, low), clear_gap (each s0's degraded copy; h2's lost every
    part and renders blank) and heldout_mild, 3 objects; h0's s0 montage is blank, h2's high clipped."""
    root = tmp_path / "montages"
    rows = {"heldout_clean": [], "heldout_mild": [], "clear_gap": []}
    for j in range(3):
        oid = f"h{j}"

        def add(set_name, budget, seed, seed_index, q, **flags):
            cand = f"{oid}_{budget}_s{seed_index}"
            png = root / set_name / f"{cand}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (int(q * 255),) * 3).save(png)
            rows[set_name].append({"object_id": oid, "budget": budget, "seed": seed, "seed_index": seed_index,
                                   "candidate": cand, "montage_path": str(png), "oracle_score": q,
                                   "regime": set_name.split("_")[1], "category": "chair",
                                   "render_empty": False, "render_clipped": False, **flags})
        add("heldout_clean", "default", 10 + j, 0, 0.6, **({"render_empty": True} if oid == blank_object else {}))
        add("heldout_clean", "default", 20 + j, 1, 0.5)
        add("heldout_clean", "high", 30 + j, 0, 0.9, **({"render_clipped": True} if j == 2 else {}))
        add("heldout_clean", "low", 40 + j, 0, 0.1)
        add("heldout_mild", "default", 10 + j, 0, 0.55)
        add("clear_gap", "default", 10 + j, 0, 0.2, **({"render_empty": True} if j == 2 else {}))
        rows["clear_gap"][-1].update(candidate=f"{oid}_default_s0__coarsen2", source_candidate=f"{oid}_default_s0")
    for name, r in rows.items():
        write_jsonl(root / name / "manifest.jsonl", r)
    return root


class _Judge:
    judge_id = "fake@000000000000"

    def __init__(self):
        self.seen: set[str] = set()

    def p_first(self, pairs, prompt):
        self.seen |= {str(p) for pair in pairs for p in pair}
        return np.asarray([0.7 if "high" in str(a) or "s0" in str(a) else 0.3 for a, _ in pairs])


def _cal_params():
    params = json.loads(json.dumps(PARAMS))
    params["calibrate"]["severities"] = ["mild"]
    params["calibrate"]["bootstrap"]["n"] = 100
    return params


def test_calibrate_sets_aside_flagged_montages_and_counts_them(tmp_path):
    from judge3d.pipeline.judging import run_calibrate
    from judge3d.report.judge_metrics import calibration_metrics_from_dir

    root = _heldout(tmp_path)
    ev, tr = _Judge(), _Judge()
    params = _cal_params()
    m = run_calibrate(ev, tr, root, tmp_path / "cal", tmp_path / "cal.json", tmp_path / "plots", params,
                      "A <image1> B <image2>", show_progress=False)
    blank = str(root / "heldout_clean" / "h0_default_s0.png")
    blank_copy = str(root / "clear_gap" / "h2_default_s0.png")
    assert blank not in ev.seen and blank_copy not in ev.seen and blank not in tr.seen and blank_copy not in tr.seen
    # h0's s0 is in base-vs-base, headroom and clear-gap; h2's degraded copy is in clear-gap
    assert m["flagged_by_control"] == {"base_vs_base": 1, "clear_gap": 2, "headroom_mild": 1}
    assert m["n_flagged"] == 4 and m["clear_gap"]["n"] == 1 and m["clear_gap"]["n_flagged"] == 2
    # verify's path (logs + flagged.jsonl) gives the same numbers
    assert calibration_metrics_from_dir(tmp_path / "cal", params) == json.loads((tmp_path / "cal.json").read_text())


def test_arm_pairs_with_a_flagged_montage_are_not_judged_and_counted(tmp_path):
    from judge3d.pipeline.arm_eval import arm_pairs
    from judge3d.judges.pairing import partition_flagged

    root = _heldout(tmp_path)
    base = [r for r in read_jsonl(root / "heldout_clean" / "manifest.jsonl") if r["budget"] == "high"]
    arm = [dict(r, candidate="arm_" + r["candidate"], montage_path=r["montage_path"].replace(".png", "_arm.png"),
                render_clipped=False, render_empty=r["object_id"] == "h1") for r in base]
    judged, flagged = partition_flagged(arm_pairs("dpo", arm, base), arm, base)
    assert [p.object_id for p in judged] == ["h0"]  # h1: the arm's montage is blank, h2: the base's is clipped
    assert [(f["object_id"], f["x_flags"], f["y_flags"]) for f in flagged] == [
        ("h1", ["render_empty"], []), ("h2", [], ["render_clipped"])]


def test_arm_metrics_count_flagged_pairs_and_drop_their_stale_verdicts():
    from judge3d.report.arm_metrics import arm_metrics

    def row(oid, **kw):
        return {"object_id": oid, "regime": "clean", "seed": 1, "budget": "default", "oracle_score": 0.5,
                "candidate": oid, **kw}

    arm = [row("o0"), row("o1", render_empty=True), row("o2")]
    base = [row("o0"), row("o1"), row("o2")]
    import tempfile

    from judge3d.judges.protocol import Pair, run_pairs  # the verdict rows come from the real logger

    with tempfile.TemporaryDirectory() as tmp:
        pngs = []
        for i in range(2):
            p = Path(tmp) / f"{i}.png"
            Image.new("RGB", (8, 8), (i * 200,) * 3).save(p)
            pngs.append(str(p))
        pairs = [Pair(pair_id=f"dpo:{o}", object_id=o, x=pngs[0], y=pngs[1], x_candidate=o, y_candidate=o,
                      x_oracle=0.5, y_oracle=0.5) for o in ("o0", "o1", "o2")]
        rows = run_pairs(_Judge(), pairs, Path(tmp) / "v.jsonl", "p", 8, show_progress=False)
    train = {"diverged": False, "fm_mse_before": 1.0, "fm_mse_after": 0.9, "settings": {"beta": 0.1}}
    m = arm_metrics(rows, arm, base, train, PARAMS, "dpo", flagged=[{"object_id": "o1"}])
    assert m["n_flagged"] == 1 and m["flagged_objects"] == ["o1"]
    assert m["n"] == 2 and m["n_unjudged"] == 0  # o1's (stale) verdict is not counted


def test_ground_truth_outside_the_canonical_cube_is_an_error_naming_the_file(tmp_path):
    from judge3d.pipeline.mesh_sets import _CandidateScorer

    gt = trimesh.creation.box(extents=[0.5] * 3)
    gt.apply_translation([3.0, 0, 0])
    gt.export(tmp_path / "far.ply")
    np.save(tmp_path / "far.npy", np.zeros((32,) * 3, np.float32))

    class Job:
        object_id, mesh_path_gt, voxel_path_gt = "o0", str(tmp_path / "far.ply"), str(tmp_path / "far.npy")

    with pytest.raises(ValueError, match="outside the canonical cube") as info:
        _CandidateScorer(tmp_path / "out", PARAMS, "s", {}).reference(Job())
    assert "far.ply" in str(info.value) and "dvc repro data" in str(info.value)


# ------------------------------------------------------------------ input images and manifests
def test_degrade_on_a_truncated_png_names_the_file_and_the_fix(tmp_path):
    from judge3d.world.dataset import degrade_world

    png = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    write_jsonl(tmp_path / "world.jsonl", [{"object_id": "o0", "split": "train", "category": "chair",
                                            "image_path": "img.png"}])
    params = json.loads(json.dumps(PARAMS))
    params["world"]["degraded_splits"] = ["train"]
    with pytest.raises(ValueError, match="dvc repro -s data") as info:
        degrade_world(params, "mild", tmp_path / "world.jsonl", tmp_path / "out", root=tmp_path, progress=False)
    assert "img.png" in str(info.value)


def test_manifest_row_that_is_a_list_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"object_id": "o0"}) + "\n" + json.dumps(["o0", "low"]) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: a manifest row must be a JSON object"):
        read_jsonl(path)


# ------------------------------------------------------------------ model loading
@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from judge3d.judges.tiny import TinyLMSize, TinySizes, TinyVisionSize, build_tiny_qwen25vl

    sizes = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                      vision=TinyVisionSize(hidden=32, depth=2, heads=2, intermediate=64, patch=14), image_size=56)
    root = tmp_path_factory.mktemp("judge") / "qwen"
    build_tiny_qwen25vl(root, sizes, seed=1)
    return root


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _not_json(path):
    path.write_text("{not json")


def _no_tokenizer(folder):
    for f in list(folder.iterdir()):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()


@pytest.mark.parametrize("damage, file, words", [
    (_truncate, "model.safetensors", "truncated"), (_empty, "model.safetensors", "empty or truncated"),
    (_not_json, "config.json", "not valid JSON"), (_no_tokenizer, None, "no tokenizer files")])
def test_damaged_judge_folder_names_folder_file_and_fix(judge_dir, tmp_path, damage, file, words):
    from judge3d.judges.hf import HFJudge, JudgeLoadError

    folder = tmp_path / "judge"
    shutil.copytree(judge_dir, folder)
    damage(folder / file if file else folder)
    with pytest.raises(JudgeLoadError, match=words) as info:
        HFJudge.load(folder)
    msg = str(info.value)
    assert str(folder) in msg and (file is None or f"{folder}/{file}" in msg) and "pretrain-judges" in msg


@pytest.mark.parametrize("damage, file, words", [
    (_truncate, "model.safetensors", "truncated"), (_empty, "model.safetensors", "empty or truncated"),
    (_not_json, "config.json", "not valid JSON")])
def test_damaged_generator_folder_names_the_file_and_fix(tmp_path, damage, file, words):
    torch = pytest.importorskip("torch")
    from judge3d.generators import load_generator
    from judge3d.generators.mini import ConditionerConfig, FlowConfig, MiniConfig, MiniGenerator

    torch.manual_seed(0)
    cfg = MiniConfig(conditioner=ConditionerConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2),
                     flow=FlowConfig(resolution=8, patch_size=4, width=16, depth=1, heads=2, time_embed_dim=16))
    MiniGenerator(cfg, device="cpu").save(tmp_path / "gen")
    damage(tmp_path / "gen" / file)
    with pytest.raises(ModelFileError, match=words) as info:
        load_generator(tmp_path / "gen", device="cpu")
    assert f"{tmp_path / 'gen' / file}" in str(info.value) and "pretrain-base" in str(info.value)


# ------------------------------------------------------------------ params
def test_params_and_profiles_use_only_known_keys():
    from judge3d.core.profiles import load_profile

    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        load_profile(profile.stem, REPO / "profiles")  # raises naming the key if one is unknown
    assert load_params(REPO / "params.yaml") == PARAMS


def test_unknown_params_key_is_an_error_with_the_nearest_known_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace("render:\n", "render:\n  szie: 256\n", 1))
    with pytest.raises(ParamsError, match=r"'render\.szie' \(did you mean 'render\.size'\?\)"):
        load_params(path)


def test_duplicated_params_block_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT + "\nrender:\n  views: 9\n")
    with pytest.raises(ParamsError, match="key 'render' appears twice"):
        load_params(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("seed: 0\nrender:\n  views: 4\n  views: 9\n")
    with pytest.raises(ParamsError, match="key 'views' appears twice"):
        load_params(nested)


def test_too_many_views_for_the_montage_size_is_an_error_naming_the_keys():
    from judge3d.render.montage import MontageRenderer

    params = json.loads(json.dumps(PARAMS))
    params["render"]["views"] = 100
    with pytest.raises(ParamsError, match=r"12-px tiles.*lower render\.views or raise render\.size"):
        MontageRenderer.from_params(params)
