"""The mesh-level clear-gap control's degraded side (stage `clear-gap-meshes`).

The study's clear-gap control is "clean vs. deliberately degraded": the evaluation judge must prefer
a base output to *the same output* made visibly worse, at a strict win of at least
``calibrate.thresholds.clear_gap_min_strict``. The degradation (``calibrate.clear_gap``) must be
one the tiny judges never trained on (``judge_data.corruptions``), so the control measures whether
a judge sees a defect, not whether it recognises one of its training corruptions. It must also be
visible without the input image, since the judge is reference-free.

Each source row (the ``budget`` outputs of ``source_set`` at seed index 0) gets one corrupted copy,
scored by the same oracle as every generated mesh; the row keeps ``source_candidate`` so the pair
builder finds its clean side. Resumable through ``<out_dir>/.partial.jsonl``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from judge3d.core.config import ParamsError, require
from judge3d.core.io import JsonlAppender, read_jsonl, write_jsonl
from judge3d.core.seeding import derive_seed
from judge3d.world.corruptions import CORRUPTIONS

PARTIAL = ".partial.jsonl"


@dataclass(frozen=True)
class ClearGapSettings:
    source_set: str       # a generate.sets key: the clean outputs to degrade (its manifest under data/generated)
    budget: str           # which of its budgets (seed index 0 of each object)
    corruption: str       # a judge3d.world.corruptions.CORRUPTIONS kind
    level: int            # 1 (mild) .. 3 (strong)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ClearGapSettings":
        block = "calibrate.clear_gap"
        corruption = require(params, f"{block}.corruption", str, check=lambda v: v in CORRUPTIONS,
                             hint=f"one of {sorted(CORRUPTIONS)}, and not one of judge_data.corruptions.")
        trained_on = params.get("judge_data", {}).get("corruptions") or []
        if corruption in trained_on:
            raise ParamsError(f"params.yaml: calibrate.clear_gap.corruption {corruption!r} is one the tiny judges "
                              f"train on (judge_data.corruptions = {trained_on}); the clear-gap control needs a "
                              f"defect they never saw: pick one of {sorted(set(CORRUPTIONS) - set(trained_on))}.")
        return cls(source_set=require(params, f"{block}.source_set", str, check=lambda v: bool(v.strip())),
                   budget=require(params, f"{block}.budget", str, check=lambda v: bool(v.strip())),
                   corruption=corruption,
                   level=require(params, f"{block}.level", int, check=lambda v: 1 <= v <= 3,
                                 hint="1 (mild) to 3 (strong)."))

    @property
    def tag(self) -> str:
        return f"{self.corruption}{self.level}"


def source_rows(rows: Sequence[dict[str, Any]], settings: ClearGapSettings, source: str) -> list[dict[str, Any]]:
    """The rows to degrade: ``settings.budget`` at seed index 0, one per object, in object order."""
    picked = {}
    for row in rows:
        if row.get("budget") == settings.budget and int(row.get("seed_index", 0)) == 0:
            if row["object_id"] in picked:
                raise ValueError(f"{source}: two '{settings.budget}' rows at seed index 0 for {row['object_id']}.")
            picked[row["object_id"]] = row
    if not picked:
        raise ValueError(f"{source}: no '{settings.budget}' rows at seed index 0; check calibrate.clear_gap.budget "
                         f"and generate.sets.{settings.source_set}.")
    return [picked[k] for k in sorted(picked)]


class _Corrupter:
    """Corrupt one clean output, save it and score it against its ground truth (picklable: runs in the
    process pool)."""

    def __init__(self, out_dir: Path, params: Mapping[str, Any], settings: ClearGapSettings,
                 gt_voxels: Mapping[str, str]):
        from judge3d.world.geometry import GeometryConfig

        self.out_dir, self.settings, self.gt_voxels = out_dir, settings, dict(gt_voxels)
        self.geometry = GeometryConfig.from_params(params)
        self.seed = require(params, "seed", int)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from judge3d.world.geometry import load_mesh, no_oracle_metrics, oracle_metrics, prepare_ground_truth, validity
        from judge3d.world.voxel import voxelize

        s = self.settings
        candidate = f"{row['candidate']}__{s.tag}"
        mesh_path = self.out_dir / f"{candidate}.ply"
        clean, flags = load_mesh(row["mesh_path"])
        mesh = None
        if clean is not None:  # an empty or broken clean output has nothing to corrupt: flagged, never scored up
            mesh = CORRUPTIONS[s.corruption](clean, s.level, derive_seed(self.seed, "clear-gap", row["candidate"]))
            if len(mesh.faces) == 0:
                mesh = None
        empty = mesh is None
        pred_flags = {"empty": empty, "nan": bool(flags.get("nan"))}
        pred_voxels = None
        if empty:
            mesh_path.unlink(missing_ok=True)
        else:
            mesh.export(mesh_path)
            pred_voxels = voxelize(mesh, self.geometry.iou_resolution, self.geometry.iou_supersample)
        if row.get("gt_mesh_path") is None:  # a user's image: the degradation is known by construction, no oracle
            metrics = no_oracle_metrics(mesh, pred_flags)
        else:
            gt_mesh, gt_flags = load_mesh(row["gt_mesh_path"])
            if gt_mesh is None:
                raise ValueError(f"ground-truth mesh {row['gt_mesh_path']} unusable ({gt_flags}); rerun data")
            ref = prepare_ground_truth(gt_mesh, np.load(self.gt_voxels[row["object_id"]]), params=self.geometry,
                                       source=row["gt_mesh_path"])
            metrics = oracle_metrics(mesh, ref, params=self.geometry, pred_flags=pred_flags, pred_voxels=pred_voxels)
        out = {"object_id": row["object_id"], "category": row.get("category"), "split": row.get("split"),
               "regime": row.get("regime"), "budget": row["budget"], "seed": row.get("seed"),
               "seed_index": row.get("seed_index"), "candidate": candidate, "source_candidate": row["candidate"],
               "corruption": {"kind": s.corruption, "level": s.level},
               "input_image_path": row.get("input_image_path"), "mesh_path": mesh_path.as_posix(),
               "gt_mesh_path": row.get("gt_mesh_path"), "set": "clear_gap", **metrics, "empty": empty,
               "validity": validity(mesh)}
        if row.get("gt_mesh_path") is None:
            out["oracle"] = False
        return out


def corrupt_outputs(source_manifest: str | Path, world_manifest: str | Path, out_dir: str | Path,
                    params: Mapping[str, Any], workers: int | None = None) -> list[dict[str, Any]]:
    """Write ``<out_dir>/<candidate>.ply`` and ``manifest.jsonl`` for every source row; returns the rows."""
    from judge3d.core.parallel import ordered_map

    settings = ClearGapSettings.from_params(params)
    rows = source_rows(read_jsonl(source_manifest), settings, str(source_manifest))
    gt_voxels = {r["object_id"]: r.get("voxel_path") for r in read_jsonl(world_manifest)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / PARTIAL
    done = {r["source_candidate"]: r for r in read_jsonl(partial)} if partial.exists() else {}
    todo = [r for r in rows if r["candidate"] not in done]
    t0 = time.time()
    work = _Corrupter(out_dir, params, settings, gt_voxels)
    with JsonlAppender(partial) as sink, tqdm(total=len(rows), initial=len(rows) - len(todo),
                                              desc=f"clear-gap meshes ({settings.tag})") as bar:
        for out in ordered_map(work, todo, workers):
            sink.append(out)
            done[out["source_candidate"]] = out
            bar.update(1)
    result = [done[r["candidate"]] for r in rows]
    write_jsonl(out_dir / "manifest.jsonl", result)
    partial.unlink(missing_ok=True)
    print(f"clear-gap meshes: {len(todo)} corrupted ({settings.tag}) in {time.time() - t0:.1f} s "
          f"({len(rows) - len(todo)} resumed)")
    return result
