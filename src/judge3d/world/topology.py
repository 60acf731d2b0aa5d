"""Mesh connectivity from integer edge keys: what trimesh's ``is_watertight``,
``is_winding_consistent`` and face-adjacency components give, at a fraction of the cost."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EdgeTopology:
    n_edges: int              # distinct undirected edges
    n_components: int         # faces joined through edges shared by exactly two faces
    watertight: bool          # every edge shared by exactly two faces
    winding_consistent: bool  # every such shared edge runs opposite ways in its two faces


def edge_topology(faces: np.ndarray, n_vertices: int) -> EdgeTopology:
    """trimesh's ``is_watertight``, ``is_winding_consistent`` and face-adjacency components, from one
    sort of integer edge keys (trimesh groups (n, 2) rows several times over: ~4x slower here)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return EdgeTopology(n_edges=0, n_components=0, watertight=False, winding_consistent=False)
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)  # trimesh's faces_to_edges order
    lo, hi = np.minimum(edges[:, 0], edges[:, 1]), np.maximum(edges[:, 0], edges[:, 1])
    key = lo * max(int(n_vertices), int(hi.max()) + 1) + hi
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    counts = np.diff(np.r_[starts, len(key)])
    pair_at = starts[counts == 2]
    first, second = order[pair_at], order[pair_at + 1]
    face_a, face_b = first // 3, second // 3
    distinct = face_a != face_b
    n_faces = len(faces)
    adjacency = coo_matrix((np.ones(int(distinct.sum())), (face_a[distinct], face_b[distinct])),
                           shape=(n_faces, n_faces))
    return EdgeTopology(
        n_edges=int(len(starts)),
        n_components=int(connected_components(adjacency, directed=False)[0]),
        watertight=bool(2 * len(pair_at) == len(edges)),
        winding_consistent=bool(np.all(edges[first, 1] == edges[second, 0])),
    )
