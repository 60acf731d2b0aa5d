"""Fixed world-space cameras looking at the origin of the canonical (Y-up) frame."""
from __future__ import annotations

import math

import numpy as np

CANONICAL_CUBE_CORNERS = np.array(
    [[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], dtype=np.float64)


def look_at_origin_pose(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """Camera-to-world pose (OpenGL convention: camera looks down its -Z, +Y up).

    Azimuth 0 puts the camera on +Z (looking at the object's front), positive azimuth turns it
    towards +X; elevation lifts it above the XZ plane.
    """
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    if np.linalg.norm(right) < 1e-9:
        raise ValueError(f"elevation {elevation_deg} deg looks straight along the up axis; use |elevation| < 90.")
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, -forward, eye
    return pose


def cube_fits_view(pose: np.ndarray, yfov_deg: float, margin: float = 0.98) -> bool:
    """True when every corner of [-0.5, 0.5]^3 projects inside the (square) image."""
    world_to_cam = np.linalg.inv(pose)
    pts = CANONICAL_CUBE_CORNERS @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    depth = -pts[:, 2]
    if np.any(depth <= 0):
        return False
    half = math.tan(math.radians(yfov_deg) / 2.0)
    ndc = pts[:, :2] / (depth[:, None] * half)
    return bool(np.all(np.abs(ndc) <= margin))
