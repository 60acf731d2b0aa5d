"""train-adapter@<arm>: train one specialization arm; adapter -> models/arms/<arm>, metrics ->
data/arms/<arm>/train_metrics.json, curves -> dvclive/train_adapter/<arm>."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
from pathlib import Path

# Facts of this run, not of its result (a resumed run must give the same train_metrics.json):
# they go to the dvclive summary and the log.
TIMING_KEYS = ("wall_s", "load_s", "train_s", "resumed_from_step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arm", required=True, help="an arm name under `arms` in params.yaml")
    ap.add_argument("--base", default="models/base", help="base generator folder (pretrain-base)")
    ap.add_argument("--world", default="data/world/manifest.jsonl", help="world manifest (data)")
    ap.add_argument("--pairs", default="data/labels/train_pairs.jsonl", help="judged pairs (judge-train-labels)")
    ap.add_argument("--generated", default="data/generated/train/manifest.jsonl", help="train mesh set (generate)")
    ap.add_argument("--degraded-dir", default="data/degraded", help="holds <severity>/manifest.jsonl (degrade)")
    ap.add_argument("--out", default=None, help="adapter folder (default models/arms/<arm>)")
    ap.add_argument("--metrics", default=None, help="default data/arms/<arm>/train_metrics.json")
    ap.add_argument("--live-dir", default=None, help="default dvclive/train_adapter/<arm>")
    ap.add_argument("--device", default=None, help="generator device (default: params base.device)")
    ap.add_argument("--print-params", action="store_true",
                    help="print the params keys this arm reads (its dvc.yaml `params:` list) and exit")
    args = ap.parse_args()

    from judge3d.adapt.arms import ArmInputs, arm_paths, arm_spec, check_dvc_params
    from judge3d.adapt.train import run_arm
    from judge3d.core.config import load_params
    from judge3d.core.io import write_json
    from judge3d.generators.base import params_device

    params = load_params()
    paths = ArmInputs(base=args.base, world=args.world, pairs=args.pairs, generated=args.generated,
                      degraded_dir=args.degraded_dir)
    spec = arm_spec(params, args.arm)
    if args.print_params:
        print("\n".join(f"- {k}" for k in spec.param_keys))
        return
    check_dvc_params(spec)
    files = arm_paths(args.arm, spec.regime)
    out = Path(args.out or files.model_dir)
    metrics_path = Path(args.metrics or files.train_metrics)
    live_dir = str(args.live_dir or files.live_dir)

    from judge3d.core.training import open_live

    # The training loop logs step s at dvclive step s (judge3d.core.training), also after a resume.
    with open_live(live_dir) as live:
        metrics = run_arm(params, args.arm, out, paths, live=live, device=args.device or params_device(params))
        # Wall times go to the dvclive summary and the log, not to train_metrics.json, which
        # arm-metrics reads: a forced rerun must leave everything downstream up to date.
        timing = {k: metrics.pop(k) for k in TIMING_KEYS if k in metrics}
        live.summary.update({k: v for k, v in {**metrics, **timing}.items()
                             if isinstance(v, (int, float, bool)) and v is not None})
    write_json(metrics_path, metrics)
    if metrics.get("trained") is False:
        probe = f"NOT trained ({metrics['untrained_reason']})"
    elif "fm_mse_before" in metrics:
        probe = f"FM-MSE {metrics['fm_mse_before']:.4g} -> {metrics['fm_mse_after']:.4g}"
    else:
        probe = f"feat-MSE {metrics['feat_mse_before']:.4g} -> {metrics['feat_mse_after']:.4g}"
    flag = "  DIVERGED" if metrics["diverged"] else ""
    print(f"train-adapter@{args.arm}: {probe} in {timing['wall_s']:.1f} s -> {out}{flag}")


if __name__ == "__main__":
    main()
