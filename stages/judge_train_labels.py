"""Stage `judge-train-labels`: the training judge labels every (high, low) train pair in both orders,
keeps the swap-consistent ones for the arms, and judges the i.i.d. pairs (flip-rate readout).

Outputs: <out-dir>/verdicts.jsonl and iid_verdicts.jsonl (raw logs; a rerun asks only unlogged
queries), <out-dir>/train_pairs.jsonl (winner/loser rows), and the metrics JSON.
Params: labels.*, judge.*, judges.train.model.
"""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--montages", default="data/montages/train/manifest.jsonl",
                        help="montage manifest of the train mesh set (render stage)")
    parser.add_argument("--judge", default=None, help="training judge dir or hub id (default: params judges.train.model)")
    parser.add_argument("--out-dir", default="data/labels")
    parser.add_argument("--metrics", default="metrics/labels.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from judge3d.core.config import load_params, require
    from judge3d.judges.references import judge_prompt
    from judge3d.pipeline.judging import load_judge, run_judge_train_labels
    from judge3d.core.seeding import seed_everything

    params = load_params()
    seed_everything(require(params, "seed", int))
    prompt = judge_prompt(params, "train")
    judge = load_judge(params, "train", args.judge)
    m = run_judge_train_labels(judge, args.montages, args.out_dir, args.metrics, params, prompt,
                               show_progress=not args.no_progress)
    print(f"judge-train-labels [{m['judge_id']}]: strict high>low {m['strict_win_high_over_low']} "
          f"wilson {m['strict_wilson_ci']} (seed 0.89); kept {m['pairs_kept']}/{m['n']} "
          f"({m['pairs_kept_low_wins']} prefer low); i.i.d. flip {m['iid_flip_rate']} {m['iid_flip_rate_ci']} "
          f"over {m['iid_n']} pairs (seed 0.94); prefer-first {m['prefer_first_rate']}; "
          f"judge-oracle agreement {m['judge_oracle_agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
