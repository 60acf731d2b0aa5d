"""Stage `render`: a normal-map montage per mesh of a mesh-set manifest (params: the `render` block)."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys

from judge3d.core.config import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, help="mesh-set manifest (JSONL rows with mesh_path)")
    parser.add_argument("--out-dir", required=True, help="directory for <candidate|object_id>.png and manifest.jsonl")
    args = parser.parse_args(argv)

    from judge3d.render.batch import render_manifest  # after argparse: --help needs no OpenGL

    rows = render_manifest(args.manifest, args.out_dir, load_params())
    n_empty = sum(r["render_empty"] for r in rows)
    n_nan = sum(r["render_nan"] for r in rows)
    n_clipped = sum(r["render_clipped"] for r in rows)
    print(f"render: {len(rows)} montages in {args.out_dir} (empty {n_empty}, nan {n_nan}, clipped {n_clipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
