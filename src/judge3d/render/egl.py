"""Headless OpenGL through EGL (Mesa llvmpipe on a CPU machine).

PyOpenGL fixes its platform when ``OpenGL`` is first imported, so the variable is set here, before
anything in :mod:`judge3d.render` imports pyrender; users need not export it themselves.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri"


class RenderBackendError(RuntimeError):
    """Headless OpenGL could not start; the message names the packages or setting to fix."""


def _platform_problem() -> str | None:
    platform = os.environ.get("PYOPENGL_PLATFORM")
    if platform != "egl":
        return (f"PYOPENGL_PLATFORM={platform!r} in the environment; judge3d renders headless through EGL. "
                "Unset it (or set it to 'egl').")
    gl = sys.modules.get("OpenGL.platform")
    if gl is not None:
        name = type(getattr(gl, "PLATFORM", None)).__name__
        if name and "EGL" not in name:
            return (f"PyOpenGL was imported with platform {name} before judge3d.render; "
                    "import judge3d.render first, or export PYOPENGL_PLATFORM=egl.")
    return None


def offscreen_renderer(width: int, height: int):
    """A ``pyrender.OffscreenRenderer`` on EGL, or :class:`RenderBackendError` saying how to fix it."""
    problem = _platform_problem()
    if problem:
        raise RenderBackendError(problem)
    try:
        import pyrender
        renderer = pyrender.OffscreenRenderer(int(width), int(height))
    except Exception as exc:  # EGL/driver failures surface as many exception types
        raise RenderBackendError(
            f"could not start a headless EGL OpenGL context ({type(exc).__name__}: {exc}). "
            f"On Debian/Ubuntu install: sudo apt-get install -y {EGL_PACKAGES} "
            "(Mesa's llvmpipe renders on the CPU; no GPU needed)."
        ) from exc
    _destroy_context_only(renderer._platform)
    global _STARTED
    _STARTED = True
    return renderer


_STARTED = False


def context_started() -> bool:
    """Whether this process has opened an EGL context. A forked child of such a process should
    not render: it would inherit the parent's EGL display state half-copied (no driver threads)."""
    return _STARTED


def _destroy_context_only(platform) -> None:
    """Make closing one renderer leave the others in this process working.

    pyrender's EGL ``delete_context`` calls ``eglTerminate`` on the display, which every renderer
    in the process shares (one device), so closing (or garbage-collecting) one renderer would kill
    the contexts of all the others. Destroy only this renderer's context; the display is released
    at process exit.
    """
    def delete_context() -> None:
        from OpenGL.EGL import eglDestroyContext

        if platform._egl_display is not None and platform._egl_context is not None:
            eglDestroyContext(platform._egl_display, platform._egl_context)
        platform._egl_context = None
        platform._egl_display = None

    platform.delete_context = delete_context
