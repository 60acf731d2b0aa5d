"""Flow stages: the unit a multi-stage generator is built from (TRELLIS: sparse structure, then
structured latents), and the two latent layouts a stage works in.

A stage owns its flow model (what LoRA wraps), its latent layout, per-sample noise from seeds,
per-sample flow-matching errors, batch concatenation/splitting and the Euler sampler run with its own
:class:`StageSampler` settings. Layouts:

* dense: a tensor (B, *shape), every sample the same shape (the mini generator, TRELLIS's 16^3x8
  sparse-structure latent);
* sparse: :class:`SparseLatent`, coords (N, 4 = batch, x, y, z) and feats (N, C) on each sample's own
  voxels (TRELLIS's structured latent). A stage after the first gets its coords from the previous
  stage's output through :meth:`FlowStage.layout_for`.

Noise of one sample depends on its seed alone (dense) or on its seed and its own coords (sparse: a
dense noise field drawn from the seed, read at the coords), never on the batch around it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from judge3d.generators import sampler as rf


@dataclass(frozen=True)
class StageSampler:
    """One stage's Euler sampler settings (TRELLIS names)."""
    steps: int
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg_strength": self.cfg_strength,
                "cfg_interval": list(self.cfg_interval), "rescale_t": self.rescale_t}


@dataclass(frozen=True)
class SparseLatent:
    """A batch of sparse latents: ``coords`` (N, 4) int32 as (sample, x, y, z), ``feats`` (N, C).

    ``batch_size`` is explicit because a sample may own no voxel. Convertible to TRELLIS's
    ``SparseTensor(feats=feats, coords=coords)``, which uses the same coords convention.
    """
    coords: torch.Tensor
    feats: torch.Tensor
    batch_size: int

    def __post_init__(self):
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"sparse coords must be (N, 4) = (sample, x, y, z), got {tuple(self.coords.shape)}")
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"sparse feats must be (N, C) with N = {self.coords.shape[0]} coords, "
                             f"got {tuple(self.feats.shape)}")
        if self.coords.shape[0] and not (0 <= int(self.coords[:, 0].min()) and
                                         int(self.coords[:, 0].max()) < self.batch_size):
            raise ValueError(f"sparse coords' sample index must lie in [0, {self.batch_size})")

    @property
    def sample_index(self) -> torch.Tensor:
        return self.coords[:, 0].long()

    def voxel_counts(self) -> torch.Tensor:
        return torch.bincount(self.sample_index.cpu(), minlength=self.batch_size)

    def with_feats(self, feats: torch.Tensor) -> "SparseLatent":
        return SparseLatent(self.coords, feats, self.batch_size)

    def to(self, device) -> "SparseLatent":
        return SparseLatent(self.coords.to(device), self.feats.to(device), self.batch_size)

    def select(self, indices: Sequence[int] | torch.Tensor) -> "SparseLatent":
        """Samples ``indices`` in that order, renumbered 0..k-1 (repeats allowed)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        owner = self.sample_index
        rows, coords = [], []
        for new, old in enumerate(idx):
            mask = (owner == old).nonzero().squeeze(1)
            rows.append(mask)
            c = self.coords[mask].clone()
            c[:, 0] = new
            coords.append(c)
        if not rows:
            return SparseLatent(self.coords[:0], self.feats[:0], 0)
        return SparseLatent(torch.cat(coords), self.feats[torch.cat(rows)], len(idx))


Latent = Union[torch.Tensor, SparseLatent]


# -- layout-agnostic batch operations ------------------------------------------------------------
def batch_size(latents: Latent) -> int:
    return latents.batch_size if isinstance(latents, SparseLatent) else int(latents.shape[0])


def cat_latents(parts: Sequence[Latent]) -> Latent:
    """Concatenate batches along the sample axis (sparse: sample indices are shifted)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if not isinstance(parts[0], SparseLatent):
        return torch.cat(list(parts))
    coords, offset = [], 0
    for p in parts:
        c = p.coords.clone()
        c[:, 0] += offset
        coords.append(c)
        offset += p.batch_size
    return SparseLatent(torch.cat(coords), torch.cat([p.feats for p in parts]), offset)


def split_latents(latents: Latent, sizes: Sequence[int]) -> list[Latent]:
    """Split a batch into consecutive groups of ``sizes`` samples (inverse of :func:`cat_latents`)."""
    if sum(sizes) != batch_size(latents):
        raise ValueError(f"split sizes {list(sizes)} do not add up to the batch of {batch_size(latents)}")
    if not isinstance(latents, SparseLatent):
        return list(torch.split(latents, list(sizes)))
    out, start = [], 0
    for n in sizes:
        out.append(latents.select(range(start, start + n)))
        start += n
    return out


def select_latents(latents: Latent, indices: Sequence[int] | torch.Tensor) -> Latent:
    if isinstance(latents, SparseLatent):
        return latents.select(indices)
    return latents[torch.as_tensor(indices, dtype=torch.long)]


def latents_to(latents: Latent, device) -> Latent:
    return latents.to(device)


def latent_tensors(latents: Latent, index: int) -> dict[str, torch.Tensor]:
    """One sample as plain tensors for saving: dense ``{"": x}``; sparse ``{"coords": (n, 3), "feats"}``."""
    if isinstance(latents, SparseLatent):
        one = latents.select([index])
        return {"coords": one.coords[:, 1:].contiguous(), "feats": one.feats.contiguous()}
    return {"": latents[index]}


def latent_from_tensors(tensors: dict[str, torch.Tensor]) -> Latent:
    """Inverse of :func:`latent_tensors`: a batch of one sample."""
    if "coords" in tensors:
        coords = tensors["coords"].to(torch.int32)
        zeros = torch.zeros((coords.shape[0], 1), dtype=torch.int32)
        return SparseLatent(torch.cat([zeros, coords], 1), tensors["feats"], 1)
    return tensors[""][None]


def pack_outputs(outputs: dict[str, Latent], index: int) -> dict[str, np.ndarray]:
    """Sample ``index`` of every stage's output as named arrays for one safetensors file: a dense
    stage under its name (``flow``), a sparse one as ``<stage>.coords`` (n, 3) and ``<stage>.feats``."""
    out = {}
    for stage, latents in outputs.items():
        for part, tensor in latent_tensors(latents, index).items():
            out[f"{stage}.{part}" if part else stage] = tensor.detach().cpu().numpy().copy()
    return out


def unpack_outputs(tensors: dict[str, torch.Tensor]) -> dict[str, Latent]:
    """Inverse of :func:`pack_outputs`: every stage's latents as a batch of one."""
    by_stage: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stage, _, part = key.partition(".")
        by_stage.setdefault(stage, {})[part] = tensor
    return {stage: latent_from_tensors(parts) for stage, parts in by_stage.items()}


# -- stages ------------------------------------------------------------------------------------------
class FlowStage(abc.ABC):
    """One rectified-flow stage of a generator (see the module docstring)."""

    name: str
    flow_model: nn.Module          # may be replaced by a peft wrapper around itself
    sigma_min: float
    t_mean: float
    t_std: float

    def __init__(self, name: str, flow_model: nn.Module, sigma_min: float, t_mean: float = 0.0,
                 t_std: float = 1.0):
        self.name, self.flow_model, self.sigma_min = name, flow_model, sigma_min
        self.t_mean, self.t_std = t_mean, t_std

    # layout ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def layout_for(self, previous_output: Latent | None, batch: int) -> Any:
        """What this stage's latents look like for a batch, given the previous stage's output (None
        for the first stage): dense, the fixed shape; sparse, the coords (N, 4) of every sample."""

    @abc.abstractmethod
    def noise(self, seeds: Sequence[int], layout: Any) -> Latent:
        """Initial noise, sample i from ``seeds[i]`` alone (and its own coords, sparse)."""

    def noise_like(self, latents: Latent, seeds: Sequence[int]) -> Latent:
        """Noise in the layout of ``latents`` (e.g. shared by a winner and a loser through their seeds)."""
        return self.noise(seeds, latents.coords if isinstance(latents, SparseLatent) else tuple(latents.shape[1:]))

    cat = staticmethod(cat_latents)
    split = staticmethod(split_latents)
    select = staticmethod(select_latents)

    # flow -----------------------------------------------------------------------------------
    def velocity(self, x_t: Latent, t: torch.Tensor, cond: torch.Tensor) -> Latent:
        return self.flow_model(x_t, t, cond)

    @abc.abstractmethod
    def flow_errors(self, x0: Latent, cond: torch.Tensor, t: torch.Tensor | None = None,
                    noise: Latent | None = None, reduction: str = "mean",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample flow-matching errors (B,), ``t`` (B,) and ``noise`` (x0's layout) injectable."""

    @abc.abstractmethod
    def sample(self, noise: Latent, cond: torch.Tensor, neg_cond: torch.Tensor,
               settings: StageSampler) -> Latent:
        """Euler-integrate from ``noise`` (t = 1) to t = 0 with this stage's settings."""

    def _draw_t(self, b: int, generator, device) -> torch.Tensor:
        return rf.sample_logit_normal_t(b, self.t_mean, self.t_std, generator=generator, device=device)


class DenseFlowStage(FlowStage):
    """Fixed-shape latents (B, *shape); the flow model maps (x_t, t (B,), cond) -> velocity."""

    def __init__(self, name: str, flow_model: nn.Module, shape: Sequence[int], sigma_min: float,
                 t_mean: float = 0.0, t_std: float = 1.0):
        super().__init__(name, flow_model, sigma_min, t_mean, t_std)
        self.shape = tuple(int(s) for s in shape)

    def layout_for(self, previous_output: Latent | None, batch: int) -> tuple[int, ...]:
        return self.shape

    def noise(self, seeds: Sequence[int], layout: Any = None) -> torch.Tensor:
        return rf.noise_from_seeds(seeds, self.shape if layout is None else layout)

    def flow_errors(self, x0, cond, t=None, noise=None, reduction="mean", generator=None):
        return rf.flow_matching_errors(self.velocity, x0, cond, sigma_min=self.sigma_min, t=t, noise=noise,
                                       reduction=reduction, generator=generator, t_mean=self.t_mean,
                                       t_std=self.t_std)

    def sample(self, noise, cond, neg_cond, settings: StageSampler):
        return rf.euler_sample(self.velocity, noise, cond, neg_cond, settings.steps,
                               cfg_strength=settings.cfg_strength, cfg_interval=settings.cfg_interval,
                               rescale_t=settings.rescale_t)


class SparseFlowStage(FlowStage):
    """Latents on each sample's own voxels (:class:`SparseLatent`, ``channels`` feats per voxel in a
    ``resolution``^3 grid); the flow model maps (SparseLatent x_t, t (B,), cond) -> SparseLatent
    velocity on the same coords. ``coords_from`` turns the previous stage's output into coords
    (TRELLIS: decode the sparse structure, keep the occupied voxels)."""

    def __init__(self, name: str, flow_model: nn.Module, channels: int, resolution: int, sigma_min: float,
                 coords_from: Callable[[Latent], torch.Tensor], t_mean: float = 0.0, t_std: float = 1.0):
        super().__init__(name, flow_model, sigma_min, t_mean, t_std)
        self.channels, self.resolution, self.coords_from = int(channels), int(resolution), coords_from

    def layout_for(self, previous_output: Latent | None, batch: int) -> torch.Tensor:
        if previous_output is None:
            raise ValueError(f"sparse stage {self.name!r} takes its coords from a previous stage's output")
        coords = self.coords_from(previous_output)
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"{self.name}: coords_from must give (N, 4) coords, got {tuple(coords.shape)}")
        return coords

    def noise(self, seeds: Sequence[int], layout: torch.Tensor) -> SparseLatent:
        """Each sample's noise: a dense (C, R, R, R) field drawn from its seed, read at its coords, so
        a voxel's noise depends on the seed and its position only (not on order or the batch)."""
        coords = layout.to("cpu")
        feats = torch.empty((coords.shape[0], self.channels))
        owner = coords[:, 0].long()
        for i, seed in enumerate(seeds):
            rows = (owner == i).nonzero().squeeze(1)
            if len(rows):
                field = rf.noise_from_seeds([seed], (self.channels,) + (self.resolution,) * 3)[0]
                x, y, z = coords[rows, 1].long(), coords[rows, 2].long(), coords[rows, 3].long()
                feats[rows] = field[:, x, y, z].T
        return SparseLatent(coords.to(torch.int32), feats, len(seeds))

    def _per_sample(self, sq_err: torch.Tensor, like: SparseLatent, reduction: str) -> torch.Tensor:
        owner = like.sample_index.to(sq_err.device)
        sums = torch.zeros(like.batch_size, dtype=sq_err.dtype, device=sq_err.device)
        sums = sums.index_add(0, owner, sq_err.sum(dim=1))
        if reduction == "sum":
            return sums
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        counts = like.voxel_counts().to(sq_err.device)
        if (counts == 0).any():
            raise ValueError(f"sample(s) {(counts == 0).nonzero().squeeze(1).tolist()} own no voxel: "
                             "their mean flow-matching error is undefined")
        return sums / (counts * sq_err.shape[1]).to(sq_err.dtype)

    def flow_errors(self, x0: SparseLatent, cond, t=None, noise=None, reduction="mean", generator=None):
        """Per sample: the error over that sample's own voxels (``mean``: per voxel and channel)."""
        b, feats = x0.batch_size, x0.feats
        if t is None:
            t = self._draw_t(b, generator, feats.device)
        if noise is None:
            noise = torch.randn(feats.shape, generator=generator, dtype=feats.dtype).to(feats.device)
        noise = noise.feats if isinstance(noise, SparseLatent) else noise
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if noise.shape != feats.shape:
            raise ValueError(f"noise must match x0's feats {tuple(feats.shape)}, got {tuple(noise.shape)}")
        t = t.to(device=feats.device, dtype=feats.dtype)
        x_t = x0.with_feats(rf.noisy_latents(feats, t[x0.sample_index], noise, self.sigma_min))
        v_pred = self.velocity(x_t, t, cond)
        v_pred = v_pred.feats if isinstance(v_pred, SparseLatent) else v_pred
        return self._per_sample((v_pred - rf.velocity_target(feats, noise, self.sigma_min)) ** 2, x0, reduction)

    @torch.no_grad()
    def sample(self, noise: SparseLatent, cond, neg_cond, settings: StageSampler) -> SparseLatent:
        """The dense Euler sampler's steps and guidance (:mod:`sampler`) on the sparse feats."""
        if len(settings.cfg_interval) != 2 or settings.cfg_interval[0] > settings.cfg_interval[1]:
            raise ValueError(f"cfg_interval must be [lo, hi] with lo <= hi, got {list(settings.cfg_interval)!r}")
        both_cond = torch.cat([cond, neg_cond])
        x = noise
        t_seq = rf.timestep_schedule(settings.steps, settings.rescale_t)
        for t, t_prev in zip(t_seq[:-1], t_seq[1:]):
            t_vec = torch.full((x.batch_size,), float(t), dtype=x.feats.dtype, device=x.feats.device)
            if rf.guidance_active(float(t), settings.cfg_strength, settings.cfg_interval):
                v_c, v_u = split_latents(self.velocity(cat_latents([x, x]), torch.cat([t_vec, t_vec]), both_cond),
                                         [x.batch_size, x.batch_size])
                v = (1.0 + settings.cfg_strength) * v_c.feats - settings.cfg_strength * v_u.feats
            else:
                v = self.velocity(x, t_vec, cond).feats
            x = x.with_feats(x.feats - float(t - t_prev) * v)
        return x
