"""Which levers make the tiny judges see visible defects: a sweep of judge-training settings, each
judge scored on clear pairs of its OWN held-out objects (never on the study's held-out split).

Each configuration overrides params (``judges.training.*``, ``judges.tiny.<arch>.*``) and may read
montages rendered at another size (``--montages-root``, a folder with judge_train/ and judge_eval/
render-stage outputs). Both judges (Qwen2.5-VL on judge_train, InternVL on judge_eval) train from
scratch through the pipeline's own ``judges.train.train_judge`` (not saved), and the script prints
held-out clear strict win, decisive, flip rate and judge–oracle agreement per run, with the baseline
(params as they are) measured in the same run.

Runs are independent processes (``--jobs`` at a time), so on a GPU several tiny judges share it. The
numbers on a GPU differ from the pipeline's CPU numbers in the last bits, and from-scratch training
amplifies that; use the sweep to rank levers, then measure the chosen one on the CPU.

    python benchmarks/judge_sweep.py --device cuda --jobs 6 --out benchmarks/results/judge_sweep_h200.txt

Training from scratch is chaotic: the same configuration moves by up to 0.37 in held-out clear
strict between training seeds (``--seeds``), so rank levers by their mean and worst seed, never by one
run. On a GPU the judges need the pinned transformers (5.23): with the image's 5.17 every judge's loss
stayed at ln 2 (benchmarks/results/judge_sweep_h200.txt says how the pinned wheel was carried).
On the CPU (``--device cpu``) the script pins the pipeline's numerics, so a run reproduces what
``pretrain-judges`` would train.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

EXTRA_OBJECTS = "+other_judge_objects"  # not a params key: train on the other judge's objects as well
# name -> (overrides of params, montage size folder or None for data/montages)
CONFIGS: dict[str, tuple[dict, str | None]] = {
    "baseline": ({}, None),
    "steps1500": ({"judges.training.steps": 1500}, None),
    "steps3000": ({"judges.training.steps": 3000}, None),
    "steps5000": ({"judges.training.steps": 5000}, None),
    "img224": ({"judges.tiny.*.image_size": 224}, "256"),
    "img224_steps1500": ({"judges.tiny.*.image_size": 224, "judges.training.steps": 1500}, "256"),
    "wide_steps1500": ({"judges.tiny.*.lm.hidden": 384, "judges.tiny.*.lm.intermediate": 1024,
                        "judges.tiny.*.vision.hidden": 256, "judges.tiny.*.vision.intermediate": 512,
                        "judges.training.steps": 1500}, None),
    "img224_wide_steps1500": ({"judges.tiny.*.image_size": 224, "judges.tiny.*.lm.hidden": 384,
                               "judges.tiny.*.lm.intermediate": 1024, "judges.tiny.*.vision.hidden": 256,
                               "judges.tiny.*.vision.intermediate": 512, "judges.training.steps": 1500}, "256"),
    "batch32_steps1500": ({"judges.training.batch_size": 32, "judges.training.steps": 1500}, None),
    "lr3e-3_steps1500": ({"judges.training.lr": 3e-3, "judges.training.steps": 1500}, None),
    "lr5e-4_steps1500": ({"judges.training.lr": 5e-4, "judges.training.steps": 1500}, None),
    "img224_steps3000": ({"judges.tiny.*.image_size": 224, "judges.training.steps": 3000}, "256"),
    "pairs80_steps1500": ({"judges.training.max_pairs_per_object": 80, "judges.training.steps": 1500}, None),
    "lr5e-4": ({"judges.training.lr": 5e-4}, None),
    "warmup100": ({"judges.training.warmup_steps": 100}, None),
    "batch32": ({"judges.training.batch_size": 32}, None),
    "lr3e-4": ({"judges.training.lr": 3e-4}, None),
    "lr2e-4": ({"judges.training.lr": 2e-4}, None),
    "lr5e-4_batch32": ({"judges.training.lr": 5e-4, "judges.training.batch_size": 32}, None),
    "lr5e-4_warmup100": ({"judges.training.lr": 5e-4, "judges.training.warmup_steps": 100}, None),
    "lr5e-4_steps900": ({"judges.training.lr": 5e-4, "judges.training.steps": 900}, None),
    "lr3e-4_steps900": ({"judges.training.lr": 3e-4, "judges.training.steps": 900}, None),
    # twice the training objects: the other judge's whole object set joins the training pairs (its
    # held-out objects and pairs stay the same), i.e. what doubling world.n_judge_<role> would buy
    "objects2x": ({EXTRA_OBJECTS: True}, None),
    "lr5e-4_objects2x": ({"judges.training.lr": 5e-4, EXTRA_OBJECTS: True}, None),
}
ROLES = {"train": ("qwen2_5_vl", "judge_train"), "eval": ("internvl", "judge_eval")}


def _set(params: dict, dotted: str, value, arch: str) -> None:
    node = params
    parts = [arch if p == "*" else p for p in dotted.split(".")]
    for p in parts[:-1]:
        node = node[p]
    if parts[-1] not in node:
        raise KeyError(f"override {dotted}: no such key in params.yaml")
    node[parts[-1]] = value


def run_one(job: tuple[str, str, str, str, int, int, int | None]) -> dict:
    name, role, device, montages_root, torch_threads, steps, train_seed = job
    import torch

    torch.set_num_threads(torch_threads)
    from judge3d.core.config import load_params
    from judge3d.core.io import read_jsonl
    from judge3d.judges.tiny import TinySizes
    from judge3d.judges.train import TrainConfig, train_judge

    overrides, size = CONFIGS[name]
    arch, split = ROLES[role]
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    for key, value in overrides.items():
        if key != EXTRA_OBJECTS:
            _set(params, key, value, arch)
    if train_seed is not None:
        params["train_seed"] = train_seed
    if steps:
        params["judges"]["training"].update(steps=steps, curriculum_steps=min(steps, 1), warmup_steps=min(steps, 1))
    def candidates(split: str) -> list[dict]:
        manifest = Path(montages_root if size else "data/montages") / (size or "") / split / "manifest.jsonl"
        return [r for r in read_jsonl(REPO / manifest) if r.get("split", split) == split]

    rows = candidates(split)
    other_split = next(s for r, (_, s) in ROLES.items() if r != role)
    extra = candidates(other_split) if overrides.get(EXTRA_OBJECTS) else []
    cfg = TrainConfig.from_params(params["judges"]["training"], params["train_seed"])
    sizes = TinySizes.from_params(params["judges"]["tiny"][arch])
    t0 = time.time()
    summary = train_judge(arch, sizes, rows, REPO / ".sweep" / "judges" / f"{name}_{role}_s{cfg.seed}", params["judge"]["prompt"],
                          cfg, name=f"{name}/{role}", root=REPO, device=device, save=False,
                          extra_train_candidates=extra)
    return {"config": name, "role": role, "arch": arch, "steps": cfg.steps, "train_seed": cfg.seed, "n_params": summary["n_params"],
            "n_train_pairs": summary["n_train_pairs"], "wall_s": round(time.time() - t0, 1),
            "heldout": summary["heldout"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per job")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--roles", default="train,eval", help="which judges (train = Qwen2.5-VL, eval = InternVL)")
    ap.add_argument("--montages-root", default=".sweep/montages", help="holds <size>/judge_{train,eval}/")
    ap.add_argument("--steps", type=int, default=0, help="override every config's steps (a smoke test of the script)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated train_seed values, each config run once per seed (default: params' train_seed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.chdir(REPO)
    if args.device == "cpu":
        # before any worker imports torch: the pipeline's CPU numerics (judge3d.core.numerics)
        from judge3d.core.numerics import pin_cpu_numerics

        pin_cpu_numerics()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    jobs = [(name, role, args.device, args.montages_root, args.threads, args.steps, seed)
            for seed in seeds for name in args.configs.split(",") for role in args.roles.split(",")]
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    # results as they finish (a run cut short by a time limit keeps every finished line)
    with ProcessPoolExecutor(args.jobs) as pool:
        for fut in as_completed([pool.submit(run_one, job) for job in jobs]):
            res = fut.result()
            c = res["heldout"].get("clear", {})
            print(f"{res['config']:24s} {res['role']:5s} seed {res['train_seed']} steps {res['steps']:5d} params {res['n_params'] / 1e6:5.2f}M "
                  f"clear strict {c.get('strict')} {c.get('strict_wilson_ci')} decisive {c.get('decisive')} "
                  f"flip {c.get('flip_rate')} oracle-agree {c.get('judge_oracle_agreement')} "
                  f"(n {c.get('n')}) {res['wall_s']} s", flush=True)
            if out:
                with out.open("a") as fh:
                    fh.write(json.dumps(res, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
