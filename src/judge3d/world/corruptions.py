"""Training data for the tiny judges: labelled montage pairs, and seeded mesh corruptions.

Candidates are rows ``{object_id, montage_path, oracle_score, candidate?, source?}`` (higher oracle
score = better mesh). Pairs are built within one object only. A pair whose oracle gap is below
``margin`` is a near-tie: never a training label, kept apart as a "near" evaluation pair (where a
good judge should be unsure). Pairs at or above ``clear_gap`` are "clear"; between the two, "mild".

The corruption functions make extra candidates from a ground-truth mesh (noise, smoothing, holes,
missing parts, voxel speckle, voxel coarsening); each is deterministic in its seed and never edits its input.
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from judge3d.core.seeding import derive_seed, rng

PAIR_KINDS = ("clear", "mild", "near")


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------
def _check_candidates(candidates: Sequence[dict[str, Any]]) -> None:
    seen = set()
    for i, row in enumerate(candidates):
        for key in ("object_id", "montage_path", "oracle_score"):
            if row.get(key) is None:
                raise ValueError(f"candidate row {i} ({row.get('candidate', '?')}) has no {key!r}; the candidate "
                                 "manifest needs object_id, montage_path and oracle_score (render + oracle stages).")
        score = row["oracle_score"]
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"candidate row {i} ({row.get('candidate', row['montage_path'])}): oracle_score "
                             f"{score!r} is not a finite number; fix or drop the row (an empty/corrupt mesh "
                             "should get the oracle's worst score, not NaN).")
        key = (row["object_id"], row["montage_path"])
        if key in seen:
            raise ValueError(f"candidate montage {row['montage_path']} listed twice for object {row['object_id']}.")
        seen.add(key)


def build_pairs(candidates: Sequence[dict[str, Any]], *, margin: float, clear_gap: float,
                max_pairs_per_object: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """All within-object pairs, labelled by the oracle: rows ``{pair_id, object_id, better, worse,
    better_score, worse_score, gap, kind}`` with kind 'clear' (gap >= clear_gap), 'mild' (margin <= gap
    < clear_gap) or 'near' (gap < margin: a near-tie, for evaluation only, never a label).

    ``max_pairs_per_object`` caps each kind per object by a seeded draw (objects with many
    candidates would otherwise dominate).
    """
    if not (0 <= margin <= clear_gap):
        raise ValueError(f"need 0 <= margin <= clear_gap, got margin={margin}, clear_gap={clear_gap}")
    _check_candidates(candidates)
    by_object: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in candidates:
        by_object[str(row["object_id"])].append(row)
    out: list[dict[str, Any]] = []
    for object_id in sorted(by_object):
        rows = sorted(by_object[object_id], key=lambda r: r["montage_path"])
        kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a, b in combinations(rows, 2):
            if a["oracle_score"] == b["oracle_score"]:
                better, worse = a, b
            else:
                better, worse = (a, b) if a["oracle_score"] > b["oracle_score"] else (b, a)
            gap = float(better["oracle_score"] - worse["oracle_score"])
            kind = "near" if gap < margin else ("clear" if gap >= clear_gap else "mild")
            kinds[kind].append({
                "object_id": object_id, "better": better["montage_path"], "worse": worse["montage_path"],
                "better_candidate": better.get("candidate"), "worse_candidate": worse.get("candidate"),
                "better_score": float(better["oracle_score"]), "worse_score": float(worse["oracle_score"]),
                "gap": gap, "kind": kind})
        for kind in PAIR_KINDS:
            chosen = kinds[kind]
            if max_pairs_per_object is not None and len(chosen) > max_pairs_per_object:
                pick = rng(seed, "pairs-cap", object_id, kind).choice(len(chosen), max_pairs_per_object,
                                                                       replace=False)
                chosen = [chosen[i] for i in sorted(pick)]
            for j, row in enumerate(chosen):
                row["pair_id"] = f"{object_id}:{kind}:{j:04d}"
                out.append(row)
    return out


def split_objects(object_ids: Iterable[str], heldout_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) object ids: a seeded split, at least one object on each side."""
    ids = sorted(set(map(str, object_ids)))
    if len(ids) < 2:
        raise ValueError(f"need >= 2 objects to hold some out for the judge's evaluation, got {len(ids)}.")
    if not (0.0 < heldout_frac < 1.0):
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    order = rng(seed, "judge-object-split").permutation(len(ids))
    n_held = min(len(ids) - 1, max(1, round(heldout_frac * len(ids))))
    held = sorted(ids[i] for i in order[:n_held])
    return sorted(set(ids) - set(held)), held


# --------------------------------------------------------------------------------------------
# mesh corruptions (extra candidates from a ground-truth mesh)
# --------------------------------------------------------------------------------------------
def _mesh(vertices, faces):
    import trimesh

    return trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=False)


def _subdivided(mesh, max_edge: float):
    """Primitive furniture has few, long triangles; subdivide so local corruptions stay local."""
    import trimesh

    v, f = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=max_edge, max_iter=8)
    return _mesh(v, f)


def corrupt_noise(mesh, sigma: float, seed: int, max_edge: float = 0.04):
    """Gaussian displacement of every vertex along its normal, sigma in canonical units."""
    m = _subdivided(mesh, max_edge)
    m.merge_vertices()
    offsets = rng(seed, "noise").normal(0.0, sigma, size=len(m.vertices))
    return _mesh(m.vertices + m.vertex_normals * offsets[:, None], m.faces)


def corrupt_smooth(mesh, iterations: int, seed: int = 0, max_edge: float = 0.04):
    """Laplacian smoothing: rounds edges and thins parts (the 'blobby' failure). ``seed`` is unused."""
    import trimesh

    m = _subdivided(mesh, max_edge)
    m.merge_vertices()
    trimesh.smoothing.filter_laplacian(m, lamb=0.5, iterations=int(iterations))
    return _mesh(m.vertices, m.faces)


def corrupt_holes(mesh, n_holes: int, radius: float, seed: int, max_edge: float = 0.03):
    """Remove the faces within ``radius`` of ``n_holes`` random surface points (open holes)."""
    m = _subdivided(mesh, max_edge)
    g = rng(seed, "holes")
    centres = m.triangles_center[g.choice(len(m.faces), size=int(n_holes), replace=False)]
    d = np.linalg.norm(m.triangles_center[:, None, :] - centres[None, :, :], axis=-1).min(axis=1)
    keep = d > radius
    return _mesh(m.vertices, m.faces[keep])


def corrupt_missing_part(mesh, seed: int, n_parts: int = 1, fraction: float = 0.3):
    """Drop ``n_parts`` bodies (legs, shelves...) of a multi-body mesh, never the largest one; a one-body
    mesh loses a slab of ``fraction`` of its extent along a random axis instead."""
    import trimesh

    bodies = mesh.split(only_watertight=False)
    g = rng(seed, "missing-part")
    if len(bodies) > 1:
        largest = int(np.argmax([b.area for b in bodies]))
        others = [i for i in range(len(bodies)) if i != largest]
        drop = set(g.choice(others, size=min(int(n_parts), len(others)), replace=False).tolist())
        return trimesh.util.concatenate([b for i, b in enumerate(bodies) if i not in drop])
    axis = int(g.integers(3))
    lo, hi = mesh.bounds[:, axis]
    keep = mesh.triangles_center[:, axis] < hi - fraction * (hi - lo)
    return _mesh(mesh.vertices, mesh.faces[keep])


def corrupt_speckle(mesh, flip_prob: float, seed: int, resolution: int = 32):
    """Voxel speckle: the shape's occupancy grid with each voxel of its bounding box (one voxel of
    margin) flipped with ``flip_prob``, decoded by marching cubes. This is what a generator's
    decoder makes of an occupancy that is still partly noise (too few steps, a diverged
    adapter): floaters around the object and pits in it."""
    from judge3d.world.voxel import occupancy_to_mesh, voxelize

    occ = voxelize(mesh, resolution, 2) >= 0.5
    filled = np.argwhere(occ)
    if not len(filled):
        return _mesh(mesh.vertices, mesh.faces)
    lo = np.maximum(filled.min(axis=0) - 1, 0)
    hi = np.minimum(filled.max(axis=0) + 2, resolution)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    flips = rng(seed, "speckle").random(occ[box].shape) < flip_prob
    occ[box] ^= flips
    return occupancy_to_mesh(occ.astype(np.float32))


def corrupt_coarsen(mesh, factor: int, seed: int = 0, resolution: int = 32):
    """Voxel blob: the shape's occupancy grid averaged over blocks of ``factor``^3 voxels, each block
    kept where at least half of it is filled, and decoded by marching cubes at the full resolution.
    Thin parts vanish or swell into blocks, as a generator that lost its fine detail would make them.
    ``seed`` is unused (the corruption is deterministic)."""
    from judge3d.world.voxel import occupancy_to_mesh, voxelize

    if resolution % factor:
        raise ValueError(f"coarsen: factor {factor} must divide the grid resolution {resolution}.")
    occ = voxelize(mesh, resolution, 2)
    n = resolution // factor
    blocks = occ.reshape(n, factor, n, factor, n, factor).mean(axis=(1, 3, 5)) >= 0.5
    coarse = blocks.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    return occupancy_to_mesh(coarse.astype(np.float32))


# level 1..3 = mild..strong; strengths chosen so level 3 is plainly visible in a 56 px montage view
CORRUPTIONS: dict[str, Callable[..., Any]] = {
    "noise": lambda m, level, seed: corrupt_noise(m, sigma=0.012 * level, seed=seed),
    "smooth": lambda m, level, seed: corrupt_smooth(m, iterations=8 * level, seed=seed),
    "holes": lambda m, level, seed: corrupt_holes(m, n_holes=3 * level, radius=0.05 + 0.02 * level, seed=seed),
    "missing": lambda m, level, seed: corrupt_missing_part(m, seed=seed, n_parts=level, fraction=0.15 * level),
    "speckle": lambda m, level, seed: corrupt_speckle(m, flip_prob=0.04 * level, seed=seed),
    "coarsen": lambda m, level, seed: corrupt_coarsen(m, factor=2 ** level, seed=seed),
}


def make_corruptions(gt_mesh, object_id: str, kinds: Sequence[str], levels: Sequence[int],
                     seed: int) -> list[tuple[str, Any]]:
    """[(candidate id, mesh)] for every kind x level; ids like ``<object>:noise:2``."""
    out = []
    for kind in kinds:
        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}; use some of {sorted(CORRUPTIONS)}")
        for level in levels:
            s = derive_seed(seed, "corrupt", object_id, kind, level)
            out.append((f"{object_id}:{kind}:{level}", CORRUPTIONS[kind](gt_mesh, int(level), s)))
    return out
