"""Stage `clear-gap-meshes`: the mesh-level clear-gap control's degraded side. Each held-out base
output (params calibrate.clear_gap: source set, budget, seed index 0) is corrupted by a defect the
judges never trained on and scored by the oracle; `render@clear_gap` then renders the montages."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generated-root", default="data/generated", help="holds <source_set>/manifest.jsonl")
    parser.add_argument("--world", default="data/world/manifest.jsonl", help="world manifest (ground-truth voxels)")
    parser.add_argument("--out-dir", default="data/generated/clear_gap")
    args = parser.parse_args(argv)

    from judge3d.core.config import load_params
    from judge3d.pipeline.clear_gap import ClearGapSettings, corrupt_outputs

    params = load_params()
    settings = ClearGapSettings.from_params(params)
    corrupt_outputs(f"{args.generated_root}/{settings.source_set}/manifest.jsonl", args.world, args.out_dir, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
