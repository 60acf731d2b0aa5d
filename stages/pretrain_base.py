"""pretrain-base: the base generator. Mini (base.backend: mini): train the mini generator (conditioner
+ flow transformer) on the train split. TRELLIS (base.backend: trellis): nothing is trained; write the
folder naming the TRELLIS pipeline and DINOv2 conditioner (base.trellis), with their files' digests."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
from pathlib import Path

from judge3d.core.config import load_params, require
from judge3d.generators.pretrain import pretrain

BACKENDS = ("mini", "trellis")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", default="data/world/manifest.jsonl", help="world manifest (data stage)")
    ap.add_argument("--out", default="models/base", help="output model folder")
    ap.add_argument("--live-dir", default="dvclive/pretrain_base", help="dvclive folder for the loss curve")
    args = ap.parse_args()
    params = load_params()
    backend = require(params, "base.backend", str, check=lambda v: v in BACKENDS, hint=f"one of {list(BACKENDS)}")

    from judge3d.core.training import open_live

    if backend == "trellis":
        from judge3d.generators.trellis import prepare_base

        summary = prepare_base(args.out, pipeline=require(params, "base.trellis.pipeline", str),
                               conditioner=require(params, "base.trellis.conditioner", str),
                               resolution=require(params, "base.trellis.resolution", int, check=lambda v: v > 0),
                               seed=require(params, "train_seed", int),
                               pair_guidance=require(params, "base.trellis.pair_guidance", bool),
                               compile=require(params, "base.trellis.compile", bool))
        # No loss curve: the (empty) plots folder is still this stage's output.
        Path(args.live_dir, "plots", "metrics").mkdir(parents=True, exist_ok=True)
        print(f"pretrain-base: TRELLIS {summary['pipeline']} + {summary['conditioner']} ({summary['cond_tokens']} x "
              f"{summary['cond_channels']} tokens) -> {args.out}")
        return

    # The training loop logs step s at dvclive step s (judge3d.core.training), also after a resume.
    with open_live(args.live_dir) as live:
        summary = pretrain(params, args.manifest, args.out, live=live)
        live.summary.update({"final_loss": summary["final_loss_mean_last50"],
                             "wall_s": round(summary["wall_s"], 1),
                             "params_flow": summary["parameters"]["flow"],
                             "params_conditioner": summary["parameters"]["conditioner"]})
    print(f"pretrain-base: {summary['steps']} steps in {summary['wall_s']:.1f} s, "
          f"final loss {summary['final_loss_mean_last50']:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
