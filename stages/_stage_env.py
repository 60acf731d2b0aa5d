"""First import of every stage script: the right interpreter, this checkout's code, pinned numerics.

DVC runs each stage's ``python`` from the caller's PATH, not from the venv DVC itself lives in. A
``dvc repro`` typed in a shell without the venv therefore starts the system python, which lacks the
project's dependencies; this module stops such a stage at once with the fix, instead of a
``ModuleNotFoundError`` deep in an import.

It puts this checkout's ``src/`` first on ``sys.path``, so a stage always runs the code its
``dvc.yaml`` deps hash, even when the venv's editable install points at another clone.

Then it pins the CPU numerics (:mod:`judge3d.core.numerics`) before anything imports torch.
"""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _require_project_venv() -> None:
    try:
        importlib.metadata.distribution("judge3d")
    except importlib.metadata.PackageNotFoundError:
        stage = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "a stage"
        sys.exit(
            f"{stage}: this Python ({sys.executable}) does not have the judge3d project installed.\n"
            "DVC runs every stage with the first `python` on PATH. Use the project's venv:\n"
            f"    cd {REPO} && . .venv/bin/activate    # then dvc repro / dvc exp run ...\n"
            "or run `make repro`, which sets up .venv and puts it on PATH for you.")


_require_project_venv()
if str(REPO / "src") not in sys.path[:2]:
    sys.path.insert(1, str(REPO / "src"))

from judge3d.core.numerics import pin_cpu_numerics  # noqa: E402  (needs src/ on sys.path)

pin_cpu_numerics()
