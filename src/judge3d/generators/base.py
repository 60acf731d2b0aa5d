"""The generator interface every stage and arm uses, written for two backends (mini and TRELLIS).

Shape of the contract:

* ``encode_images(images) -> cond`` (B, T, D): the frozen conditioner's tokens, layer-normed without
  affine parameters. Arms may transform these tokens (conditioner repair) before sampling.
* ``negative_cond(cond)``: zeros of the same shape, the unconditional branch.
* ``flow_model``: the ``nn.Module`` LoRA wraps; ``forward(x_t, t, cond) -> velocity`` with ``t`` in
  [0, 1] of shape (B,). It may be replaced by a peft wrapper around itself (``gen.flow_model = peft``).
* ``encode_shapes(voxels) -> x0`` latents; ``decode(latents) -> meshes``.
* ``flow_errors(x0, cond, ...) -> (B,)`` per-sample flow-matching errors with injectable t / noise.
* ``sample(cond, steps, cfg_strength, cfg_interval, rescale_t, seed) -> latents``.
* ``save(dir)`` / ``load(dir)``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from judge3d.generators import sampler as rf
from judge3d.core.io import ModelFileError, check_safetensors, read_model_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_dir(path: str | Path) -> Path:
    """A generator folder must hold config.json and model.safetensors; say how to make it if not."""
    path = Path(path)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if not path.is_dir() or missing:
        what = "directory" if not path.is_dir() else " and ".join(missing)
        raise FileNotFoundError(
            f"generator model {path}: missing {what}. Train it first with the pretrain-base stage "
            f"(`dvc repro pretrain-base`, or `python stages/pretrain_base.py --out {path}`).")
    # A damaged file otherwise surfaces as a library error that names neither the file nor the fix.
    check_safetensors(path / WEIGHTS_NAME, remake_hint(path))
    return path


def remake_hint(path: str | Path) -> str:
    return (f"retrain it (`dvc repro pretrain-base`, or `python stages/pretrain_base.py --out {path}`) "
            "or restore it (`dvc checkout models/base`).")


def read_config(path: str | Path) -> dict[str, Any]:
    path = check_model_dir(path)
    config = read_model_json(path / CONFIG_NAME, remake_hint(path))
    if not isinstance(config, dict):
        raise ModelFileError(f"{path / CONFIG_NAME} must hold a JSON object, got {type(config).__name__}; "
                             + remake_hint(path))
    return config


def seeds_for_batch(seed: int | Sequence[int], batch: int) -> list[int]:
    """One seed per sample: a list is used as is; an int ``s`` gives ``s, s+1, ...``."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} conditionings")
    return seeds


class Generator(abc.ABC):
    """An image-to-3D rectified-flow generator (see module docstring for the contract)."""

    flow_model: nn.Module
    sigma_min: float
    device: torch.device
    # Training-time t distribution (logit-normal) and conditioning dropout, used by the arms too.
    t_mean: float = 0.0
    t_std: float = 1.0
    cond_drop_prob: float = 0.1

    # -- conditioning -------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, images: Any) -> torch.Tensor:
        """Images -> conditioning tokens (B, T, D), parameter-free layer-normed, no grad."""

    def negative_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)

    def drop_cond(self, cond: torch.Tensor, p: float | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Conditioning dropout: replace each sample's tokens by zeros with probability p."""
        p = self.cond_drop_prob if p is None else p
        if p <= 0:
            return cond
        keep = torch.rand(cond.shape[0], generator=generator) >= p
        return cond * keep.to(device=cond.device, dtype=cond.dtype).view(-1, 1, 1)

    # -- latents ------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (without the batch axis)."""

    @abc.abstractmethod
    def encode_shapes(self, voxels: Any) -> torch.Tensor:
        """Ground-truth shapes -> x0 latents (B, *latent_shape)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> list:
        """Latents -> trimesh meshes in the canonical frame; an empty one has ``metadata['empty']``."""

    def decode_jobs(self, latents: torch.Tensor) -> list:
        """Latents -> one picklable job per sample whose ``.mesh()`` is what :meth:`decode` returns,
        so CPU-side decoding can run in worker processes (judge3d.core.parallel). The default decodes
        here and ships the finished meshes; a generator whose decoder is CPU work overrides it."""
        return [MeshPayload.of(mesh) for mesh in self.decode(latents)]

    # -- flow ---------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.flow_model(x_t, t, cond)

    def flow_errors(self, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None, reduction: str = "mean",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample flow-matching errors (B,); see :func:`sampler.flow_matching_errors`."""
        return rf.flow_matching_errors(self.velocity, x0.to(self.device), cond.to(self.device),
                                       sigma_min=self.sigma_min, t=t, noise=noise, reduction=reduction,
                                       generator=generator, t_mean=self.t_mean, t_std=self.t_std)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return rf.noise_from_seeds(seeds, self.latent_shape).to(self.device)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int, cfg_strength: float = 0.0,
               cfg_interval: Sequence[float] = (0.0, 1.0), rescale_t: float = 1.0,
               seed: int | Sequence[int] = 0) -> torch.Tensor:
        """Euler-sample latents for each conditioning; each sample's noise comes from its own seed."""
        cond = cond.to(self.device)
        noise = self.initial_noise(seeds_for_batch(seed, cond.shape[0]))
        return rf.euler_sample(self.velocity, noise, cond, self.negative_cond(cond), steps,
                               cfg_strength=cfg_strength, cfg_interval=cfg_interval, rescale_t=rescale_t)

    # -- persistence --------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Write config.json + model.safetensors into ``path``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> "Generator":
        """Rebuild from a folder written by :meth:`save`."""


@dataclass(frozen=True)
class MeshPayload:
    """A decoded mesh as plain arrays: cheap to send to a worker process, rebuilt there as is."""
    vertices: np.ndarray
    faces: np.ndarray
    metadata: dict[str, Any]

    @classmethod
    def of(cls, mesh) -> "MeshPayload":
        return cls(np.asarray(mesh.vertices), np.asarray(mesh.faces), dict(mesh.metadata))

    def mesh(self):
        import trimesh

        return trimesh.Trimesh(self.vertices, self.faces, process=False, metadata=dict(self.metadata))
