"""The mesh-level clear-gap control's degraded side (stage clear-gap-meshes)."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from judge3d.core.config import ParamsError
from judge3d.core.io import read_jsonl, write_jsonl
from judge3d.pipeline.clear_gap import PARTIAL, ClearGapSettings, corrupt_outputs
from judge3d.world.corruptions import corrupt_coarsen
from judge3d.world.voxel import voxelize

GEOMETRY = {"fscore_tau": 0.02, "n_surface_samples": 512, "iou_resolution": 16, "iou_supersample": 2,
            "reference_factor": 4}


def _params(corruption="coarsen", level=2, trained=("smooth", "holes", "missing", "speckle")):
    return {"seed": 0, "geometry": GEOMETRY, "judge_data": {"corruptions": list(trained)},
            "calibrate": {"clear_gap": {"source_set": "heldout_clean", "budget": "default",
                                        "corruption": corruption, "level": level}}}


def test_settings_refuse_a_corruption_the_judges_trained_on():
    assert ClearGapSettings.from_params(_params()).tag == "coarsen2"
    with pytest.raises(ParamsError, match="judges train on.*pick one of"):
        ClearGapSettings.from_params(_params(corruption="speckle"))
    with pytest.raises(ParamsError, match="corruption"):
        ClearGapSettings.from_params(_params(corruption="melt"))
    with pytest.raises(ParamsError, match="level"):
        ClearGapSettings.from_params(_params(level=4))


def _table():
    """A table: a top slab on four thin legs (thin parts are what coarsening loses)."""
    parts = [trimesh.creation.box((0.8, 0.8, 0.08), trimesh.transformations.translation_matrix((0, 0, 0.3)))]
    for x in (-0.35, 0.35):
        for y in (-0.35, 0.35):
            parts.append(trimesh.creation.box((0.05, 0.05, 0.6), trimesh.transformations.translation_matrix((x, y, -0.04))))
    return trimesh.util.concatenate(parts)


def test_coarsen_is_deterministic_and_loses_thin_parts():
    table = _table()
    blob = corrupt_coarsen(table, factor=4)
    again = corrupt_coarsen(table, factor=4)
    assert np.array_equal(blob.vertices, again.vertices) and np.array_equal(blob.faces, again.faces)
    assert len(blob.faces) > 0
    # the legs (5 % of the side) cannot survive blocks of 4/32 of the side: nothing reaches below the slab's block row
    assert blob.bounds[0, 2] > table.bounds[0, 2] + 0.2
    with pytest.raises(ValueError, match="divide"):
        corrupt_coarsen(table, factor=5)


def test_corrupt_outputs_writes_scored_copies_and_resumes(tmp_path):
    table = _table()
    (tmp_path / "gt").mkdir()
    world, rows = [], []
    for i in range(2):
        oid = f"heldout-{i:04d}-table"
        gt_path, vox_path = tmp_path / "gt" / f"{oid}.ply", tmp_path / "gt" / f"{oid}.npy"
        table.export(gt_path)
        np.save(vox_path, voxelize(table, GEOMETRY["iou_resolution"], GEOMETRY["iou_supersample"]))
        world.append({"object_id": oid, "voxel_path": str(vox_path)})
        for seed_index in (0, 1):
            cand = f"{oid}__clean__default__s{seed_index}"
            out = tmp_path / "gen" / f"{cand}.ply"
            out.parent.mkdir(exist_ok=True)
            table.export(out)  # a perfect "output": the corrupted copy must score lower
            rows.append({"object_id": oid, "budget": "default", "seed_index": seed_index, "seed": 7,
                         "candidate": cand, "mesh_path": str(out), "gt_mesh_path": str(gt_path),
                         "regime": "clean", "oracle_score": 1.0})
    write_jsonl(tmp_path / "gen" / "manifest.jsonl", rows)
    write_jsonl(tmp_path / "world.jsonl", world)
    out_dir = tmp_path / "clear_gap"
    got = corrupt_outputs(tmp_path / "gen" / "manifest.jsonl", tmp_path / "world.jsonl", out_dir, _params(), workers=1)
    assert [r["source_candidate"] for r in got] == [r["candidate"] for r in rows if r["seed_index"] == 0]
    assert all(r["candidate"] == r["source_candidate"] + "__coarsen2" for r in got)
    assert all(r["corruption"] == {"kind": "coarsen", "level": 2} and not r["empty"] for r in got)
    assert all(r["oracle_score"] < 0.9 for r in got)  # the oracle sees the lost legs too
    assert read_jsonl(out_dir / "manifest.jsonl") == got and not (out_dir / PARTIAL).exists()

    # killed after the first row: a rerun keeps it and does only the rest, to the same manifest
    before = (out_dir / "manifest.jsonl").read_bytes()
    (out_dir / "manifest.jsonl").unlink()
    write_jsonl(out_dir / PARTIAL, [dict(got[0], fscore=-1.0)])  # marked, so a recomputation would show
    again = corrupt_outputs(tmp_path / "gen" / "manifest.jsonl", tmp_path / "world.jsonl", out_dir, _params(), workers=1)
    assert again[0]["fscore"] == -1.0 and again[1] == got[1]
    write_jsonl(out_dir / "manifest.jsonl", [got[0], again[1]])
    assert (out_dir / "manifest.jsonl").read_bytes() == before
