"""Stage `arm-metrics@<arm>`: metrics/arms/<arm>.json from the arm's raw eval-judge log, its held-out
manifest, the base's held-out manifest of the same regime and its train_metrics.json (cheap: no model)."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys

from judge3d.core.config import load_params
from judge3d.core.io import write_json
from judge3d.adapt.arms import arm_paths, arm_spec, check_dvc_params
from judge3d.report.arm_metrics import arm_metrics_from_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arm", required=True, help="arm name, a key of params.yaml arms")
    args = parser.parse_args(argv)

    params = load_params()
    spec = arm_spec(params, args.arm)
    check_dvc_params(spec, stage="arm-metrics", keys=spec.label_keys)
    metrics = arm_metrics_from_files(".", args.arm, params)
    out = arm_paths(args.arm, spec.regime).metrics
    write_json(out, metrics)
    flag = "  DIVERGED" if metrics["diverged"] else ""
    print(f"arm-metrics@{args.arm}: strict {metrics['strict']} (W/L/F {metrics['W']}/{metrics['L']}/{metrics['F']}, "
          f"n={metrics['n']}), oracle win {metrics['oracle_win']['rate']}, geom Δ "
          f"{metrics['geom']['score']['delta']} -> {out}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
