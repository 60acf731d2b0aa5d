"""Convergence/divergence probes: FM-MSE on a fixed held-out probe set, feature MSE for repair.

The probe set fixes ``t`` and noise from a seed, so "before" and "after" measure the same draws
and any change is the adapter's. The probe is always the per-element mean error (comparable across
reductions and with the seed's 0.09 figure), with conditioning dropout and LoRA dropout off.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from judge3d.generators.sampler import sample_logit_normal_t


@dataclass
class ProbeSet:
    x0: torch.Tensor       # (N, *latent)
    cond: torch.Tensor     # (N, T, D)
    t: torch.Tensor        # (N,)
    noise: torch.Tensor    # (N, *latent)

    def __len__(self) -> int:
        return self.x0.shape[0]


def make_probe_set(x0: torch.Tensor, cond: torch.Tensor, seed: int, t_mean: float = 0.0,
                   t_std: float = 1.0) -> ProbeSet:
    if x0.shape[0] == 0:
        raise ValueError("the probe set is empty: raise method.probe.n_objects or provide more objects")
    if x0.shape[0] != cond.shape[0]:
        raise ValueError(f"probe x0 ({x0.shape[0]}) and cond ({cond.shape[0]}) differ in count")
    gen = torch.Generator().manual_seed(int(seed))
    t = sample_logit_normal_t(x0.shape[0], t_mean, t_std, generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return ProbeSet(x0=x0.detach().cpu(), cond=cond.detach().cpu(), t=t, noise=noise)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


@torch.no_grad()
def fm_mse(generator, probe: ProbeSet, batch_size: int = 32,
           cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean per-element flow-matching error of ``generator`` on ``probe`` (fixed t and noise)."""
    total, n = 0.0, len(probe)
    with eval_mode(generator.flow_model):
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            cond = probe.cond[sl].to(generator.device)
            if cond_transform is not None:
                cond = cond_transform(cond)
            e = generator.flow_errors(probe.x0[sl], cond, t=probe.t[sl].to(generator.device),
                                      noise=probe.noise[sl].to(generator.device), reduction="mean")
            total += float(e.double().sum())
    return total / n


@torch.no_grad()
def feat_mse(repair: nn.Module | None, degraded: torch.Tensor, clean: torch.Tensor,
             batch_size: int = 64) -> float:
    """Mean squared distance of (repaired) degraded tokens to clean tokens; ``repair=None`` is identity."""
    if degraded.shape != clean.shape:
        raise ValueError(f"degraded {tuple(degraded.shape)} and clean {tuple(clean.shape)} features differ")
    total, count = 0.0, 0
    ctx = eval_mode(repair) if repair is not None else contextlib.nullcontext()
    with ctx:
        for i in range(0, degraded.shape[0], batch_size):
            d = degraded[i:i + batch_size]
            pred = repair(d) if repair is not None else d
            total += float(((pred - clean[i:i + batch_size]) ** 2).double().sum())
            count += d.numel()
    return total / count


def is_diverged(before: float, after: float, threshold: float) -> bool:
    """``after / before > threshold``, or a non-finite ``after`` (NaN is divergence, never a pass)."""
    if not math.isfinite(before) or before <= 0:
        raise ValueError(f"probe before-value must be a positive finite number, got {before!r}")
    if not math.isfinite(after):
        return True
    return after / before > threshold
