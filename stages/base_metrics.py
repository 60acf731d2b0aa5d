"""base-metrics: held-out oracle scores of the base generator -> metrics/base.json."""
from __future__ import annotations

import argparse

from judge3d.config import load_params, require
from judge3d.io import write_json
from judge3d.report.base_metrics import base_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generated-root", default="data/generated")
    ap.add_argument("--out", default="metrics/base.json")
    args = ap.parse_args()
    seed = require(load_params(), "seed", int)
    write_json(args.out, base_metrics(args.generated_root, seed=seed))
    print(f"base-metrics -> {args.out}")


if __name__ == "__main__":
    main()
