"""Normal-map montages: the judge's only view of a mesh.

Every candidate of every object is seen by the same fixed world-space cameras (evenly spaced
azimuths, one elevation, looking at the origin); a mesh is never re-normalized, so scale and pose
errors stay visible. Each pixel is the camera-space normal of the face it sees, mapped to RGB as
``(n + 1) / 2 * 255`` (OpenGL camera axes: +x right, +y up, +z towards the viewer), unlit.

Two exact methods give the same image (to one colour level at most):
- ``shader`` (default): pyrender's FLAT program slot is given a two-line GLSL pass (``shaders/``)
  that writes the face normal from screen-space derivatives of the camera-space position. The
  mesh is uploaded once, indexed, and each view only moves the camera.
- ``face_colours``: the design-note method. Per view, face colours are set on the CPU to that
  camera's normals and drawn with ``RenderFlags.FLAT``; the mesh is re-uploaded per view as an
  unindexed triangle soup; 1.3-2x slower than ``shader`` (benchmarks/render.py).

Back faces are culled by default (``cull_back_faces``): for a watertight, outward-wound mesh they are
never visible anyway, while for a broken one a hole shows the background and an inside-out mesh
shows its far side, so defects stay visible instead of being painted over by interior surfaces.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from judge3d.core.config import ParamsError, require
from judge3d.render import egl
from judge3d.render.cameras import cube_fits_view, look_at_origin_pose
from judge3d.render.meshcheck import mesh_problem, triangle_soup

SHADER_DIR = Path(__file__).resolve().parent / "shaders"
METHODS = ("shader", "face_colours")
# Smallest tile side: 100 views in 128 px gave 12-px tiles, where a chair is a few coloured pixels and
# the judge compares noise. 32 px keeps the default 2x2 (64 px) and up to 4x4 tiles at 128 px.
MIN_TILE = 32


class MontageRenderer:
    """Tiles ``views`` normal-map views into one square (size, size, 3) uint8 image.

    One OffscreenRenderer and one Scene live for the renderer's lifetime; each mesh only swaps
    the mesh node. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, views: int = 4, elevation_deg: float = 20.0, size: int = 128,
                 background: Sequence[int] = (0, 0, 0), camera_distance: float = 2.5,
                 yfov_deg: float = 40.0, azimuth_offset_deg: float = 45.0, cull_back_faces: bool = True,
                 method: str = "shader"):
        import pyrender

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method

        if int(views) < 1:
            raise ValueError(f"views must be >= 1, got {views!r}")
        self.views = int(views)
        self.grid = math.ceil(math.sqrt(self.views))
        self.size = int(size)
        self.tile = self.size // self.grid
        if self.tile < MIN_TILE:
            raise ValueError(
                f"render.views = {self.views} in a {self.size}-px montage gives {self.tile}-px tiles "
                f"({self.grid}x{self.grid} grid; tile = size // ceil(sqrt(views))), below the {MIN_TILE}-px minimum "
                f"at which a view still shows the shape; lower render.views or raise render.size "
                f"(>= {MIN_TILE * self.grid} for {self.views} views).")
        bg = np.asarray(background)
        if bg.shape != (3,) or np.any(bg < 0) or np.any(bg > 255):
            raise ValueError(f"background must be three ints in 0..255, got {background!r}")
        self.background = bg.astype(np.uint8)
        self.elevation_deg = float(elevation_deg)
        self.camera_distance = float(camera_distance)
        self.yfov_deg = float(yfov_deg)
        self.azimuths_deg = [float(azimuth_offset_deg) + 360.0 * k / self.views for k in range(self.views)]
        self.poses = [look_at_origin_pose(az, self.elevation_deg, self.camera_distance) for az in self.azimuths_deg]
        for az, pose in zip(self.azimuths_deg, self.poses):
            if not cube_fits_view(pose, self.yfov_deg, margin=1.0):
                raise ValueError(
                    f"the view at azimuth {az:g} deg (distance {self.camera_distance}, yfov {self.yfov_deg} deg) "
                    "does not frame the canonical cube [-0.5, 0.5]^3; raise render.camera_distance or render.yfov_deg.")
        # n_camera = R_cam_to_world^T n_world, stacked for all views so colours are one matmul per mesh.
        self._world_to_cam_rot = np.stack([p[:3, :3].T for p in self.poses])  # (V, 3, 3)
        self._world_to_cam = np.stack([np.linalg.inv(p) for p in self.poses])

        self._pyrender = pyrender
        self._renderer = egl.offscreen_renderer(self.tile, self.tile)
        if method == "shader":
            from pyrender.shader_program import ShaderProgramCache

            if not (SHADER_DIR / "flat.vert").is_file() or not (SHADER_DIR / "flat.frag").is_file():
                raise FileNotFoundError(f"normal-map shaders missing from {SHADER_DIR}; reinstall judge3d "
                                        "(package data judge3d/render/shaders/*.vert, *.frag).")
            # Only this renderer's FLAT program changes; pyrender's own shaders stay untouched.
            self._renderer._renderer._program_cache = ShaderProgramCache(shader_dir=str(SHADER_DIR))
        self._scene = pyrender.Scene(bg_color=[*(self.background / 255.0), 1.0], ambient_light=[1.0, 1.0, 1.0])
        self._camera = self._scene.add(pyrender.PerspectiveCamera(
            yfov=math.radians(self.yfov_deg), aspectRatio=1.0, znear=0.05, zfar=20.0))
        # Face colours carry the whole signal; white base colour so FLAT writes them unchanged.
        self._material = pyrender.MetallicRoughnessMaterial(
            baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0, roughnessFactor=1.0,
            doubleSided=not cull_back_faces)
        self._mesh_node = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "MontageRenderer":
        """Build from the ``render`` block of params.yaml (each key checked, errors name the key)."""
        background = require(params, "render.background", list,
                             check=lambda v: len(v) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in v),
                             hint="Give three ints in 0..255, e.g. [0, 0, 0].")
        kwargs = dict(
            views=require(params, "render.views", int, check=lambda v: v >= 1),
            elevation_deg=require(params, "render.elevation_deg", float, check=lambda v: -90 < v < 90),
            size=require(params, "render.size", int, check=lambda v: v >= 16),
            background=background,
            camera_distance=require(params, "render.camera_distance", float, check=lambda v: v > 0),
            yfov_deg=require(params, "render.yfov_deg", float, check=lambda v: 0 < v < 180),
            azimuth_offset_deg=require(params, "render.azimuth_offset_deg", float),
            cull_back_faces=require(params, "render.cull_back_faces", bool),
            method=require(params, "render.normal_method", str, check=lambda v: v in METHODS,
                           hint=f"One of {list(METHODS)}."),
        )
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ParamsError(f"params.yaml render block: {exc}") from exc

    def blank(self) -> np.ndarray:
        return np.broadcast_to(self.background, (self.size, self.size, 3)).copy()

    def render(self, mesh) -> tuple[np.ndarray, dict[str, Any]]:
        """(montage, info). A None/empty mesh, non-finite vertices, out-of-range face indices or only
        zero-area faces give a blank montage flagged in info ('empty' / 'nan' / 'corrupt' /
        'degenerate'); a mesh that is drawn but covers no pixel is 'empty' too. info also has n_faces,
        coverage (foreground share) and clipped (part of the mesh outside some view)."""
        problem = mesh_problem(mesh)
        info: dict[str, Any] = {"empty": problem in ("empty", "degenerate"), "nan": problem == "nan",
                                "corrupt": problem == "corrupt", "degenerate": problem == "degenerate"}
        if problem:
            faces = getattr(mesh, "faces", None)
            info.update(n_faces=0 if faces is None else int(len(faces)),
                        coverage=0.0, clipped=False)
            return self.blank(), info

        views = self._shader_views(mesh) if self.method == "shader" else self._face_colour_views(mesh)
        montage = self.blank()
        covered = 0
        for k, (colour, depth) in enumerate(views):
            row, col = divmod(k, self.grid)
            montage[row * self.tile:(row + 1) * self.tile, col * self.tile:(col + 1) * self.tile] = colour[..., :3]
            covered += int(np.count_nonzero(depth > 0))
        vertices = np.asarray(mesh.vertices, dtype=np.float64)
        info.update(n_faces=int(len(mesh.faces)), coverage=covered / float(self.views * self.tile * self.tile),
                    clipped=self._clipped(vertices))
        # Faces that cover no pixel in any view (sub-pixel, edge-on, culled): the montage is only
        # background, which is what 'empty' means to every reader of the flags.
        info["empty"] = covered == 0
        return montage, info

    def _set_mesh(self, primitive) -> None:
        if self._mesh_node is not None:
            self._scene.remove_node(self._mesh_node)
        self._mesh_node = self._scene.add(self._pyrender.Mesh([primitive]))

    def _draw(self, pose):
        self._scene.set_pose(self._camera, pose)
        return self._renderer.render(self._scene, flags=self._pyrender.RenderFlags.FLAT)

    def _shader_views(self, mesh):
        self._set_mesh(self._pyrender.Primitive(
            positions=np.asarray(mesh.vertices, dtype=np.float32),
            indices=np.asarray(mesh.faces, dtype=np.uint32), material=self._material))
        for pose in self.poses:
            yield self._draw(pose)

    def _face_colour_views(self, mesh):
        soup = triangle_soup(mesh)                                   # (F, 3, 3)
        positions = soup.reshape(-1, 3)
        normals = _unit_face_normals(soup)                           # (F, 3) world space
        cam_normals = normals[None] @ self._world_to_cam_rot.transpose(0, 2, 1)  # (V, F, 3), BLAS matmul
        colours = np.empty(cam_normals.shape[:2] + (4,), dtype=np.float32)
        # Quantize on the CPU so the stored colour is exactly the uint8 the image will hold.
        colours[..., :3] = np.round((cam_normals + 1.0) * 127.5) / 255.0
        colours[..., 3] = 1.0
        for k, pose in enumerate(self.poses):
            self._set_mesh(self._pyrender.Primitive(positions=positions, color_0=np.repeat(colours[k], 3, axis=0),
                                                    material=self._material))
            yield self._draw(pose)

    def _clipped(self, vertices: np.ndarray) -> bool:
        """True when part of the mesh falls outside some view (it is then cut off, not rescaled)."""
        half = math.tan(math.radians(self.yfov_deg) / 2.0)
        pts = vertices[None] @ self._world_to_cam[:, :3, :3].transpose(0, 2, 1) + self._world_to_cam[:, None, :3, 3]
        depth = -pts[..., 2]
        if np.any(depth <= 0.05):
            return True
        return bool(np.any(np.abs(pts[..., :2]) > depth[..., None] * half))

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def __enter__(self) -> "MontageRenderer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unit_face_normals(soup: np.ndarray) -> np.ndarray:
    n = np.cross(soup[:, 1] - soup[:, 0], soup[:, 2] - soup[:, 0]).astype(np.float64)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(length > 0, length, 1.0)


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """Inverse of the colour map: uint8 RGB -> camera-space unit-ish normals in [-1, 1]."""
    return np.asarray(rgb, dtype=np.float64) / 127.5 - 1.0
