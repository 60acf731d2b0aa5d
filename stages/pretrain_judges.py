"""pretrain-judges (mini only): train one tiny judge (role 'train' = Qwen2.5-VL, 'eval' = InternVL)."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", required=True, choices=["train", "eval"], help="which judge (params judges.<role>)")
    ap.add_argument("--candidates", required=True, help="candidate manifest: object_id, montage_path, oracle_score")
    ap.add_argument("--out", required=True, help="output HF folder, e.g. models/judges/train")
    ap.add_argument("--world", default="data/world/manifest.jsonl",
                    help="the objects' input images (a reference-aware judge's references)")
    ap.add_argument("--metrics", default=None, help="held-out metrics JSON (default metrics/pretrain_judges/<role>.json)")
    ap.add_argument("--live-dir", default=None, help="dvclive folder (default dvclive/pretrain_judges/<role>)")
    args = ap.parse_args()

    from judge3d.core.config import load_params, require
    from judge3d.core.io import read_jsonl, write_json
    from judge3d.core.training import open_live
    from judge3d.judges.references import input_images, is_reference_aware, judge_prompt
    from judge3d.judges.tiny import TinySizes
    from judge3d.judges.train import TrainConfig, train_judge

    params = load_params()
    arch = require(params, f"judges.{args.role}.arch", str, check=lambda v: v in ("qwen2_5_vl", "internvl"),
                   hint="Use qwen2_5_vl (training judge) or internvl (evaluation judge).")
    split = require(params, f"judges.{args.role}.objects_split", str)
    sizes = TinySizes.from_params(require(params, f"judges.tiny.{arch}", dict))
    cfg = TrainConfig.from_params(require(params, "judges.training", dict), require(params, "train_seed", int))
    prompt = judge_prompt(params, args.role)
    # the reference-aware ablation: every training query also shows the object's input image
    references = input_images(args.world) if is_reference_aware(params, args.role) else None

    rows = read_jsonl(args.candidates)
    if any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise SystemExit(f"{args.candidates}: no candidates of split {split!r} (judges.{args.role}.objects_split); "
                         "rebuild the judge candidate set.")

    live_dir = args.live_dir or f"dvclive/pretrain_judges/{args.role}"
    # The training loop logs step s at dvclive step s (judge3d.core.training), also after a resume.
    with open_live(live_dir) as live:
        summary = train_judge(arch, sizes, rows, args.out, prompt, cfg, name=args.role, live=live,
                              references=references)
        live.summary.update({"clear_strict": summary["heldout"]["clear"]["strict"],
                             "wall_s": summary["wall_s"], "n_params": summary["n_params"]})
    write_json(args.metrics or f"metrics/pretrain_judges/{args.role}.json", summary)
    clear = summary["heldout"]["clear"]
    print(f"pretrain-judges[{args.role}]: {arch}, {summary['n_params']} params, {cfg.steps} steps in "
          f"{summary['train_wall_s']} s; held-out clear strict {clear['strict']} flip {clear['flip_rate']} "
          f"-> {args.out} ({summary['judge_id']})")


if __name__ == "__main__":
    main()
