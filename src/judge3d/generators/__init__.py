"""Image-to-3D generators behind one interface (:class:`Generator`): the mini-world model and TRELLIS-image."""
from __future__ import annotations

from pathlib import Path

from judge3d.generators.base import Generator, read_config, resolve_device
from judge3d.generators.stages import FlowStage, SparseLatent, StageSampler

__all__ = ["FlowStage", "Generator", "SparseLatent", "StageSampler", "load_generator", "resolve_device"]


def load_generator(path: str | Path, device: str = "auto") -> Generator:
    """Load a saved generator folder, dispatching on its config's ``backend``."""
    backend = read_config(path).get("backend")
    if backend == "mini":
        from judge3d.generators.mini import MiniGenerator
        return MiniGenerator.load(path, device=device)
    if backend == "trellis":
        from judge3d.generators.trellis import TrellisGenerator
        return TrellisGenerator.load(path, device=device)
    raise ValueError(f"{Path(path) / 'config.json'}: unknown generator backend {backend!r} (known: 'mini', 'trellis')")
