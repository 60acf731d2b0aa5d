"""judge-candidates@<split>: the pretraining candidates of one tiny judge (mini profile only).

Ground truth + seeded corruptions + base-generator samples (generate@<split>) of the judge's own
objects, all scored by the ground-truth oracle. Output: data/judge_candidates/<split>/ (meshes +
manifest.jsonl), rendered next by render@<split>.
"""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, choices=["judge_train", "judge_eval"])
    parser.add_argument("--world", default="data/world/manifest.jsonl")
    parser.add_argument("--generated", default=None, help="default: data/generated/<split>/manifest.jsonl")
    parser.add_argument("--out-dir", default=None, help="default: data/judge_candidates/<split>")
    args = parser.parse_args(argv)

    from judge3d.core.config import load_params
    from judge3d.core.io import read_jsonl
    from judge3d.judges.candidates import build_candidates

    params = load_params()
    generated = read_jsonl(args.generated or f"data/generated/{args.split}/manifest.jsonl")
    rows = build_candidates(args.split, read_jsonl(args.world), generated,
                            args.out_dir or f"data/judge_candidates/{args.split}", params)
    n_obj = len({r["object_id"] for r in rows})
    print(f"judge-candidates {args.split}: {len(rows)} candidates over {n_obj} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
