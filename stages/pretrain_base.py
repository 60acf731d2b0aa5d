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

    from dvclive import Live

    # dvcyaml=False: the plots are declared in dvc.yaml by hand, dvclive must not rewrite it.
    # resume=True keeps the curve's earlier steps when they are still there (a run outside DVC);
    # under `dvc repro` DVC has deleted them, and a resumed run's curve starts at its checkpoint.
    with Live(dir=args.live_dir, save_dvc_exp=False, dvcyaml=False, report=None, resume=True) as live:
        def log_step(step: int, values: dict[str, float]) -> None:
            live.step = step  # the training step itself, also after a resume
            for name, value in values.items():
                live.log_metric(f"train/{name}", value)
            live.next_step()

        summary = pretrain(params, args.manifest, args.out, log_step=log_step)
        live.summary.update({"final_loss": summary["final_loss_mean_last50"],
                             "wall_s": round(summary["wall_s"], 1),
                             "params_flow": summary["parameters"]["flow"],
                             "params_conditioner": summary["parameters"]["conditioner"]})
    print(f"pretrain-base: {summary['steps']} steps in {summary['wall_s']:.1f} s, "
          f"final loss {summary['final_loss_mean_last50']:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
