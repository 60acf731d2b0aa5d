"""Stage driver for `data`: the world layer builds the objects, with the render layer's input-image renderer."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from judge3d.render import render_input_image
from judge3d.render.egl import context_started
from judge3d.world.dataset import build_world


def build_world_files(params: Mapping[str, Any], out_dir: str | Path = "data/world", *, root: str | Path = ".",
                      progress: bool = True) -> list[dict[str, Any]]:
    """Build the world, objects in worker processes that each open their own EGL context; inline
    where this process holds one already (a second context in a forked child would share its state)."""
    return build_world(params, out_dir, render_fn=render_input_image,
                       workers=1 if context_started() else None, root=root, progress=progress)
