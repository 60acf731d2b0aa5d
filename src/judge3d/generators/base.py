"""The generator interface every stage and arm uses, written for two backends (mini and TRELLIS).

A generator is a conditioner, one or more flow stages in order (:mod:`judge3d.generators.stages`)
and a decoder:

* ``encode_images(images) -> cond`` (B, T, D): the frozen conditioner's tokens, layer-normed without
  affine parameters. Arms may transform these tokens (conditioner repair) before sampling.
* ``negative_cond(cond)``: zeros of the same shape, the unconditional branch.
* ``stages`` / ``stage(name)``: each stage owns its flow model (``stage.flow_model`` is what LoRA
  wraps), latent layout, noise, per-sample flow errors and sampler. Stage i > 0 is laid out from
  stage i - 1's output (``stage.layout_for``).
* ``sample(cond, settings, seed) -> {stage name: latents}``, every stage's output in order, each
  stage run with its own :class:`StageSampler` settings.
* ``encode_shapes(voxels) -> x0`` of the first stage; ``decode(outputs) -> meshes``.
* ``save(dir)`` / ``load(dir)``; a folder is config.json plus the weight files its ``weights`` key
  lists (default: model.safetensors).
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from judge3d.core.io import ModelFileError, check_safetensors, read_model_json
from judge3d.core.seeding import derive_seed
from judge3d.generators.stages import FlowStage, Latent, StageSampler

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_KEY = "weights"     # config.json key listing a multi-file model's weight files


DEVICE_KEY = "base.device"   # params: where the generator samples and the arms train


def params_device(params: Mapping[str, Any]) -> str:
    """``base.device``: cpu (the reproducible default), cuda, cuda:<n> or auto."""
    from judge3d.core.config import require

    return require(params, DEVICE_KEY, str, check=lambda v: v in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", v),
                   hint="cpu (reproducible), cuda, cuda:<n> or auto")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"generator model {path}: missing {what}. Train it first with the pretrain-base stage "
        f"(`dvc repro pretrain-base`, or `python stages/pretrain_base.py --out {path}`).")


def weight_files(path: str | Path, config: Mapping[str, Any]) -> list[Path]:
    """The weight files of a model folder: those its config lists under ``weights`` (a multi-file
    model such as TRELLIS's, one file per network), else the single model.safetensors."""
    names = config.get(WEIGHTS_KEY, [WEIGHTS_NAME])
    # An empty list: the backend's own loader checks its files (TRELLIS: a pipeline folder it names).
    if (not isinstance(names, list)
            or not all(isinstance(n, str) and n and Path(n).name == n for n in names)):
        raise ModelFileError(f"{Path(path) / CONFIG_NAME}: '{WEIGHTS_KEY}' must list file names in the folder, "
                             f"got {names!r}; {remake_hint(path)}")
    return [Path(path) / n for n in names]


def check_model_dir(path: str | Path) -> Path:
    """A generator folder must hold config.json and every weight file it lists; say how to make it if not."""
    path = Path(path)
    if not path.is_dir() or not (path / CONFIG_NAME).is_file():
        raise _missing(path, "directory" if not path.is_dir() else CONFIG_NAME)
    config = read_model_json(path / CONFIG_NAME, remake_hint(path))
    files = weight_files(path, config if isinstance(config, dict) else {})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise _missing(path, " and ".join(missing))
    # A damaged file otherwise surfaces as a library error that names neither the file nor the fix.
    for f in files:
        check_safetensors(f, remake_hint(path))
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

    stages: list[FlowStage]     # in sampling order
    sigma_min: float
    device: torch.device
    # Training-time t distribution (logit-normal) and conditioning dropout, used by the arms too.
    t_mean: float = 0.0
    t_std: float = 1.0
    cond_drop_prob: float = 0.1

    def stage(self, name: str) -> FlowStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{type(self).__name__} has no flow stage {name!r} (stages: {self.stage_names})")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

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
    @abc.abstractmethod
    def encode_shapes(self, voxels: Any) -> Latent:
        """Ground-truth shapes -> x0 latents of the first stage."""

    def stage_outputs(self, outputs: Mapping[str, Latent] | Latent) -> dict[str, Latent]:
        """Every stage's output by name; a one-stage generator also takes its latents alone."""
        if isinstance(outputs, Mapping):
            missing = [n for n in self.stage_names if n not in outputs]
            if missing:
                raise ValueError(f"stage outputs lack {missing} (have {sorted(outputs)})")
            return dict(outputs)
        if len(self.stages) != 1:
            raise TypeError(f"a {len(self.stages)}-stage generator needs every stage's output by name")
        return {self.stages[0].name: outputs}

    @abc.abstractmethod
    def decode(self, outputs: Mapping[str, Latent] | Latent) -> list:
        """Stage outputs -> trimesh meshes in the canonical frame; an empty one has ``metadata['empty']``."""

    def decode_jobs(self, outputs: Mapping[str, Latent] | Latent) -> list:
        """Stage outputs -> one picklable job per sample whose ``.mesh()`` is what :meth:`decode` returns,
        so CPU-side decoding can run in worker processes (judge3d.core.parallel). The default decodes
        here and ships the finished meshes; a generator whose decoder is CPU work overrides it."""
        return [MeshPayload.of(mesh) for mesh in self.decode(outputs)]

    # -- sampling -----------------------------------------------------------------------------
    def stage_seeds(self, seeds: Sequence[int], index: int) -> list[int]:
        """The first stage draws from the candidate's seeds as they are; a later stage from seeds
        derived from them and its name, so its noise is independent of the first stage's."""
        if index == 0:
            return list(seeds)
        return [derive_seed(s, "stage", self.stages[index].name) for s in seeds]

    def stage_settings(self, settings: Mapping[str, StageSampler] | StageSampler) -> dict[str, StageSampler]:
        if isinstance(settings, StageSampler):
            if len(self.stages) != 1:
                raise TypeError(f"a {len(self.stages)}-stage generator needs sampler settings per stage "
                                f"{self.stage_names}")
            return {self.stages[0].name: settings}
        missing = [n for n in self.stage_names if n not in settings]
        if missing:
            raise ValueError(f"no sampler settings for stage(s) {missing} (got {sorted(settings)})")
        return dict(settings)

    def default_settings(self) -> dict[str, StageSampler]:
        """The generator's own sampler settings per stage (a params budget given as ``pipeline``)."""
        raise ValueError(f"{type(self).__name__} has no default sampler settings of its own: give every "
                         f"sampler.budgets.<budget> its settings per stage {self.stage_names}")

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, settings: Mapping[str, StageSampler] | StageSampler,
               seed: int | Sequence[int] = 0) -> dict[str, Latent]:
        """Run every stage in order, each with its own settings; each sample's noise comes from its
        own seed. Returns every stage's output by name (the last one is what decodes to a mesh)."""
        cond = cond.to(self.device)
        neg = self.negative_cond(cond)
        seeds = seeds_for_batch(seed, cond.shape[0])
        per_stage = self.stage_settings(settings)
        outputs: dict[str, Latent] = {}
        previous = None
        for i, stage in enumerate(self.stages):
            layout = stage.layout_for(previous, len(seeds))
            noise = stage.noise(self.stage_seeds(seeds, i), layout).to(self.device)
            previous = outputs[stage.name] = stage.sample(noise, cond, neg, per_stage[stage.name])
        return outputs

    # -- persistence --------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Write config.json and the weight file(s) into ``path``."""

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
