"""pretrain-base: train the mini generator (conditioner + flow transformer) on the train split."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse

from judge3d.core.config import load_params
from judge3d.generators.pretrain import pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", default="data/world/manifest.jsonl", help="world manifest (data stage)")
    ap.add_argument("--out", default="models/base", help="output model folder")
    ap.add_argument("--live-dir", default="dvclive/pretrain_base", help="dvclive folder for the loss curve")
    args = ap.parse_args()
    params = load_params()

    from judge3d.core.training import open_live

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
