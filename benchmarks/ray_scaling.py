"""Judging throughput through the Ray executor on 1 and on N GPUs of one host, in one run, against the
in-process judge on one GPU as the baseline.

The judge is the full-size Qwen2.5-VL-7B architecture (public config values) with random weights,
bf16, saved as a judge folder the way a user's checkpoint is (safetensors, tokenizer, processor
files; built in a child process, so this driver never holds a GPU), then judged through the real
path: ``run_pairs`` (the swap protocol, both orders a pair) over ``load_judge``, which gives the
in-process ``HFJudge`` or, with ``JUDGE3D_EXECUTOR=ray``, a ``RayJudge`` whose replicas each load the
folder on their own GPU. Montages are 504x504 PNGs (two per query), as in
``benchmarks/judge_throughput.py --full``.

Reported per run: wall time of the whole judging call (replicas' model load included), the time to
the first answered batch, and the steady throughput after it (pairs/s from the arrival times of the
batches at the driver); the speed-up of N GPUs over 1 through Ray, and whether every run's verdict log
is byte-identical to the in-process one. Then what would limit 8 GPUs and a cluster, from the measured
per-item costs (driver-side log writes, the work items' size, model load).

Needs: CUDA GPUs, ray[data].

    python benchmarks/ray_scaling.py --gpus 1,2 --pairs 640 --out benchmarks/results/ray_scaling_h200x2.txt
    python benchmarks/ray_scaling.py --smoke     # CPU: 2 LM layers / 2 vision blocks, 2 CPU replicas
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "A: <image1> B: <image2> Better 3D shape: A or B?"


def build_judge_folder(out: Path, layers: int | None, device: str) -> None:
    """The full-size (or --smoke) random-weight judge saved as a loadable judge folder."""
    import torch

    from judge_throughput import build_full_judge

    from judge3d.judges.tiny import _write_processor_files

    t0 = time.time()
    judge = build_full_judge("qwen2_5_vl", layers, device, "bfloat16", "sdpa", batch_size=16)
    out.mkdir(parents=True, exist_ok=True)
    judge.model.save_pretrained(out, safe_serialization=True)
    judge.tokenizer.save_pretrained(out)
    _write_processor_files(out, "qwen2_5_vl", judge.tokenizer, judge.processor.image_processor, None)
    n = sum(p.numel() for p in judge.model.parameters())
    del judge
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"built and saved qwen2_5_vl ({n / 1e6:.0f}M params, bf16) to {out} in {time.time() - t0:.1f} s", flush=True)


def montage_files(folder: Path, n: int, size: int) -> list[str]:
    from judge_throughput import montages

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(montages(n, size)):
        path = folder / f"m{i:04d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


class _Timed:
    """Wraps a judge backend: records when each batch's answers reach the driver."""

    def __init__(self, backend):
        self.backend, self.judge_id, self.arrivals = backend, backend.judge_id, []

    def p_first(self, queries, prompt):
        out = self.backend.p_first(queries, prompt)
        self.arrivals.append((time.perf_counter(), len(queries)))
        return out

    def p_first_stream(self, batches, prompt, labels=None):
        from judge3d.judges.protocol import answer_stream

        labels = labels if labels is not None else [f"batch {i}" for i in range(len(batches))]
        for batch, out in zip(batches, answer_stream(self.backend, batches, prompt, labels)):
            self.arrivals.append((time.perf_counter(), len(batch)))
            yield out


def steady_rate(arrivals: list[float], sizes: list[float], replicas: int) -> float:
    """Units per second once every replica works: the least-squares slope of the cumulative units
    against arrival time, over the items from the end of the first round (item ``replicas - 1``) on.
    Results come in input order and Ray Data hands them over in clumps (items 0..N-1 together, and
    often the last two), so a rate from two end points would credit clumped items to a span that did
    not produce them; the fit weighs every arrival alike."""
    if len(arrivals) <= replicas:
        return float("nan")
    cumulative = np.cumsum(sizes)
    return float(np.polyfit(np.asarray(arrivals[replicas - 1:]), cumulative[replicas - 1:], 1)[0])


def recompute(log: Path) -> None:
    """Steady rates from a run's printed arrival times (the lines 'arrivals (s after the call), ...')."""
    import ast
    import re

    rates = {}
    for line in log.read_text().splitlines():
        m = re.match(r"arrivals \(s after the call\), (.*?): (\[.*\]) \((\d+(?:\.\d+)?) units an item\)", line)
        if m:
            arrivals = ast.literal_eval(m.group(2))
            replicas = 1 if m.group(1) == "in-process" else int(m.group(1).split()[0])
            rate = steady_rate(arrivals, [float(m.group(3))] * len(arrivals), replicas)
            print(f"{m.group(1)}: steady {rate:.2f} units/s over {len(arrivals)} items")
            if m.group(1) != "in-process":
                rates[replicas] = rate
    if len(rates) > 1:
        top = max(rates)
        print(f"speed-up, {top} vs 1 replica(s) through Ray, steady: {rates[top] / rates[1]:.2f}x")


def judge_run(params: dict, pairs, log: Path, run_batch: int, replicas: int) -> dict:
    from judge3d.core.resume import AnswerCache
    from judge3d.judges.protocol import run_pairs
    from judge3d.pipeline.judging import load_judge

    import shutil

    shutil.rmtree(log.parent, ignore_errors=True)  # a fresh log and answer cache: every query is asked
    t0 = time.perf_counter()
    judge = _Timed(load_judge(params, "eval"))
    t_loaded = time.perf_counter()
    run_pairs(judge, pairs, log, PROMPT, run_batch, show_progress=False, answer_cache=AnswerCache(log.parent / "cache"))
    t1 = time.perf_counter()
    arrivals = judge.arrivals
    first_t = arrivals[0][0]
    steady = steady_rate([t for t, _ in arrivals], [n / 2 for _, n in arrivals], replicas)
    return {"arrivals_s": [round(t - t0, 2) for t, _ in arrivals], "wall_s": t1 - t0, "driver_load_s": t_loaded - t0, "first_batch_s": first_t - t0,
            "steady_pairs_per_s": steady, "pairs_per_s_wall": len(pairs) / (t1 - t0), "judge": judge.backend}


def driver_costs(log: Path, pairs, run_batch: int) -> dict:
    """Per-item costs on the driver: appending one verdict row, and one work item's pickled size."""
    from judge3d.core.io import JsonlAppender, read_jsonl

    rows = read_jsonl(log)
    tmp = log.with_name("append_cost.jsonl")
    t0 = time.perf_counter()
    with JsonlAppender(tmp) as sink:
        for row in rows:
            sink.append(row)
    per_row = (time.perf_counter() - t0) / len(rows)
    item = [(p.x, p.y) for p in pairs[: run_batch // 2] for _ in range(2)]
    return {"append_row_s": per_row, "work_item_bytes": len(pickle.dumps(item)),
            "image_bytes": os.path.getsize(pairs[0].x)}


class TrellisStructureReplica:
    """Ray work-item factory for ``--trellis``: a replica builds TRELLIS-image-large's sparse-structure
    flow and decoder from TRELLIS's configs (random weights, seeded, so every replica holds the same
    model; ``benchmarks/trellis_sampling.build_models``) on its GPU, and samples one batch of seeds a
    call at the high budget (25 steps, CFG 7.5), returning each sample's occupied voxels."""

    def __init__(self, tokens: int = 1374):
        self.tokens = tokens

    def __call__(self):
        import torch
        import trellis_stand_ins
        from trellis_sampling import PIPELINE_ARGS, build_models

        from judge3d.generators.stages import StageSampler
        from judge3d.generators.trellis import SS_STAGE, TrellisGenerator
        from judge3d.generators.trellis_import import import_trellis

        trellis_stand_ins.install()
        trellis = import_trellis()
        models, configs = build_models(trellis, Path(os.environ["JUDGE3D_TRELLIS_SRC"]), tiny=False)
        gen = TrellisGenerator(trellis, models, configs, PIPELINE_ARGS, device="cuda")
        stage = gen.stage(SS_STAGE)
        p = PIPELINE_ARGS["sparse_structure_sampler"]["params"]
        settings = StageSampler(steps=p["steps"], cfg_strength=p["cfg_strength"], cfg_interval=tuple(p["cfg_interval"]),
                                rescale_t=p["rescale_t"])

        def sample(seeds):
            # conditioning: seeded random tokens of DINOv2's shape at 518 px, one draw per sample
            cond = torch.stack([torch.randn(self.tokens, gen.cond_channels, generator=torch.Generator().manual_seed(s))
                                for s in seeds]).to("cuda")
            z = stage.sample(stage.noise(list(seeds)).to("cuda"), cond, torch.zeros_like(cond), settings)
            coords = gen.structure_coords(z).cpu()
            return [coords[coords[:, 0] == i, 1:].numpy() for i in range(len(seeds))]
        return sample


def trellis_scaling(args, say) -> None:
    """Sparse-structure sampling of ``--samples`` seeds in batches of ``--trellis-batch`` through the Ray
    executor on 1..N GPUs: steady samples/s, and whether every run gives the same voxels."""
    from judge3d.core.ray_executor import ACTORS_ENV, CPUS_ENV, GPUS_ENV, ordered_map

    seeds = list(range(args.samples))
    items = [seeds[i:i + args.trellis_batch] for i in range(0, len(seeds), args.trellis_batch)]
    say(f"\n## TRELLIS sparse-structure sampling through the Ray executor (high budget: 25 steps, CFG 7.5; "
        f"{args.samples} samples in work items of {args.trellis_batch}; flow + decoder to voxels)")
    say("| replicas (GPUs) | wall s (build incl.) | first item s | steady samples/s (after the first round) | voxels = 1-replica run |")
    say("|---|---|---|---|---|")
    os.environ.update({GPUS_ENV: "1", CPUS_ENV: "1"})
    reference, rates = None, {}
    for n in [int(x) for x in args.gpus.split(",")]:
        os.environ[ACTORS_ENV] = str(n)
        t0 = time.perf_counter()
        arrivals, voxels = [], []
        for out in ordered_map(TrellisStructureReplica(), items, [f"seeds {b[0]}..{b[-1]}" for b in items],
                               what="TRELLIS sparse structure"):
            arrivals.append(time.perf_counter())
            voxels.extend(out)
        wall = time.perf_counter() - t0
        steady = steady_rate(arrivals, [len(b) for b in items], n)
        rates[n] = steady
        digest = [v.tobytes() for v in voxels]
        same = "reference" if reference is None else ("yes" if digest == reference else "NO")
        reference = reference or digest
        say(f"| {n} | {wall:.1f} | {arrivals[0] - t0:.1f} | {steady:.2f} | {same} |")
        print(f"arrivals (s after the call), {n} replica(s): {[round(t - t0, 1) for t in arrivals]} "
              f"({args.trellis_batch} units an item)", flush=True)
    counts = sorted(rates)
    if len(counts) > 1:
        say(f"\nspeed-up, {counts[-1]} vs {counts[0]} replica(s), steady: {rates[counts[-1]] / rates[counts[0]]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2", help="replica counts to run through Ray, one GPU each")
    ap.add_argument("--pairs", type=int, default=640)
    ap.add_argument("--images", type=int, default=256, help="distinct montages the pairs are drawn from")
    ap.add_argument("--size", type=int, default=504)
    ap.add_argument("--run-batch", type=int, default=32, help="queries per work item (params calibrate.batch_size)")
    ap.add_argument("--judge-batch", type=int, default=16, help="queries per forward (params judge.batch_size)")
    ap.add_argument("--work-dir", default="/tmp/judge3d_ray_scaling")
    ap.add_argument("--smoke", action="store_true", help="CPU: 2-layer model, CPU replicas, few pairs")
    ap.add_argument("--trellis", action="store_true", help="also TRELLIS sparse-structure sampling on 1..N GPUs "
                    "(needs JUDGE3D_TRELLIS_SRC, spconv, and benchmarks/ + tests/ on PYTHONPATH for the workers)")
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--trellis-batch", type=int, default=16)
    ap.add_argument("--skip-judge", action="store_true")
    ap.add_argument("--recompute", default=None, metavar="LOG", help="print the steady rates from a run's log")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.recompute:
        recompute(Path(args.recompute))
        return
    if args.build_only:
        build_judge_folder(Path(args.build_only), 2 if args.smoke else None, "cpu" if args.smoke else "cuda")
        return

    lines = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    if not args.skip_judge:
        judge_scaling(args, say)
    if args.trellis:
        trellis_scaling(args, say)


def judge_scaling(args, say) -> None:
    from judge3d.core.ray_executor import ACTORS_ENV, CPUS_ENV, EXECUTOR_ENV, GPUS_ENV
    from judge3d.judges.protocol import Pair

    work = Path(args.work_dir)
    folder = work / "qwen2_5_vl_7b_random"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build-only", str(folder)] + (["--smoke"] if args.smoke else []),
                       check=True)
    images = montage_files(work / "montages", args.images, args.size)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(args.pairs):
        a, b = rng.choice(len(images), size=2, replace=False)
        pairs.append(Pair(f"p{i:05d}", f"o{i % 64:03d}", images[a], images[b]))
    device = "cpu" if args.smoke else "cuda"
    params = {"seed": 0, "judges": {"eval": {"model": str(folder)}},
              "judge": {"dtype": "bfloat16", "device": device, "attn_implementation": "sdpa",
                        "batch_size": args.judge_batch, "servers": {"eval": None}}}
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    say(f"# judging through the Ray executor: full-size Qwen2.5-VL-7B architecture, random weights, bf16, "
        f"{'smoke (2 layers)' if args.smoke else 'full depth'}; {gpu} x {torch.cuda.device_count()}; "
        f"{args.pairs} pairs (both orders: {2 * args.pairs} queries), {args.size}x{args.size} montages, "
        f"{args.run_batch} queries a work item, {args.judge_batch} a forward")
    say("| run | GPUs | wall s (load incl.) | first batch s | steady pairs/s (after the first round) | pairs/s over the wall | log = in-process |")
    say("|---|---|---|---|---|---|---|")
    results = {}
    os.environ[EXECUTOR_ENV] = "local"
    base = judge_run(params, pairs, work / "local" / "verdicts.jsonl", args.run_batch, 1)
    del base["judge"]
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"arrivals (s after the call), in-process: {base['arrivals_s']} ({args.run_batch / 2:g} units an item)", flush=True)
    reference = (work / "local" / "verdicts.jsonl").read_bytes()
    say(f"| in-process (baseline) | 1 | {base['wall_s']:.1f} | {base['first_batch_s']:.1f} | "
        f"{base['steady_pairs_per_s']:.2f} | {base['pairs_per_s_wall']:.2f} | yes |")
    os.environ.update({EXECUTOR_ENV: "ray", GPUS_ENV: "0" if args.smoke else "1", CPUS_ENV: "1"})
    for n in [int(x) for x in args.gpus.split(",")]:
        os.environ[ACTORS_ENV] = str(n)
        log = work / f"ray{n}" / "verdicts.jsonl"
        r = judge_run(params, pairs, log, args.run_batch, n)
        del r["judge"]
        results[n] = r
        print(f"arrivals (s after the call), {n} replica(s): {r['arrivals_s']} ({args.run_batch / 2:g} units an item)", flush=True)
        same = log.read_bytes() == reference
        if not same:
            a = [json.loads(x)["p_first"] for x in reference.splitlines()]
            b = [json.loads(x)["p_first"] for x in log.read_bytes().splitlines()]
            same = f"no: max |dp| {max(abs(x - y) for x, y in zip(a, b)):.2e}"
        say(f"| Ray, {n} replica(s) | {n if not args.smoke else 0} | {r['wall_s']:.1f} | {r['first_batch_s']:.1f} | "
            f"{r['steady_pairs_per_s']:.2f} | {r['pairs_per_s_wall']:.2f} | {'yes' if same is True else same} |")
    counts = sorted(results)
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        say(f"\nspeed-up, {hi} vs {lo} replica(s) through Ray: steady {results[hi]['steady_pairs_per_s'] / results[lo]['steady_pairs_per_s']:.2f}x, "
            f"over the wall {results[hi]['pairs_per_s_wall'] / results[lo]['pairs_per_s_wall']:.2f}x "
            f"(goal >= 1.8x at 2); Ray 1 replica vs in-process, steady: "
            f"{results[lo]['steady_pairs_per_s'] / base['steady_pairs_per_s']:.2f}x")
    costs = driver_costs(work / "local" / "verdicts.jsonl", pairs, args.run_batch)
    per_gpu = results[counts[0]]["steady_pairs_per_s"] / counts[0]
    if not np.isfinite(per_gpu):
        per_gpu = results[counts[0]]["pairs_per_s_wall"] / counts[0]  # one work item only: no steady rate
    load_s = results[counts[-1]]["first_batch_s"]
    say(f"\n## what would limit 8 GPUs and a cluster (from the per-item costs measured above)")
    say(f"- driver-side log writes: {costs['append_row_s'] * 1e6:.0f} us a verdict row, 2 rows a pair -> the driver "
        f"alone writes {1 / (2 * costs['append_row_s']):.0f} pairs/s; 8 GPUs at {per_gpu:.1f} pairs/s each need "
        f"{8 * per_gpu:.0f} pairs/s ({100 * 8 * per_gpu * 2 * costs['append_row_s']:.1f}% of one driver core)")
    say(f"- image transfer: a work item carries paths ({costs['work_item_bytes']} bytes for {args.run_batch} queries); "
        f"each replica reads its montages itself ({costs['image_bytes'] / 1e3:.0f} kB a PNG): at 8 GPUs, "
        f"{8 * per_gpu * 2 * costs['image_bytes'] / 1e6:.1f} MB/s of montage reads from the shared filesystem")
    say(f"- model load: the first batch arrives {load_s:.0f} s after the call (every replica loads the folder at once); "
        f"a stage of P pairs on G GPUs takes about {load_s:.0f} s + P / ({per_gpu:.1f} G) s: on 8 GPUs the load "
        f"stays under half the wall time from about {int(load_s * per_gpu * 8)} pairs a stage")


if __name__ == "__main__":
    main()
