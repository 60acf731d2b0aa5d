"""Rectified-flow pieces shared by every generator backend, in TRELLIS's conventions.

Noise schedule: ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``, so the velocity target is
``(1 - sigma_min) eps - x0``; t = 1 is pure noise and sampling runs t from 1 to 0 with Euler steps over
``t' = r t / (1 + (r - 1) t)``. Guidance is ``(1 + w) v_c - w v_u`` while ``cfg_interval[0] <= t <=
cfg_interval[1]``, the negative conditioning being zeros (TRELLIS ``FlowEulerGuidanceIntervalSampler``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_schedule(steps: int, rescale_t: float = 1.0) -> np.ndarray:
    """The ``steps + 1`` times visited, from 1 down to 0, after TRELLIS's rescaling."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if rescale_t <= 0:
        raise ValueError(f"rescale_t must be > 0, got {rescale_t!r}")
    t_seq = np.linspace(1.0, 0.0, int(steps) + 1)
    return rescale_t * t_seq / (1.0 + (rescale_t - 1.0) * t_seq)


def guidance_active(t: float, cfg_strength: float, cfg_interval: Sequence[float]) -> bool:
    return cfg_strength != 0 and cfg_interval[0] <= t <= cfg_interval[1]


def guided_velocity(velocity_fn: VelocityFn, x_t: torch.Tensor, t: float, cond: torch.Tensor,
                    neg_cond: torch.Tensor, cfg_strength: float,
                    cfg_interval: Sequence[float]) -> torch.Tensor:
    """One velocity evaluation with interval-gated CFG; both branches share one batched call."""
    t_vec = torch.full((x_t.shape[0],), float(t), dtype=x_t.dtype, device=x_t.device)
    if not guidance_active(t, cfg_strength, cfg_interval):
        return velocity_fn(x_t, t_vec, cond)
    both = velocity_fn(torch.cat([x_t, x_t]), torch.cat([t_vec, t_vec]), torch.cat([cond, neg_cond]))
    v_cond, v_uncond = both.chunk(2)
    return (1.0 + cfg_strength) * v_cond - cfg_strength * v_uncond


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, cond: torch.Tensor, neg_cond: torch.Tensor,
                 steps: int, cfg_strength: float = 0.0, cfg_interval: Sequence[float] = (0.0, 1.0),
                 rescale_t: float = 1.0) -> torch.Tensor:
    """Integrate the flow from ``noise`` (t = 1) to t = 0: ``x_{t_prev} = x_t - (t - t_prev) v``."""
    if len(cfg_interval) != 2 or cfg_interval[0] > cfg_interval[1]:
        raise ValueError(f"cfg_interval must be [lo, hi] with lo <= hi, got {list(cfg_interval)!r}")
    t_seq = timestep_schedule(steps, rescale_t)
    x = noise
    for t, t_prev in zip(t_seq[:-1], t_seq[1:]):
        v = guided_velocity(velocity_fn, x, float(t), cond, neg_cond, cfg_strength, cfg_interval)
        x = x - float(t - t_prev) * v
    return x


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Stack one noise tensor per seed, each drawn by its own CPU generator.

    Drawing per sample (not one batch draw) makes a sample's noise depend only on its seed, so
    batching and set composition never change it, and CPU/GPU runs start from identical noise.
    """
    out = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out.append(torch.randn(tuple(shape), generator=gen, dtype=dtype))
    return torch.stack(out)


def sample_logit_normal_t(n: int, mean: float = 0.0, std: float = 1.0,
                          generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """``t = sigmoid(N(mean, std))``: the SD3/TRELLIS training-time distribution."""
    z = torch.randn(n, generator=generator, device="cpu") * std + mean
    return torch.sigmoid(z).to(device)


def noisy_latents(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sigma_min: float) -> torch.Tensor:
    t_b = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t_b) * x0 + (sigma_min + (1.0 - sigma_min) * t_b) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float) -> torch.Tensor:
    return (1.0 - sigma_min) * noise - x0


def reduce_per_sample(sq_err: torch.Tensor, reduction: str) -> torch.Tensor:
    """Collapse all but the batch axis: 'mean' (per element) or 'sum' (per sample)."""
    flat = sq_err.reshape(sq_err.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def flow_matching_errors(velocity_fn: VelocityFn, x0: torch.Tensor, cond: torch.Tensor, *, sigma_min: float,
                         t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                         reduction: str = "mean", generator: torch.Generator | None = None,
                         t_mean: float = 0.0, t_std: float = 1.0) -> torch.Tensor:
    """Per-sample ``||v(x_t, t, c) - ((1 - sigma_min) eps - x0)||^2`` reduced as asked, shape (B,).

    ``t`` and ``noise`` may be passed in so that two models (policy and reference) or two samples
    (winner and loser) see the same draws; otherwise they come from ``generator`` (or torch's
    global RNG), with t logit-normal.
    """
    b = x0.shape[0]
    if t is None:
        t = sample_logit_normal_t(b, t_mean, t_std, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must match x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    t = t.to(device=x0.device, dtype=x0.dtype)
    x_t = noisy_latents(x0, t, noise, sigma_min)
    v_pred = velocity_fn(x_t, t, cond)
    return reduce_per_sample((v_pred - velocity_target(x0, noise, sigma_min)) ** 2, reduction)
