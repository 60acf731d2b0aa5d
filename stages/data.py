"""Stage `data`: build the procedural world (meshes, voxels, clean input images, manifest)."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys
import time

from judge3d.core.config import ParamsError, load_params
from judge3d.pipeline.world import build_world_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/world", help="output directory (default: data/world)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        rows = build_world_files(load_params(args.params), args.out)
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"data: {exc}", file=sys.stderr)
        return 2
    print(f"data: {len(rows)} objects -> {args.out}/manifest.jsonl in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
