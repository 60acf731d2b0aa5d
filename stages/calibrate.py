"""Stage `calibrate`: the evaluation judge's controls on held-out base outputs, both orders.

clear-gap (a base output vs the same output deliberately degraded by a corruption the judges never
trained on: stage clear-gap-meshes), headroom per severity (clean vs degraded input, default budget,
same seed), base-vs-base (seeds s0 vs s1). The training judge answers the same pairs, for Cohen's
kappa and its own reliability. Outputs: <out-dir>/{eval,train}_<control>.jsonl (raw logs; a rerun
asks only unlogged queries), the metrics JSON (pass/fail vs params thresholds) and plot data: the
flip rate vs |oracle gap|, and each judge's reliability and coverage curves.
Params: calibrate.*, judge.*, judges.{train,eval}.{model,reference}.
"""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--montages-dir", default="data/montages",
                        help="holds heldout_clean/ and heldout_<severity>/ montage manifests (render stage)")
    parser.add_argument("--eval-judge", default=None, help="default: params judges.eval.model")
    parser.add_argument("--world", default="data/world/manifest.jsonl",
                        help="the objects' input images (a reference-aware eval judge's references)")
    parser.add_argument("--train-judge", default=None, help="default: params judges.train.model")
    parser.add_argument("--out-dir", default="data/calibration")
    parser.add_argument("--metrics", default="metrics/calibration.json")
    parser.add_argument("--plots-dir", default="metrics/plots",
                        help="flip_vs_gap.csv, reliability_<judge>.csv and coverage_<judge>.csv go here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from judge3d.core.config import load_params, require
    from judge3d.judges.references import input_images, is_reference_aware, judge_prompt
    from judge3d.pipeline.judging import load_judge, run_calibrate
    from judge3d.core.seeding import seed_everything

    params = load_params()
    seed_everything(require(params, "seed", int))
    prompt = judge_prompt(params, "train")
    # the reference-aware ablation: the eval judge also sees each object's input image
    references = input_images(args.world) if is_reference_aware(params, "eval") else None
    eval_judge = load_judge(params, "eval", args.eval_judge)
    train_judge = load_judge(params, "train", args.train_judge)
    m = run_calibrate(eval_judge, train_judge, args.montages_dir, args.out_dir, args.metrics, args.plots_dir, params,
                      prompt, show_progress=not args.no_progress, eval_prompt=judge_prompt(params, "eval"),
                      eval_references=references)
    cg, bvb = m["clear_gap"], m["base_vs_base"]
    print(f"calibrate [{m['eval_judge_id']}]: clear-gap strict {cg['strict']} {cg['strict_wilson_ci']} "
          f"({'PASS' if cg['pass'] else 'FAIL'} {cg['criterion']}); base-vs-base decisive {bvb['decisive']} "
          f"{bvb['decisive_ci']} flip {bvb['flip_rate']} ({'PASS' if bvb['pass'] else 'FAIL'} {bvb['criterion']})")
    for severity, h in m["headroom"].items():
        print(f"  headroom {severity}: strict {h['strict']} {h['strict_wilson_ci']} flip {h['flip_rate']}")
    a = m["agreement"]
    for role, conf in m["confidence"].items():
        print(f"  {role} judge: ECE {conf['reliability']['ece']} {conf['reliability']['ece_ci']}, agreement "
              f"(no filter) {conf['coverage']['points'][0]['agreement']}")
    print(f"  kappa(train, eval) on all calibration pairs: {a['kappa']} {a['kappa_ci']}; judge-oracle agreement "
          f"{m['judge_oracle_agreement']}; flip~gap r {m['flip_vs_gap']['correlation']['r']}; "
          f"passed: {m['passed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
