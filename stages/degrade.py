"""Stage `degrade@<severity>`: degraded copies of the clean input images for one severity."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys

from judge3d.core.config import ParamsError, load_params
from judge3d.world.degrade import SEVERITIES
from judge3d.world.dataset import degrade_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--severity", required=True, choices=SEVERITIES)
    parser.add_argument("--world", default="data/world/manifest.jsonl", help="world manifest")
    parser.add_argument("--out", default=None, help="output directory (default: data/degraded/<severity>)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        rows = degrade_world(load_params(args.params), args.severity, args.world, args.out)
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"degrade: {exc}", file=sys.stderr)
        return 2
    mean_mse = sum(r["mse_vs_clean"] for r in rows) / len(rows)
    print(f"degrade {args.severity}: {len(rows)} images, mean MSE vs clean {mean_mse:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
