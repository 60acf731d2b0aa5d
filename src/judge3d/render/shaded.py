"""The generator's conditioning image: one lit, shaded RGB view of the object on a plain background,
optionally with an alpha channel that cuts the object out (``world.image.alpha``).

The alpha channel is the multisampled framebuffer's coverage: the background is cleared to alpha 0
and the opaque material writes alpha 1, so the resolved alpha is 255 where the object covers the
whole pixel, 0 where it misses it, and the covered fraction on antialiased edges. The RGB channels
are the same bytes as the RGB render (the material's blending ignores the framebuffer's alpha).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from judge3d.render import egl  # noqa: F401  (sets PYOPENGL_PLATFORM before pyrender loads)
from judge3d.render.cameras import cube_fits_view, look_at_origin_pose
from judge3d.render.meshcheck import mesh_problem, triangle_soup

DEFAULT_CAMERA_DISTANCE = 2.5   # the canonical cube [-0.5, 0.5]^3 fits a 40-degree view from any azimuth
DEFAULT_YFOV_DEG = 40.0
MATERIAL_RGB = (0.6, 0.6, 0.6)  # neutral grey: shape is conveyed by shading, not by colour
AMBIENT = 0.25
KEY_LIGHT_INTENSITY = 2.2


class ShadedRenderer:
    """One offscreen renderer and scene reused for every image of a given size."""

    def __init__(self, size: int, *, camera_distance: float = DEFAULT_CAMERA_DISTANCE,
                 yfov_deg: float = DEFAULT_YFOV_DEG):
        import pyrender

        if int(size) <= 0:
            raise ValueError(f"image size must be a positive int, got {size!r}")
        self.size = int(size)
        self.camera_distance = float(camera_distance)
        self.yfov_deg = float(yfov_deg)
        self._pyrender = pyrender
        self._renderer = egl.offscreen_renderer(self.size, self.size)
        self._scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 1.0], ambient_light=[AMBIENT] * 3)
        self._camera = self._scene.add(pyrender.PerspectiveCamera(yfov=math.radians(self.yfov_deg), aspectRatio=1.0,
                                                                  znear=0.05, zfar=20.0))
        self._light = self._scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=KEY_LIGHT_INTENSITY))
        self._material = pyrender.MetallicRoughnessMaterial(
            baseColorFactor=[*MATERIAL_RGB, 1.0], metallicFactor=0.0, roughnessFactor=0.8)
        self._mesh_node = None

    def render(self, mesh, azimuth_deg: float, elevation_deg: float,
               background: Sequence[int] = (255, 255, 255), *, alpha: bool = False) -> np.ndarray:
        """(size, size, 3) uint8 RGB, or (size, size, 4) RGBA with the object's coverage as alpha."""
        problem = mesh_problem(mesh)
        if problem:
            raise ValueError(f"cannot render an input image of a mesh that is {problem}: "
                             "input images are made from ground-truth shapes, which must be non-empty and finite.")
        pyrender = self._pyrender
        pose = look_at_origin_pose(azimuth_deg, elevation_deg, self.camera_distance)
        if not cube_fits_view(pose, self.yfov_deg, margin=1.0):
            raise ValueError(f"camera distance {self.camera_distance} with yfov {self.yfov_deg} deg does not frame "
                             "the canonical cube [-0.5, 0.5]^3; increase the distance or the field of view.")
        self._scene.set_pose(self._camera, pose)
        # Key light from above-left of the camera, so the three visible faces of a box differ in tone.
        light_pose = look_at_origin_pose(azimuth_deg - 35.0, min(elevation_deg + 35.0, 85.0), 1.0)
        self._scene.set_pose(self._light, light_pose)
        bg = _background(background)
        self._scene.bg_color = np.array([*(bg / 255.0), 0.0 if alpha else 1.0])

        soup = triangle_soup(mesh)
        normals = np.repeat(_face_normals(soup), 3, axis=0)
        primitive = pyrender.Primitive(positions=soup.reshape(-1, 3), normals=normals, material=self._material)
        if self._mesh_node is not None:
            self._scene.remove_node(self._mesh_node)
        self._mesh_node = self._scene.add(pyrender.Mesh([primitive]))
        if alpha:
            color, _ = self._renderer.render(self._scene, flags=pyrender.RenderFlags.RGBA)
            return np.ascontiguousarray(color, dtype=np.uint8)
        color, _ = self._renderer.render(self._scene)
        return np.ascontiguousarray(color[..., :3], dtype=np.uint8)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def __enter__(self) -> "ShadedRenderer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _face_normals(soup: np.ndarray) -> np.ndarray:
    n = np.cross(soup[:, 1] - soup[:, 0], soup[:, 2] - soup[:, 0])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.where(length > 0, length, 1.0)).astype(np.float32)


def _background(background: Sequence[int]) -> np.ndarray:
    bg = np.asarray(background, dtype=np.float64)
    if bg.shape != (3,) or np.any(bg < 0) or np.any(bg > 255):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg


_CACHE: dict[tuple[int, float, float], ShadedRenderer] = {}


def render_input_image(mesh, size: int, azimuth_deg: float, elevation_deg: float,
                       background: Sequence[int] = (255, 255, 255), *, alpha: bool = False,
                       camera_distance: float = DEFAULT_CAMERA_DISTANCE,
                       yfov_deg: float = DEFAULT_YFOV_DEG) -> np.ndarray:
    """(size, size, 3) uint8 shaded view of ``mesh`` in the canonical frame (not re-normalized);
    with ``alpha`` (size, size, 4): the same RGB plus the object's coverage (255 on the object, 0 off it).

    Renderers are cached per (size, distance, fov), so a data stage rendering hundreds of images
    pays the EGL start-up once.
    """
    key = (int(size), float(camera_distance), float(yfov_deg))
    renderer = _CACHE.get(key)
    if renderer is None:
        renderer = _CACHE[key] = ShadedRenderer(size, camera_distance=camera_distance, yfov_deg=yfov_deg)
    return renderer.render(mesh, azimuth_deg, elevation_deg, background, alpha=alpha)
