"""Where one batch of the full-size judge path spends its time (GPU): CPU image prep, vision tower,
input ids + positions, LM forward; then a torch.profiler table. Used to pick what to optimise."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from judge_throughput import FULL_PROMPT, build_full_judge, montages  # noqa: E402


def timed(fn, n=3):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3, out


def main():
    archs = sys.argv[1].split(",") if len(sys.argv) > 1 else ["qwen2_5_vl", "internvl"]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    for arch in archs:
        judge = build_full_judge(arch, None, "cuda", "bfloat16", "sdpa", batch)
        ims = montages(batch, 504)
        pairs = [(ims[2 * i], ims[2 * i + 1]) for i in range(batch // 2)]
        queries = [q for x, y in pairs for q in ((x, y), (y, x))]
        with torch.inference_mode():
            t_prep, prepared = timed(lambda: judge.prepare_images(ims))
            qidx = [(2 * i, 2 * i + 1) for i in range(batch // 2)]
            qidx = [q for a, b in qidx for q in ((a, b), (b, a))]
            res = {}
            for grouped in ([False, True] if arch == "qwen2_5_vl" else [False]):
                judge.arch.grouped_attention = judge.arch.pad_mlp = grouped
                res[grouped] = timed(lambda: judge.arch.encode(prepared))
            t_enc, feats = res[False]
            if arch == "qwen2_5_vl":
                d = max((a.float() - b.float()).abs().max().item() for a, b in zip(res[False][1], res[True][1]))
                print(f"[{arch}] vision stock {res[False][0]:.1f} ms, grouped attention + padded MLP {res[True][0]:.1f} ms, max|diff| {d:.3g}")
            judge.arch.grouped_attention = judge.arch.pad_mlp = True
            t_lm, _ = timed(lambda: judge.query_logits(prepared, qidx, FULL_PROMPT, features=feats))
            t_all, _ = timed(lambda: judge.p_first(queries, FULL_PROMPT), n=2)
            print(f"[{arch}] batch {batch} queries ({batch // 2} pairs, {batch} images): prep {t_prep:.1f} ms, "
                  f"vision {t_enc:.1f} ms, ids+LM {t_lm:.1f} ms, whole p_first {t_all:.1f} ms "
                  f"= {batch / 2 / t_all * 1e3:.2f} pairs/s")
            from torch.profiler import ProfilerActivity, profile
            for what, fn in (("vision", lambda: judge.arch.encode(prepared)),
                             ("ids+LM", lambda: judge.query_logits(prepared, qidx, FULL_PROMPT, features=feats))):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                print(f"[{arch}] profile of {what}")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
        del judge
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
