"""The tiny judges' pretraining candidates: per object, the ground truth, seeded corruptions of it
(noise, smoothing, holes, missing parts, voxel speckle) and base-generator samples at several
budgets, all scored by the same ground-truth oracle (``oracle_score``) that the rest of the study uses.
With ``judge_data.decode_like_generator``, ground truth and corruptions are voxelized and decoded by
marching cubes as the generator's outputs are, so surface style carries no label.

Only the judges' own object splits (judge_train / judge_eval) are used, never train or heldout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from judge3d.core.config import require
from judge3d.core.io import JsonlAppender, read_jsonl, write_jsonl
from judge3d.world.corruptions import CORRUPTIONS, make_corruptions

PARTIAL = ".partial.jsonl"


def corruption_settings(params: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    kinds = require(params, "judge_data.corruptions", list,
                    check=lambda v: len(v) > 0 and all(k in CORRUPTIONS for k in v),
                    hint=f"a non-empty list of {sorted(CORRUPTIONS)}")
    levels = require(params, "judge_data.levels", list,
                     check=lambda v: len(v) > 0 and all(isinstance(x, int) and 1 <= x <= 3 for x in v),
                     hint="corruption levels 1 (mild) .. 3 (strong)")
    return kinds, levels


def decode_setting(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """(resolution, supersample) when ground truth and its corruptions go through the generator's
    voxel decode (``judge_data.decode_like_generator``), else None."""
    if not require(params, "judge_data.decode_like_generator", bool):
        return None
    return (require(params, "world.voxel_resolution", int, check=lambda v: v >= 4),
            require(params, "world.voxel_supersample", int, check=lambda v: v >= 1))


def build_candidates(split: str, world_rows: Sequence[dict[str, Any]], generated_rows: Sequence[dict[str, Any]],
                     out_dir: str | Path, params: Mapping[str, Any], workers: int | None = None) -> list[dict[str, Any]]:
    """Write ``out_dir/<candidate>.ply`` for GT + corruptions and ``out_dir/manifest.jsonl`` (all candidates).

    Objects are processed in ``workers`` processes (:mod:`judge3d.core.parallel`); the rows do not
    depend on the worker count. Resumable: objects whose rows are all in ``out_dir/.partial.jsonl``
    are kept.
    """
    from judge3d.core.parallel import ordered_map

    kinds, levels = corruption_settings(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = sorted((r for r in world_rows if r["split"] == split), key=lambda r: r["object_id"])
    if not objects:
        raise ValueError(f"the world has no objects of split {split!r} (params world.n_{split})")
    user = [o["object_id"] for o in objects if o.get("mesh_path") is None]
    if user:
        raise ValueError(f"split {split!r} holds a user's images (world.images_dir; e.g. {user[0]}) with no "
                         "ground-truth mesh; the judges' pretraining candidates need procedural objects: set "
                         "judges.train.objects_split / judges.eval.objects_split to judge_train / judge_eval.")
    partial = out_dir / PARTIAL
    done = {r["candidate"]: r for r in read_jsonl(partial)} if partial.exists() else {}
    names = {o["object_id"]: candidate_names(o["object_id"], kinds, levels) for o in objects}
    todo = [o for o in objects if not all(n in done for n in names[o["object_id"]])]
    make = _ObjectCandidates(split, out_dir, params)
    with JsonlAppender(partial) as sink:
        results = ordered_map(make, todo, workers)
        for rows in tqdm(results, desc=f"judge candidates {split}", unit="object",
                         initial=len(objects) - len(todo), total=len(objects)):
            for row in rows:
                sink.append(row)
                done[row["candidate"]] = row
    rows = [done[n] for o in objects for n in names[o["object_id"]]]
    for g in generated_rows:
        if g["split"] != split:
            raise ValueError(f"generated candidate {g['candidate']} is of split {g['split']}, not {split}")
        rows.append({**g, "source": f"generator:{g['budget']}"})
    write_jsonl(out_dir / "manifest.jsonl", rows)
    partial.unlink(missing_ok=True)
    return rows


def candidate_names(object_id: str, kinds: Sequence[str], levels: Sequence[int]) -> list[str]:
    return [f"{object_id}__gt"] + [f"{object_id}__{k}{lv}" for k in kinds for lv in levels]


class _ObjectCandidates:
    """One object's ground truth and corruptions: made, decoded, saved and scored (one worker task)."""

    def __init__(self, split: str, out_dir: Path, params: Mapping[str, Any]):
        from judge3d.world.geometry import GeometryConfig

        self.split, self.out_dir = split, out_dir
        self.kinds, self.levels = corruption_settings(params)
        self.decode = decode_setting(params)
        self.seed = require(params, "seed", int)
        self.geometry = GeometryConfig.from_params(params)

    def __call__(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        from judge3d.world.geometry import load_mesh, oracle_metrics, prepare_ground_truth, validity
        from judge3d.world.voxel import occupancy_to_mesh, voxelize

        gt, flags = load_mesh(obj["mesh_path"])
        if gt is None:
            raise ValueError(f"ground-truth mesh {obj['mesh_path']} unusable ({flags}); rerun data")
        gt_voxels = np.load(obj["voxel_path"])
        ref = prepare_ground_truth(gt, gt_voxels, params=self.geometry, source=obj["mesh_path"])
        meshes = [("gt", 0, gt)] + [(cid.split(":")[1], int(cid.split(":")[2]), m) for cid, m in
                                    make_corruptions(gt, obj["object_id"], self.kinds, self.levels, self.seed)]
        if self.decode is not None:
            # Rendered like a generator output (voxel grid -> marching cubes), so a judge cannot
            # tell ground truth from generated by its crisp primitive edges alone. The world's
            # voxel file is the ground truth's grid at these settings (data stage).
            def grid(kind, mesh):
                return gt_voxels if kind == "gt" and gt_voxels.shape == (self.decode[0],) * 3 else voxelize(mesh, *self.decode)

            meshes = [(kind, level, mesh if mesh.metadata.get("level_set") else occupancy_to_mesh(grid(kind, mesh)))
                      for kind, level, mesh in meshes]
        names = candidate_names(obj["object_id"], self.kinds, self.levels)
        if len(names) != len(meshes):
            raise RuntimeError(f"{obj['object_id']}: {len(meshes)} candidate meshes for {len(names)} names")
        rows = []
        for name, (kind, level, mesh) in zip(names, meshes):
            mesh_path = self.out_dir / f"{name}.ply"
            mesh.export(mesh_path)
            rows.append({"object_id": obj["object_id"], "category": obj["category"], "split": self.split,
                         "candidate": name, "source": "ground_truth" if kind == "gt" else f"corruption:{kind}",
                         "level": level, "mesh_path": mesh_path.as_posix(),
                         **oracle_metrics(mesh, ref, params=self.geometry), "validity": validity(mesh)})
        return rows
