"""Pretraining the mini generator: conditioner and flow transformer trained jointly on the train
split's clean images and occupancy grids with the rectified-flow loss; the conditioner is frozen after.

The loop, LR schedule (linear warm-up, cosine to ``min_lr_ratio * lr``), dvclive curve and resumable
checkpoints (every ``checkpoint_every`` steps, outside the DVC output, keyed by settings and data) are
:mod:`judge3d.core.training`'s; the checkpoint is removed once the model is saved. Every random draw of
step ``s`` comes from a generator seeded by ``(seed, s)``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from judge3d.core.config import ParamsError, require
from judge3d.generators.mini import STAGE, MiniGenerator, mini_config_from_params
from judge3d.core.io import read_jsonl
from judge3d.core.numerics import adamw
from judge3d.core.resume import checkpoint_dir, drop_checkpoints, fingerprint
from judge3d.core.seeding import derive_seed, seed_everything
from judge3d.core.training import Checkpointing, cosine_schedule, train
from judge3d.world.dataset import has_ground_truth, load_image, load_voxels


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    threads: int
    checkpoint_every: int
    aux_weight: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainSettings":
        pos = lambda v: v > 0  # noqa: E731
        return cls(
            steps=require(params, "base.train.steps", int, check=pos),
            batch_size=require(params, "base.train.batch_size", int, check=pos),
            lr=require(params, "base.train.lr", float, check=pos),
            min_lr_ratio=require(params, "base.train.min_lr_ratio", float, check=lambda v: 0 <= v <= 1),
            warmup_steps=require(params, "base.train.warmup_steps", int, check=lambda v: v >= 0),
            weight_decay=require(params, "base.train.weight_decay", float, check=lambda v: v >= 0),
            grad_clip=require(params, "base.train.grad_clip", float, check=pos),
            threads=require(params, "base.train.threads", int, check=pos),
            checkpoint_every=require(params, "base.train.checkpoint_every", int, check=pos),
            aux_weight=require(params, "base.train.aux_weight", float, check=lambda v: v >= 0),
        )


def load_training_set(manifest: str | Path, resolution: int, split: str = "train",
                      limit: int | None = None) -> tuple[list[dict], np.ndarray, np.ndarray]:
    rows = sorted((r for r in read_jsonl(manifest) if r["split"] == split), key=lambda r: r["object_id"])
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{manifest}: no rows with split '{split}'; check world.n_train and rerun data.")
    user = [r["object_id"] for r in rows if not has_ground_truth(r)]
    if user:
        raise ValueError(f"{manifest}: split '{split}' holds a user's images (world.images_dir; e.g. {user[0]}), "
                         "which have no ground-truth voxels; the mini generator trains on the procedural world. "
                         "world.images_dir is for the TRELLIS backend (base.backend: trellis, e.g. the paper "
                         "profile); set world.images_dir: null to pretrain the mini generator.")
    images = np.stack([load_image(r["image_path"]) for r in rows])
    voxels = np.stack([load_voxels(r["voxel_path"], resolution) for r in rows])
    return rows, images, voxels


def build_generator(params: dict[str, Any], device: str = "cpu") -> MiniGenerator:
    resolution = require(params, "world.voxel_resolution", int)
    try:
        cfg = mini_config_from_params(require(params, "base"), resolution)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: bad base.model block: {exc}") from exc
    return MiniGenerator(cfg, device=device)


class CoarseShapeHead(nn.Module):
    """Pretraining-only probe: mean conditioning token -> coarse (R/4)^3 occupancy logits.

    Why: trained through the flow loss alone, the from-scratch conditioner stayed uninformative
    within the CPU budget and the flow model learned to ignore it (held-out samples no closer to
    their input than a random object). DINOv2 arrives already informative; this auxiliary target
    gives our stand-in that property quickly. The head is dropped after pretraining.
    """

    def __init__(self, width: int, resolution: int, factor: int = 4):
        super().__init__()
        self.factor = factor
        self.side = resolution // factor
        self.net = nn.Sequential(nn.Linear(width, 256), nn.GELU(), nn.Linear(256, self.side ** 3))

    def loss(self, tokens: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        occ = F.avg_pool3d((x0 + 1.0) / 2.0, self.factor).flatten(1)
        return F.binary_cross_entropy_with_logits(self.net(tokens.mean(dim=1)), occ)


def fit(gen: MiniGenerator, img_t: torch.Tensor, x0_all: torch.Tensor, settings: TrainSettings, seed: int,
        checkpoint: Checkpointing | None = None, live=None, progress: bool = True) -> list[float]:
    """The joint training loop; returns the per-step flow losses (all steps, also after a resume)."""
    torch.manual_seed(derive_seed(seed, "pretrain-base", "init-head"))
    head = CoarseShapeHead(gen.config.conditioner.width, gen.config.flow.resolution).to(gen.device)
    gen.conditioner.train().requires_grad_(True)
    gen.base_flow.train()
    modules = {"conditioner": gen.conditioner, "flow": gen.base_flow, "head": head}
    decay, no_decay = [], []
    for module in modules.values():
        for name, p in module.named_parameters():
            (decay if p.dim() >= 2 and "pos_embed" not in name else no_decay).append(p)
    opt = adamw([{"params": decay, "weight_decay": settings.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.99))
    sched = cosine_schedule(opt, warmup_steps=settings.warmup_steps, total_steps=settings.steps,
                            min_lr_ratio=settings.min_lr_ratio)
    n = len(x0_all)

    def step_fn(step: int):
        g = torch.Generator().manual_seed(derive_seed(seed, "pretrain-base", "batches", step))
        idx = torch.randint(0, n, (settings.batch_size,), generator=g)
        x0 = x0_all[idx].to(gen.device)
        tokens = gen.conditioner(img_t[idx].to(gen.device))
        flow_loss = gen.stage(STAGE).flow_errors(x0, gen.drop_cond(tokens, generator=g), reduction="mean",
                                                 generator=g).mean()
        aux_loss = head.loss(tokens, x0)
        return flow_loss + settings.aux_weight * aux_loss, {"loss": flow_loss.item(), "aux_loss": aux_loss.item()}

    result = train(step_fn, modules=modules, optimizer=opt, scheduler=sched, steps=settings.steps,
                   name="pretrain-base", grad_clip=settings.grad_clip, checkpoint=checkpoint, live=live,
                   progress=progress)
    gen.base_flow.eval()
    gen.freeze_conditioner()
    return [h["loss"] for h in result.history]


def pretrain_checkpoint(params: dict[str, Any], out_dir: str | Path, *inputs: torch.Tensor) -> Checkpointing:
    """This run's checkpoint: outside the stage's DVC outputs (which DVC deletes before a rerun), keyed
    by the settings, the seed and the training tensors themselves (:mod:`judge3d.core.resume`)."""
    data = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in inputs]
    run_fp = fingerprint(require(params, "base", dict), require(params, "train_seed", int), data)
    return Checkpointing(checkpoint_dir(out_dir, run_fp), run_fp,
                         require(params, "base.train.checkpoint_every", int, check=lambda v: v > 0))


def pretrain(params: dict[str, Any], manifest: str | Path, out_dir: str | Path, live=None,
             limit_objects: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train and save the base generator, logging to dvclive ``live``; returns a summary (final loss,
    wall time, sizes)."""
    settings = TrainSettings.from_params(params)
    seed = require(params, "train_seed", int)
    torch.set_num_threads(settings.threads)
    seed_everything(derive_seed(seed, "pretrain-base"))
    out_dir = Path(out_dir)
    resolution = require(params, "world.voxel_resolution", int)

    rows, images, voxels = load_training_set(manifest, resolution, limit=limit_objects)
    gen = build_generator(params, device=device)
    # Inputs are resized once here, not per step: the conditioner sees the same tensors either way.
    with torch.no_grad():
        img_t = torch.cat([gen.conditioner.preprocess(images[i:i + 64], "cpu") for i in range(0, len(images), 64)])
    x0_all = gen.encode_shapes(voxels).cpu()

    t0 = time.time()
    losses = fit(gen, img_t, x0_all, settings, seed, checkpoint=pretrain_checkpoint(params, out_dir, img_t, x0_all),
                 live=live)
    gen.save(out_dir)
    drop_checkpoints(out_dir)
    tail = losses[-min(50, len(losses)):] if losses else [float("nan")]
    return {"steps": settings.steps, "n_train_objects": len(rows),
            "final_loss_mean_last50": float(np.mean(tail)), "wall_s": time.time() - t0,
            "parameters": gen.num_parameters()}
