"""base-metrics: held-out oracle scores of the base generator -> metrics/base.json."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse

from judge3d.core.config import load_params
from judge3d.core.io import write_json
from judge3d.report.base_metrics import base_metrics_from_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=".", help="repository root (reads <root>/data/generated/heldout_*)")
    ap.add_argument("--out", default="metrics/base.json")
    args = ap.parse_args()
    write_json(args.out, base_metrics_from_files(args.root, load_params()))
    print(f"base-metrics -> {args.out}")


if __name__ == "__main__":
    main()
