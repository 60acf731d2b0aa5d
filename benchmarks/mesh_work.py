"""Per-mesh CPU work of the generate, judge-candidates and judge-eval stages, against baselines
measured in the same run.

1. Decode (occupancy grid -> marching-cubes mesh): the separable trilinear upsample and the cheap
   signed volume, against scipy's ``map_coordinates`` and trimesh's ``mesh.volume`` (the old code
   path, rebuilt here). Checks the meshes are identical.
2. Validity proxies: one sort of integer edge keys (``world.topology``), against trimesh's
   ``is_watertight`` / ``is_winding_consistent`` / ``face_adjacency`` components. Checks equality.
3. Whole mesh sets with 1 worker process (the baseline) and with ``--workers`` (default: the CPU
   count): ``generate_set`` on the held-out clean set, ``build_candidates`` on 8 judge objects, and
   ``render_manifest`` on 64 meshes. Checks the rows are identical.

Needs the built world and models/base (``dvc repro generate@heldout_clean``).

    PYTHONPATH=src python benchmarks/mesh_work.py [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

from judge3d.core.config import load_params
from judge3d.core.io import read_jsonl, write_jsonl
from judge3d.core.parallel import worker_count
from judge3d.world.geometry import load_mesh, validity
from judge3d.world.topology import edge_topology
from judge3d.world.voxel import LEVEL_SNAP, occupancy_to_mesh


def old_decode(grid: np.ndarray, level: float = 0.5, upsample: int = 2) -> trimesh.Trimesh:
    """The decode before this change: scipy map_coordinates and trimesh's full mass properties."""
    from scipy import ndimage
    from skimage import measure

    grid = np.asarray(grid, dtype=np.float64)
    resolution = grid.shape[0]
    padded = np.pad(grid, 1, mode="constant", constant_values=0.0)
    m = padded.shape[0]
    fine = np.arange((m - 1) * upsample + 1) / upsample
    field = ndimage.map_coordinates(padded, np.stack(np.meshgrid(fine, fine, fine, indexing="ij")),
                                    order=1, mode="nearest")
    field = np.where(np.abs(field - level) < LEVEL_SNAP, level + LEVEL_SNAP, field)
    verts, faces, _, _ = measure.marching_cubes(field, level=level, spacing=(1.0 / (resolution * upsample),) * 3,
                                                allow_degenerate=False)
    mesh = trimesh.Trimesh(verts - 0.5 - 0.5 / resolution, faces[:, ::-1], process=True)
    if mesh.is_watertight and mesh.volume < 0:
        mesh.invert()
    return mesh


def old_topology(mesh) -> tuple:
    topo = trimesh.Trimesh(vertices=np.nan_to_num(np.asarray(mesh.vertices)), faces=mesh.faces, process=False)
    components = len(trimesh.graph.connected_components(topo.face_adjacency, nodes=np.arange(len(topo.faces)),
                                                        min_len=1))
    return topo.is_watertight, topo.is_winding_consistent, components, len(topo.edges_unique)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def strip(rows, root) -> list[str]:
    return [json.dumps(r, sort_keys=True).replace(str(root), "<out>") for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=worker_count())
    args = ap.parse_args()
    params = load_params()
    world = read_jsonl("data/world/manifest.jsonl")
    print(f"{os.cpu_count()} CPUs; pool size {args.workers}\n")

    # 1. decode
    rng = np.random.default_rng(0)
    grids = [np.clip(np.load(r["voxel_path"]) + rng.normal(0, 0.1, (32,) * 3), 0, 1).astype(np.float32)
             for r in world[:48]]
    old, t_old = timed(lambda: [old_decode(g) for g in grids])
    new, t_new = timed(lambda: [occupancy_to_mesh(g) for g in grids])
    same = all(np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces) for a, b in zip(old, new))
    print(f"decode      {len(grids)} grids: old {1e3 * t_old / len(grids):6.1f} ms/mesh, "
          f"new {1e3 * t_new / len(grids):6.1f} ms/mesh  x{t_old / t_new:.2f}  identical meshes: {same}")

    # 2. validity topology
    meshes = new + [load_mesh(r["mesh_path"])[0] for r in world[:48]]
    old_t, t_old = timed(lambda: [old_topology(m) for m in meshes])
    new_t, t_new = timed(lambda: [edge_topology(m.faces, len(m.vertices)) for m in meshes])
    same = all(o == (n.watertight, n.winding_consistent, n.n_components, n.n_edges) for o, n in zip(old_t, new_t))
    _, t_val = timed(lambda: [validity(m) for m in meshes])
    print(f"topology    {len(meshes)} meshes: trimesh {1e3 * t_old / len(meshes):6.1f} ms/mesh, "
          f"edge keys {1e3 * t_new / len(meshes):6.1f} ms/mesh  x{t_old / t_new:.2f}  identical: {same}  "
          f"(whole validity(): {1e3 * t_val / len(meshes):.1f} ms/mesh)")

    # 3. whole sets, 1 worker vs the pool
    import torch

    from judge3d.generators import load_generator
    from judge3d.pipeline.mesh_sets import generate_set, plan_set
    from judge3d.judges.candidates import build_candidates
    from judge3d.render.batch import render_manifest

    torch.set_num_threads(2)
    gen = load_generator("models/base", device="cpu")
    jobs = plan_set(params, "heldout_clean", world, "data/degraded")
    judge_objects = sorted((r for r in world if r["split"] == "judge_train"), key=lambda r: r["object_id"])[:8]
    tmp = Path(tempfile.mkdtemp(prefix="mesh_work_"))
    try:
        results = {}
        # The pool first: an inline render opens an EGL context here, after which render_manifest
        # (rightly) refuses to fork renderers from this process.
        for workers in dict.fromkeys((args.workers, 1)):
            out = tmp / f"w{workers}"
            rows_g, t_g = timed(generate_set, gen, jobs, out / "gen", params, batch_size=32, set_name="bench",
                                workers=workers)
            rows_c, t_c = timed(build_candidates, "judge_train", judge_objects, [], out / "cand", params,
                                workers=workers)
            write_jsonl(out / "render_in.jsonl", [{"candidate": r["candidate"], "mesh_path": r["mesh_path"]}
                                                  for r in rows_g[:64]])
            os.environ["JUDGE3D_WORKERS"] = str(workers)  # render_manifest takes its pool size from here
            rows_r, t_r = timed(render_manifest, out / "render_in.jsonl", out / "montages", params)
            results[workers] = (strip(rows_g, out), strip(rows_c, out), strip(rows_r, out), t_g, t_c, t_r)
        base, pool = results[1], results[args.workers]
        for i, (name, n) in enumerate([("generate_set", len(jobs)), ("build_candidates", len(judge_objects)),
                                       ("render_manifest", 64)]):
            unit = "objects" if name == "build_candidates" else "meshes"
            print(f"{name:16s} {n:3d} {unit}: 1 worker {base[3 + i]:6.1f} s, {args.workers} workers "
                  f"{pool[3 + i]:6.1f} s  x{base[3 + i] / pool[3 + i]:.2f}  identical rows: {base[i] == pool[i]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
