"""Shared checks on a mesh before it reaches OpenGL."""
from __future__ import annotations

import numpy as np

# Twice a face's area below which it is a line or a point (the same bound as geometry.validity).
DEGENERATE_AREA2 = 1e-12


def mesh_problem(mesh) -> str | None:
    """None for a renderable triangle mesh, else a short flag name: 'empty', 'nan', 'corrupt' or
    'degenerate' (faces, but none with area)."""
    if mesh is None:
        return "empty"
    vertices = getattr(mesh, "vertices", None)
    faces = getattr(mesh, "faces", None)
    if vertices is None or faces is None or len(vertices) == 0 or len(faces) == 0:
        return "empty"
    if not np.all(np.isfinite(np.asarray(vertices, dtype=np.float64))):
        return "nan"
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= len(vertices):
        return "corrupt"
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not np.any(area2 > DEGENERATE_AREA2):
        return "degenerate"  # every face has zero area: nothing to draw, though the mesh is not empty
    return None


def triangle_soup(mesh) -> np.ndarray:
    """(F, 3, 3) float32 corner positions: unshared vertices, so every face keeps its own normal/colour."""
    return np.asarray(mesh.vertices, dtype=np.float32)[np.asarray(mesh.faces, dtype=np.int64)]
