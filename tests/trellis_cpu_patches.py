"""TRELLIS's CPU stand-ins (trellis_stand_ins.py) for processes the tests start: the paper-smoke
pipeline's stages. Named by ``JUDGE3D_TRELLIS_PATCHES`` in the test's environment only
(judge3d.generators.trellis_import runs it before TRELLIS's first import)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trellis_stand_ins  # noqa: E402

trellis_stand_ins.install()


def after_import(modules) -> None:
    trellis_stand_ins.mesh_extractor_on_cpu(modules)
    trellis_stand_ins.spconv_bias_on_cpu()
    trellis_stand_ins.spconv_backward_on_cpu()
