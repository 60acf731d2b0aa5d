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
from judge3d.generators.stages import FlowStage, Latent, latents_to, select_latents
from judge3d.generators.stages import batch_size as latent_count


@dataclass
class ProbeSet:
    stage: str             # the flow stage probed
    x0: Latent             # N latents in the stage's layout
    cond: torch.Tensor     # (N, T, D)
    t: torch.Tensor        # (N,)
    noise: Latent          # x0's layout
    noise_seeds: list[int]  # sample i's noise; the same seeds give a loser's noise in its own layout

    def __len__(self) -> int:
        return latent_count(self.x0)


def make_probe_set(stage: FlowStage, x0: Latent, cond: torch.Tensor, seed: int) -> ProbeSet:
    n = latent_count(x0)
    if n == 0:
        raise ValueError("the probe set is empty: raise method.probe.n_objects or provide more objects")
    if n != cond.shape[0]:
        raise ValueError(f"probe x0 ({n}) and cond ({cond.shape[0]}) differ in count")
    gen = torch.Generator().manual_seed(int(seed))
    t = sample_logit_normal_t(n, stage.t_mean, stage.t_std, generator=gen)
    # Per-sample noise seeds: the noise then follows each latent's own layout (sparse coords too).
    noise_seeds = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist()
    x0 = latents_to(x0, "cpu")
    return ProbeSet(stage=stage.name, x0=x0, cond=cond.detach().cpu(), t=t, noise=stage.noise_like(x0, noise_seeds),
                    noise_seeds=noise_seeds)


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
def fm_mse(generator, probe: ProbeSet, batch: int = 32,
           cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean per-element flow-matching error of ``generator``'s probed stage on ``probe`` (fixed t and noise)."""
    total, n = 0.0, len(probe)
    stage, dev = generator.stage(probe.stage), generator.device
    with eval_mode(stage.flow_model):
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            rows = range(i, min(i + batch, n))
            cond = probe.cond[sl].to(dev)
            if cond_transform is not None:
                cond = cond_transform(cond)
            e = stage.flow_errors(latents_to(select_latents(probe.x0, rows), dev), cond, t=probe.t[sl].to(dev),
                                  noise=latents_to(select_latents(probe.noise, rows), dev), reduction="mean")
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
