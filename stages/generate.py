"""generate: sample one base mesh set (params generate.sets.<name>) and score it with the oracle."""
from __future__ import annotations

import _stage_env  # noqa: F401  (first: checks the venv, pins CPU numerics before torch)

import argparse

import torch

from judge3d.core.config import load_params, require
from judge3d.generators.base import params_device
from judge3d.pipeline.mesh_sets import generate_set, plan_set
from judge3d.pipeline.generator_replica import GeneratorReplica
from judge3d.core.io import read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", required=True, help="a key of generate.sets in params.yaml")
    ap.add_argument("--model", default="models/base", help="generator folder (pretrain-base)")
    ap.add_argument("--world", default="data/world/manifest.jsonl", help="world manifest (data stage)")
    ap.add_argument("--degraded-dir", default="data/degraded", help="degrade stage output root")
    ap.add_argument("--out-root", default="data/generated", help="sets go to <out-root>/<set>/")
    ap.add_argument("--device", default=None, help="generator device (default: params base.device)")
    args = ap.parse_args()
    params = load_params()
    threads = require(params, "generate.threads", int, check=lambda v: v > 0)
    torch.set_num_threads(threads)
    batch = require(params, "generate.batch_size", int, check=lambda v: v > 0)
    jobs = plan_set(params, args.set, read_jsonl(args.world), args.degraded_dir)
    # Loaded here, or on Ray replicas with JUDGE3D_EXECUTOR=ray (same rows and files).
    gen = GeneratorReplica(args.model, args.device or params_device(params), threads, require(params, "seed", int))
    generate_set(gen, jobs, f"{args.out_root}/{args.set}", params, batch_size=batch, set_name=args.set)


if __name__ == "__main__":
    main()
