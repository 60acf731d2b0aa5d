"""Pinned CPU numerics, so trained models and every number downstream rebuild bit for bit on any
x86-64 machine, not only on the one that made them.

Why: CPU float kernels differ between processors. ATen picks AVX-512 or AVX2 code paths at run time,
MKL picks its GEMM kernels by CPU, oneDNN JIT-compiles for the widest ISA it finds, and the number of
threads changes how reductions are split. Each choice changes the last bits of a sum, and training a
model from scratch amplifies those bits into a different model (measured: the clear-gap control came
out 0.344 on one machine and 0.156 on another). Pinning every choice to one ISA level that every
x86-64 CPU of the last decade has (AVX2, Haswell and later) and to a fixed thread count makes the
kernels the same everywhere. What it costs in speed is measured by ``benchmarks/numerics.py``.

The variables must be set before torch (and so MKL/oneDNN) initialise, which is why every stage calls
:func:`pin_cpu_numerics` first thing, from ``stages/_stage_env.py``. ``JUDGE3D_NATIVE_NUMERICS=1``
turns the pins off (faster, and the numbers then depend on the machine).
"""
from __future__ import annotations

import os
import sys

#: The pinned code paths. ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` fix the intra-op thread count for
#: stages that do not set one from params; stages that do (``base.train.threads``,
#: ``generate.threads``) call ``torch.set_num_threads`` with the params value, which is as fixed.
PINNED_CPU_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",   # ATen's vectorised kernels: the AVX2 build, never AVX-512
    # MKL conditional numerical reproducibility. COMPATIBLE, not "AVX2,STRICT": measured by
    # benchmarks/numerics.py (results/numerics_cpu_*.txt), MKL's vector math (torch.exp, torch.log)
    # and the SDPA kernel give different bits on AMD EPYC and Intel Xeon at every branch but
    # COMPATIBLE/SSE2 (MKL ignores the branch for VML on AMD). It costs speed (GEMM at SSE2 level).
    # torch.sqrt (MKL VML) differs at every branch: optimizers must not use it -> AdamW(fused=True).
    "MKL_CBWR": "COMPATIBLE",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",    # oneDNN's JIT: no AVX-512/AMX kernels
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
NATIVE_SWITCH = "JUDGE3D_NATIVE_NUMERICS"


class NumericsError(RuntimeError):
    """The pins came too late (torch was already imported with other settings)."""


def numerics_pinned() -> bool:
    return os.environ.get(NATIVE_SWITCH, "") not in ("1", "true", "yes")


def pin_cpu_numerics() -> dict[str, str]:
    """Set :data:`PINNED_CPU_ENV` in this process (and its children); return what is in force.

    Raises :class:`NumericsError` when torch is already imported with different settings, because
    then ATen/MKL may already have chosen their kernels and setting the variables would be a lie.
    """
    if not numerics_pinned():
        return {}
    stale = {k: os.environ.get(k) for k, v in PINNED_CPU_ENV.items() if os.environ.get(k) != v}
    if stale and "torch" in sys.modules:
        raise NumericsError(
            f"torch was imported before the CPU numerics were pinned (differing: {sorted(stale)}). "
            "Call judge3d.core.numerics.pin_cpu_numerics() before importing torch (stages do it in "
            f"stages/_stage_env.py), or set {NATIVE_SWITCH}=1 to run unpinned.")
    os.environ.update(PINNED_CPU_ENV)
    return dict(PINNED_CPU_ENV)


def numerics_fingerprint() -> dict[str, str]:
    """What a run actually used (for logs and benchmark output): torch's CPU capability and the pins."""
    import torch

    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": str(torch.get_num_threads()), "pinned": str(numerics_pinned())}
    info.update({k: os.environ.get(k, "") for k in PINNED_CPU_ENV})
    return info


def adamw(params, **kwargs):
    """``torch.optim.AdamW`` with its fused update, the one optimizer every training stage uses.

    Why fused: the default CPU AdamW takes ``torch.sqrt`` of its second moment, and on the CPU that
    runs through MKL's vector-math library, whose bits differ between processors at every
    ``MKL_CBWR`` setting (measured on an AMD EPYC and an Intel Xeon: ``benchmarks/numerics.py``,
    ``benchmarks/results/numerics_cpu_comparison.txt``). The fused update is ATen's own vectorised
    loop, whose square root is the correctly rounded instruction, so it is the same on every CPU."""
    import torch

    return torch.optim.AdamW(params, fused=True, **kwargs)
