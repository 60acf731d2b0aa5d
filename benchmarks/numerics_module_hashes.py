"""Where do two CPUs part ways? Hashes of single GEMM shapes, of every module output in one forward of
the tiny Qwen2.5-VL judge, and of every parameter gradient after one backward of the mini generator.

Run it on two machines with the same software and compare the JSON files key by key; the first module
(in execution order) whose hash differs names the op. Used to find why ``MKL_CBWR=AVX2,STRICT`` trains
differently on an AMD EPYC and an Intel Xeon (``results/numerics_cpu_comparison.txt``):

    PYTHONPATH=src python benchmarks/numerics_module_hashes.py OUT.json [MKL_CBWR value]

The CPU numerics are pinned as the stages pin them; the optional second argument overrides MKL_CBWR.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "src", REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.append(str(path))


def main() -> None:
    from judge3d.core.numerics import pin_cpu_numerics

    pin_cpu_numerics()
    if len(sys.argv) > 2:
        os.environ["MKL_CBWR"] = sys.argv[2]
    import torch

    from numerics import mini_problem, qwen_problem  # benchmarks/numerics.py: the same models and data

    torch.set_num_threads(2)

    def sha(t) -> str:
        return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:12]

    out: dict[str, str] = {}
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    gemms = {
        "mm_k1": (r(3, 32, 1), r(3, 1, 90)),
        "mm_small": (r(7, 16), r(16, 9)),
        "mm_4d_qk": (r(4, 2, 100, 16), r(4, 2, 100, 16).transpose(-1, -2)),
        "mm_4d_pv": (torch.softmax(r(4, 2, 100, 100), -1), r(4, 2, 100, 16)),
        "mm_4d_big": (r(8, 4, 512, 32), r(8, 4, 512, 32).transpose(-1, -2)),
        "mm_T_left": (r(2, 100, 64).transpose(-1, -2), r(2, 100, 48)),
        "mm_T_both": (r(2, 64, 100).transpose(-1, -2), r(2, 48, 64).transpose(-1, -2)),
    }
    for name, (a, b) in gemms.items():
        out[name] = sha(a @ b)
    w, bias = r(96, 64), r(96)
    out["linear_small"] = sha(torch.nn.functional.linear(r(5, 37, 64), w, bias))
    out["linear_1row"] = sha(torch.nn.functional.linear(r(1, 64), w, bias))
    out["linear_T_in"] = sha(torch.nn.functional.linear(r(64, 37).t(), w, bias))

    # tiny Qwen2.5-VL: every module's first output in one forward of numerics.py's first qwen batch
    model, data, loss_of = qwen_problem(torch, 1)
    seen: dict[str, str] = {}

    def hook(name):
        def record(_module, _inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            t = getattr(t, "last_hidden_state", t)
            if torch.is_tensor(t) and name not in seen:
                seen[name] = sha(t)
        return record

    handles = [m.register_forward_hook(hook(f"qwen2_5_vl.{n}")) for n, m in model.named_modules() if n]
    with torch.no_grad():
        loss_of(*data[0])
    for h in handles:
        h.remove()
    out.update(seen)

    # mini generator: every parameter's gradient after one backward of numerics.py's first mini batch
    model, data, loss_of = mini_problem(torch, 1)
    loss_of(*data[0]).backward()
    for n, p in model.named_parameters():
        out[f"mini.grad.{n}"] = sha(p.grad)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=0, sort_keys=True))
    print(f"wrote {len(out)} hashes to {sys.argv[1]}")


if __name__ == "__main__":
    main()
