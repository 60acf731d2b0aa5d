"""judge-eval@<arm>: the arm's held-out outputs vs the base's, judged by the evaluation judge in both orders.

Outputs data/evals/<arm>/: meshes/, montages/, manifest.jsonl (the arm's rows with oracle scores
and montage paths) and verdicts.jsonl (the raw eval-judge log, a cached DVC output). Metrics are
computed downstream by arm-metrics@<arm> from these files alone.
"""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True, help="a key of arms in params.yaml")
    parser.add_argument("--base-model", default="models/base")
    parser.add_argument("--arms-dir", default="models/arms")
    parser.add_argument("--montages-dir", default="data/montages", help="holds heldout_<regime>/manifest.jsonl")
    parser.add_argument("--world", default="data/world/manifest.jsonl")
    parser.add_argument("--out-root", default="data/evals")
    parser.add_argument("--device", default=None, help="generator device (default: params base.device)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from judge3d.adapt.arms import arm_spec, check_dvc_params
    from judge3d.pipeline.arm_eval import ArmOnGenerator, evaluate_arm
    from judge3d.core.config import load_params, require
    from judge3d.generators.base import params_device
    from judge3d.judges.protocol import summarize
    from judge3d.pipeline.judging import load_judge
    from judge3d.pipeline.generator_replica import GeneratorReplica
    from judge3d.core.seeding import seed_everything

    params = load_params()
    spec = arm_spec(params, args.arm)
    check_dvc_params(spec, stage="judge-eval", keys=spec.regime_keys)
    seed = require(params, "seed", int)
    seed_everything(seed)
    threads = require(params, "generate.threads", int, check=lambda v: v > 0)
    torch.set_num_threads(threads)
    # The base generator with the arm on it: loaded here, or on Ray replicas with JUDGE3D_EXECUTOR=ray.
    generator = GeneratorReplica(args.base_model, args.device or params_device(params), threads, seed,
                                 arm=ArmOnGenerator(f"{args.arms_dir}/{args.arm}"))
    regime = spec.regime
    rows = evaluate_arm(args.arm, generator=generator,
                        judge=load_judge(params, "eval"), params=params,
                        base_montage_manifest=f"{args.montages_dir}/heldout_{regime}/manifest.jsonl",
                        world_manifest=args.world, out_dir=f"{args.out_root}/{args.arm}",
                        show_progress=not args.no_progress)
    s = summarize(rows, n_boot=200, seed=0)
    print(f"judge-eval {args.arm} ({regime}): n={s['n']} W={s['W']} L={s['L']} F={s['F']} strict={s['strict']} "
          f"(final metrics: arm-metrics@{args.arm})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
