"""world.images_dir: a user's images as the train / heldout inputs, with no ground truth, so no oracle.

The data stage's rows, its errors on a bad folder, the generate stage's scorer on a row without a
mesh, base / arm metrics, the report and verify on manifests without oracle values, and the mini
generator's refusal.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import trimesh
from PIL import Image

from judge3d.core.config import ParamsError, load_params
from judge3d.core.io import read_json, read_jsonl, write_jsonl
from judge3d.generators.base import MeshPayload
from judge3d.generators.pretrain import load_training_set
from judge3d.generators.stages import StageSampler
from judge3d.pipeline.mesh_sets import Budget, Job, _CandidateScorer
from judge3d.pipeline.verify import verify_repo
from judge3d.report.base_metrics import base_metrics
from judge3d.world.dataset import build_world, user_image_files
from judge3d.world.degrade import SEVERITIES
from judge3d.world.geometry import ORACLE_KEYS
from report_fixture import REPO, build_repo, run_stages


def _params(images_dir, alpha: bool = True) -> dict:
    params = load_params(REPO / "params.yaml")
    w = params["world"]
    w.update({"n_train": 2, "n_judge_train": 1, "n_judge_eval": 1, "n_heldout": 2, "voxel_resolution": 8,
              "voxel_supersample": 1, "images_dir": images_dir})
    w["image"].update({"size": 32, "alpha": alpha})
    return params


def _flat_render(mesh, size, azimuth_deg, elevation_deg, background, alpha=False):
    """A stand-in input-image renderer: the world builder only needs the right shape and dtype."""
    return np.full((size, size, 4 if alpha else 3), 200, dtype=np.uint8)


def _image(path, size=(40, 20), mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], len(mode)), dtype=np.uint8)
    pixels[..., 0] = 180
    if mode == "RGBA":
        pixels[4:-4, 4:-4, 3] = 255  # a cut-out: opaque object, transparent surround
    Image.fromarray(pixels, mode).save(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "mine"
    _image(root / "train" / "My Chair!.png")
    _image(root / "train" / "b.png")
    _image(root / "train" / "b.jpg", mode="RGB")     # same stem as b.png: made unique
    (root / "train" / "notes.txt").write_text("not an image")
    _image(root / "heldout" / "x.webp", size=(16, 30))
    return root


def _build(tmp_path, params):
    return build_world(params, tmp_path / "data" / "world", render_fn=_flat_render, root=tmp_path, progress=False)


def test_images_dir_gives_user_rows_and_procedural_judge_splits(tmp_path, images):
    rows = _build(tmp_path, _params(str(images)))
    assert [r["split"] for r in rows] == ["train"] * 3 + ["judge_train", "judge_eval", "heldout"]
    user = [r for r in rows if r["split"] in ("train", "heldout")]
    assert [r["object_id"] for r in user] == ["train-My_Chair", "train-b", "train-b-2", "heldout-x"]
    assert [r["source"] for r in user] == ["train/My Chair!.png", "train/b.jpg", "train/b.png", "heldout/x.webp"]
    for r in user:
        assert (r["category"], r["mesh_path"], r["voxel_path"], r["oracle"]) == ("user", None, None, False)
        assert r["image_path"] == f"data/world/images/{r['object_id']}.png"
        with Image.open(tmp_path / r["image_path"]) as im:  # normalized to the world's input format
            assert (im.mode, im.size) == ("RGBA", (32, 32))
    # a 40x20 cut-out, centred on a square canvas: the padding is transparent
    alpha = np.asarray(Image.open(tmp_path / user[0]["image_path"]))[..., 3]
    assert alpha[0].max() == 0 and alpha[16].max() == 255
    # the judge splits are the procedural world's own objects, with their ground truth
    procedural = _build(tmp_path / "procedural", _params(None))
    judge = [r for r in rows if r["split"] in ("judge_train", "judge_eval")]
    assert judge == [r for r in procedural if r["split"] in ("judge_train", "judge_eval")]
    assert all(r["mesh_path"] and r["voxel_path"] and "oracle" not in r for r in procedural)
    assert read_jsonl(tmp_path / "data/world/manifest.jsonl") == rows


def test_rgb_world_composites_user_cutouts_over_the_background(tmp_path, images):
    rows = _build(tmp_path, _params(str(images), alpha=False))
    with Image.open(tmp_path / rows[0]["image_path"]) as im:
        pixels = np.asarray(im)
    assert im.mode == "RGB" and tuple(pixels[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("breakage, message", [
    ("no_folder", "no folder"), ("no_heldout", "heldout not found"), ("empty_train", "holds no images"),
    ("bad_value", "must be null or a folder path")])
def test_bad_images_dir_names_the_path_and_the_fix(tmp_path, images, breakage, message):
    target = str(images)
    if breakage == "no_folder":
        target = str(tmp_path / "nowhere")
    elif breakage == "no_heldout":
        (images / "heldout" / "x.webp").unlink()
        (images / "heldout").rmdir()
    elif breakage == "empty_train":
        for p in (images / "train").iterdir():
            p.unlink()
    error = ParamsError if breakage == "bad_value" else (FileNotFoundError, ValueError)
    with pytest.raises(error, match=message) as info:
        _build(tmp_path, _params(7 if breakage == "bad_value" else target))
    if breakage == "no_folder":
        assert "nowhere" in str(info.value) and "null" in str(info.value)
    elif breakage != "bad_value":
        assert str(images) in str(info.value)


def test_unreadable_image_is_named(tmp_path, images):
    (images / "heldout" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png is not a readable image.*replace or remove"):
        _build(tmp_path, _params(str(images)))


def test_relative_images_dir_is_read_from_the_repo_root(tmp_path, images):
    assert user_image_files("mine", tmp_path)["heldout"] == [images / "heldout" / "x.webp"]


def _job(tmp_path, mesh_path_gt, voxel_path_gt):
    budget = Budget("default", {"flow": StageSampler(steps=2)})
    return Job("heldout-x", "user", "heldout", "clean", budget, 0, 123, "data/world/images/heldout-x.png",
               mesh_path_gt, voxel_path_gt)


def test_scorer_writes_null_oracle_fields_for_a_row_without_ground_truth(tmp_path):
    params = load_params(REPO / "params.yaml")
    score = _CandidateScorer(tmp_path, params, "heldout_clean", {})
    box = trimesh.creation.box(extents=(0.5, 0.4, 0.3))
    latents = {"flow": np.zeros((2, 2), dtype=np.float32)}
    row = score((_job(tmp_path, None, None), MeshPayload.of(box), latents))
    assert all(row[k] is None for k in ORACLE_KEYS)
    assert row["oracle"] is False and row["gt_mesh_path"] is None and row["empty"] is False
    assert row["validity"]["watertight"] is True       # ground-truth-free proxies are still measured
    # with ground truth the same mesh gets numbers, and no 'oracle' marker (procedural rows unchanged)
    box.export(tmp_path / "gt.ply")
    from judge3d.world.voxel import voxelize
    np.save(tmp_path / "gt.npy", voxelize(box, 32, 2))
    scored = _CandidateScorer(tmp_path, params, "heldout_clean", {})(
        (_job(tmp_path, str(tmp_path / "gt.ply"), str(tmp_path / "gt.npy")), MeshPayload.of(box), latents))
    assert "oracle" not in scored and scored["fscore"] > 0.9


def _generated(tmp_path, missing: set[str]):
    """Held-out manifests of 4 objects; objects in ``missing`` have null oracle values (a user's images)."""
    root = tmp_path / "generated"
    for name in ["clean", *SEVERITIES]:
        rows = []
        for i in range(4):
            oid = f"heldout-o{i}"
            for budget in (("high", "default", "low") if name == "clean" else ("default",)):
                q = 0.3 + 0.1 * i + {"high": 0.2, "default": 0.1, "low": 0.0}[budget]
                row = {"object_id": oid, "budget": budget, "seed_index": 0, "empty": False, "fscore": q, "iou": q}
                if oid in missing:
                    row.update({"fscore": None, "iou": None, "oracle": False})
                rows.append(row)
        write_jsonl(root / f"heldout_{name}" / "manifest.jsonl", rows)
    return root


def test_base_metrics_leave_out_and_count_missing_oracle_values(tmp_path):
    none = base_metrics(_generated(tmp_path / "a", {f"heldout-o{i}" for i in range(4)}))
    clean = none["clean"]["default"]["fscore"]
    assert (clean["mean"], clean["ci95"], clean["n_missing"]) == (None, [None, None], 4)
    gap = none["gap_high_minus_low"]["iou"]
    assert (gap["mean"], gap["clear"], gap["n_missing"]) == (None, None, 4)
    assert none["fscore_falls_with_severity"] is None and none["no_oracle"]["n_rows"] == 12
    half = base_metrics(_generated(tmp_path / "b", {"heldout-o0", "heldout-o1"}))
    assert half["clean"]["high"]["fscore"]["mean"] == pytest.approx((0.7 + 0.8) / 2)
    assert half["clean"]["high"]["fscore"]["n_missing"] == 2
    assert half["gap_high_minus_low"]["fscore"]["mean"] == pytest.approx(0.2)
    full = base_metrics(_generated(tmp_path / "c", set()))
    assert "n_missing" not in full["clean"]["high"]["fscore"] and "no_oracle" not in full


@pytest.fixture(scope="module")
def no_oracle_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_oracle") / "repo"
    params = build_repo(root, arm_gain={"repair_severe": 0.3}, oracle=False)
    run_stages(root, params)
    return root, params


def test_arm_metrics_and_calibration_report_absent_oracle(no_oracle_repo):
    root, params = no_oracle_repo
    for arm in params["arms"]:
        m = read_json(root / f"metrics/arms/{arm}.json")
        assert m["n_no_oracle"] == m["n_manifest"] > 0
        assert m["geom"]["score"]["delta"] is None and m["geom"]["score"]["n_missing"] == m["n_manifest"]
        assert m["oracle_win"]["rate"] is None and m["oracle_win"]["n_missing"] == m["n_manifest"]
        assert m["judge_oracle_agreement"] is None and m["n"] > 0  # the judge's own numbers remain
    cal = read_json(root / "metrics/calibration.json")
    assert cal["judge_oracle_agreement"] is None and cal["flip_vs_gap"]["correlation"]["r"] is None


def test_report_says_there_is_no_oracle(no_oracle_repo):
    root, _ = no_oracle_repo
    study = (root / "reports/study_table.md").read_text()
    assert "**NO ORACLE**: the held-out inputs are a user's images (world.images_dir)" in study
    assert "n/a [n/a] (6 missing)" in study and "n/a (6 missing)" in study
    assert "**NO ORACLE**" in (root / "reports/severity_table.md").read_text()
    html = (root / "reports/report.html").read_text()
    assert html.count("<strong>NO ORACLE</strong>") >= 2   # page top and the study table
    assert verify_repo(root) == []


def test_mini_generator_refuses_user_images(tmp_path, images):
    params = _params(str(images), alpha=False)
    params["world"]["n_judge_train"] = params["world"]["n_judge_eval"] = 0
    _build(tmp_path, params)
    with pytest.raises(ValueError, match="base.backend: trellis"):
        load_training_set(tmp_path / "data/world/manifest.jsonl", 8)


def test_params_yaml_default_is_the_procedural_world():
    params = load_params(REPO / "params.yaml")
    assert params["world"]["images_dir"] is None
    old = copy.deepcopy(params)
    del old["world"]["images_dir"]  # a params file from before the key: still procedural
    from judge3d.world.dataset import WorldConfig
    assert WorldConfig.from_params(old) == WorldConfig.from_params(params)
