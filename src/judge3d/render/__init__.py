"""Headless rendering: normal-map montages (the judge's view) and shaded input images.

Importing this package sets ``PYOPENGL_PLATFORM=egl`` (unless already set) before pyrender loads.
"""
from judge3d.render import egl  # noqa: F401  (must run before any pyrender/OpenGL import)
from judge3d.render.egl import RenderBackendError
from judge3d.render.montage import MontageRenderer, decode_normals
from judge3d.render.shaded import ShadedRenderer, render_input_image

__all__ = ["MontageRenderer", "RenderBackendError", "ShadedRenderer", "decode_normals", "render_input_image"]
