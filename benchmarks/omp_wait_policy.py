"""How OpenMP's idle-thread waiting affects torch training on a shared 2-core CPU.

Each stage runs torch with 2 intra-op threads (the pinned CPU numerics). After every parallel region
libgomp lets an idle thread spin (300,000 rounds by default) before it sleeps. Alone, that saves a
wake-up per op; when another process needs the core (a second test worker, `dvc queue start -j 2`,
a stage's own process pool), the spinning steals it.

This runs the mini generator's training (``benchmarks/numerics.py``'s ``mini`` child at the pinned
numerics: the project's ViT conditioner and DiT flow, AdamW fused) one at a time and two side by side,
under each waiting policy, and prints steps/s and the final-weight fingerprints, which must not
depend on the policy (waiting changes no arithmetic).

    python benchmarks/omp_wait_policy.py [--steps 15] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# default: neither variable set (libgomp spins 300,000 rounds); the others bound or remove the spin
POLICIES = {"default (spin)": {}, "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
RESULT = re.compile(r"\[0\] pinned_fused: mini (\w+) ([\d.]+) it/s")


def one_training(policy_env: dict[str, str], steps: int) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy_env)
    env["PYTHONPATH"] = str(REPO / "src")
    cmd = [sys.executable, str(REPO / "benchmarks" / "numerics.py"), "--configs", "pinned_fused", "--no-qwen",
           "--mini-steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    match = RESULT.search(out)
    if match is None:
        raise SystemExit(f"no result line from {' '.join(cmd)}:\n{out[-2000:]}")
    return match.group(1), float(match.group(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()} | mini generator training, {args.steps} steps, pinned numerics, 2 threads each")
    print(f"{'policy':26s} {'alone it/s':>12s} {'2 side by side, it/s each':>28s}  fingerprints")
    fingerprints: set[str] = set()
    for name, policy_env in POLICIES.items():
        alone, pair = [], []
        for _ in range(args.repeats):
            fp, rate = one_training(policy_env, args.steps)
            alone.append(rate)
            fingerprints.add(fp)
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda _: one_training(policy_env, args.steps), range(2)))
            pair += [rate for _, rate in results]
            fingerprints.update(fp for fp, _ in results)
        print(f"{name:26s} {min(alone):5.2f}-{max(alone):<5.2f}  {min(pair):13.2f}-{max(pair):<13.2f}  "
              f"{len(fingerprints)} distinct so far")
    print("weights identical under every policy:", "yes" if len(fingerprints) == 1 else f"NO {sorted(fingerprints)}")
    return 0 if len(fingerprints) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
