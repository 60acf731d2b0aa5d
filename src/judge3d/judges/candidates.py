"""The tiny judges' pretraining candidates: per object, the ground truth, seeded corruptions of it
(noise, smoothing, holes, missing parts) and base-generator samples at several budgets, all scored
by the same ground-truth oracle (``oracle_score``) that the rest of the study uses.

Only the judges' own object splits (judge_train / judge_eval) are used, never train or heldout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from judge3d.config import require
from judge3d.io import JsonlAppender, read_jsonl, write_jsonl
from judge3d.judges.pairs import CORRUPTIONS, make_corruptions

PARTIAL = ".partial.jsonl"


def corruption_settings(params: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    kinds = require(params, "judge_data.corruptions", list,
                    check=lambda v: len(v) > 0 and all(k in CORRUPTIONS for k in v),
                    hint=f"a non-empty list of {sorted(CORRUPTIONS)}")
    levels = require(params, "judge_data.levels", list,
                     check=lambda v: len(v) > 0 and all(isinstance(x, int) and 1 <= x <= 3 for x in v),
                     hint="corruption levels 1 (mild) .. 3 (strong)")
    return kinds, levels


def build_candidates(split: str, world_rows: Sequence[dict[str, Any]], generated_rows: Sequence[dict[str, Any]],
                     out_dir: str | Path, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write ``out_dir/<candidate>.ply`` for GT + corruptions and ``out_dir/manifest.jsonl`` (all candidates).

    Resumable: rows already in ``out_dir/.partial.jsonl`` are kept.
    """
    from judge3d.world.geometry import load_mesh, oracle_metrics, prepare_ground_truth, validity

    kinds, levels = corruption_settings(params)
    seed = require(params, "seed", int)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = sorted((r for r in world_rows if r["split"] == split), key=lambda r: r["object_id"])
    if not objects:
        raise ValueError(f"the world has no objects of split {split!r} (params world.n_{split})")
    partial = out_dir / PARTIAL
    done = {r["candidate"]: r for r in read_jsonl(partial)} if partial.exists() else {}
    rows: list[dict[str, Any]] = []
    with JsonlAppender(partial) as sink:
        for obj in tqdm(objects, desc=f"judge candidates {split}", unit="object"):
            names = [f"{obj['object_id']}__gt"] + [f"{obj['object_id']}__{k}{lv}" for k in kinds for lv in levels]
            if all(n in done for n in names):
                rows.extend(done[n] for n in names)
                continue
            gt, flags = load_mesh(obj["mesh_path"])
            if gt is None:
                raise ValueError(f"ground-truth mesh {obj['mesh_path']} unusable ({flags}); rerun data")
            ref = prepare_ground_truth(gt, np.load(obj["voxel_path"]), params=params)
            meshes = [("gt", 0, gt)] + [(cid.split(":")[1], int(cid.split(":")[2]), m)
                                        for cid, m in make_corruptions(gt, obj["object_id"], kinds, levels, seed)]
            for name, (kind, level, mesh) in zip(names, meshes):
                if name in done:
                    rows.append(done[name])
                    continue
                mesh_path = out_dir / f"{name}.ply"
                mesh.export(mesh_path)
                row = {"object_id": obj["object_id"], "category": obj["category"], "split": split,
                       "candidate": name, "source": "ground_truth" if kind == "gt" else f"corruption:{kind}",
                       "level": level, "mesh_path": mesh_path.as_posix(),
                       **oracle_metrics(mesh, ref, params=params), "validity": validity(mesh)}
                sink.append(row)
                done[name] = row
                rows.append(row)
    for g in generated_rows:
        if g["split"] != split:
            raise ValueError(f"generated candidate {g['candidate']} is of split {g['split']}, not {split}")
        rows.append({**g, "source": f"generator:{g['budget']}"})
    write_jsonl(out_dir / "manifest.jsonl", rows)
    partial.unlink(missing_ok=True)
    return rows
