"""Training data for the arms: conditioning tokens and flow targets, read from the pipeline's manifests.

Inputs (paths relative to the repo root):

* ``data/labels/train_pairs.jsonl`` (judge-train-labels), one swap-consistent pair a row::

      object_id         str    the train object both candidates were generated from
      winner_candidate  str    candidate id of the judge's winner (a row of the generated manifest)
      loser_candidate   str    candidate id of the loser
      confidence        float  the judge's debiased soft preference for the winner (logged only)

* ``data/generated/<set>/manifest.jsonl`` (generate): ``candidate``, ``object_id``, ``regime``,
  ``budget``, ``empty`` and ``latents_path``: the safetensors file of every stage's sampled latents
  (:func:`judge3d.generators.stages.pack_outputs`). The target is the adapted stage's latent exactly
  as the sampler produced it, never a latent rebuilt from the decoded mesh.
* ``data/world/manifest.jsonl`` (data): ``object_id``, ``image_path`` (the clean input image).
* ``data/degraded/<severity>/manifest.jsonl`` (degrade): ``object_id``, ``image_path``
  (the degraded input), ``clean_image_path``.

A candidate whose latents file is missing or holds NaN/inf drops its pair (counted in ``skipped``);
a latent that decoded to an empty mesh is a legitimate sample, kept and counted in ``empty_targets``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from judge3d.world.dataset import load_image
from judge3d.core.io import read_jsonl
from judge3d.core.seeding import rng
from judge3d.generators.stages import Latent, cat_latents, select_latents, unpack_outputs

PAIR_KEYS = ("object_id", "winner_candidate", "loser_candidate")


@dataclass
class TargetSet:
    """Per-example conditioning and one flow stage's targets; ``x_l`` only for preference data."""
    object_ids: list[str]
    cond: torch.Tensor                      # (N, T, D)
    x_w: Latent                             # N winners / clean targets in the stage's layout
    x_l: Latent | None = None               # N losers
    skipped: dict[str, int] = field(default_factory=dict)
    empty_targets: int = 0

    def __len__(self) -> int:
        return len(self.object_ids)

    def subset(self, keep: Sequence[int]) -> "TargetSet":
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return TargetSet([self.object_ids[i] for i in keep], self.cond[idx], select_latents(self.x_w, idx),
                         None if self.x_l is None else select_latents(self.x_l, idx), dict(self.skipped),
                         self.empty_targets)


@dataclass
class FeaturePairs:
    """Conditioner repair data: degraded-image and clean-image tokens of the same objects."""
    object_ids: list[str]
    degraded: torch.Tensor                  # (N, T, D)
    clean: torch.Tensor                     # (N, T, D)

    def __len__(self) -> int:
        return len(self.object_ids)

    def subset(self, keep: Sequence[int]) -> "FeaturePairs":
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return FeaturePairs([self.object_ids[i] for i in keep], self.degraded[idx], self.clean[idx])



class NoTrainingData(ValueError):
    """Every candidate target of an arm is unusable (e.g. the base decoded only empty meshes)."""

def split_probe_objects(object_ids: Iterable[str], n_probe: int, seed: int) -> tuple[set[str], set[str]]:
    """A fixed, seeded choice of held-out probe objects; the rest train. Depends only on the id set."""
    ids = sorted(set(object_ids))
    if n_probe < 1:
        raise ValueError("method.probe.n_objects must be >= 1")
    if len(ids) <= n_probe:
        raise ValueError(f"only {len(ids)} objects available but method.probe.n_objects = {n_probe}: "
                         f"lower it or generate more training pairs")
    chosen = rng(seed, "arms", "probe-objects").choice(len(ids), size=n_probe, replace=False)
    probe = {ids[i] for i in chosen}
    return set(ids) - probe, probe


def split_indices(object_ids: Sequence[str], probe_objects: set[str]) -> tuple[list[int], list[int]]:
    train = [i for i, o in enumerate(object_ids) if o not in probe_objects]
    probe = [i for i, o in enumerate(object_ids) if o in probe_objects]
    return train, probe


# -- conditioning ------------------------------------------------------------------------------
def encode_image_paths(generator, paths: Sequence[str], batch: int = 64, desc: str = "encode") -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(paths), batch), desc=desc, leave=False):
        imgs = np.stack([load_image(p) for p in paths[i:i + batch]])
        out.append(generator.encode_images(imgs).cpu())
    return torch.cat(out)


def world_images(world_manifest: str | Path) -> dict[str, str]:
    rows = read_jsonl(world_manifest)
    _require_columns(world_manifest, rows, ("object_id", "image_path"))
    return {r["object_id"]: r["image_path"] for r in rows}


def split_object_ids(world_manifest: str | Path, split: str = "train") -> set[str]:
    """Objects of one split: adaptation data must never include held-out objects."""
    rows = read_jsonl(world_manifest)
    _require_columns(world_manifest, rows, ("object_id", "split"))
    ids = {r["object_id"] for r in rows if r["split"] == split}
    if not ids:
        raise ValueError(f"{world_manifest}: no objects in split {split!r}")
    return ids


def degraded_rows(degraded_manifest: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(degraded_manifest)
    _require_columns(degraded_manifest, rows, ("object_id", "image_path", "clean_image_path"))
    return sorted(rows, key=lambda r: r["object_id"])


def _require_columns(path, rows: list[dict], keys: Sequence[str]) -> None:
    if not rows:
        raise ValueError(f"{path} has no rows; rerun the stage that writes it")
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise ValueError(f"{path}: rows lack column(s) {missing} (have {sorted(rows[0])}); "
                         f"the arms need {list(keys)}")


# -- targets -----------------------------------------------------------------------------------
def load_target(row: dict[str, Any], stage: str) -> tuple[Latent | None, str | None]:
    """One candidate's sampled latent of flow stage ``stage`` (a batch of one), or (None, reason)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if "latents_path" not in row:
        return None, "missing"
    path = Path(row["latents_path"])
    if not path.is_file():
        return None, "missing"
    try:
        outputs = unpack_outputs(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable latents file ({exc}); rerun the generate stage") from exc
    if stage not in outputs:
        raise ValueError(f"{path} holds the latents of stage(s) {sorted(outputs)}, not of {stage!r} "
                         f"(method.lora.stage); rerun the generate stage with this generator")
    latent = outputs[stage]
    values = latent.feats if hasattr(latent, "feats") else latent
    if not torch.isfinite(values).all():
        return None, "nan"
    return latent, None


def candidates_by_id(generated_manifest: str | Path) -> dict[str, dict[str, Any]]:
    rows = read_jsonl(generated_manifest)
    _require_columns(generated_manifest, rows, ("candidate", "object_id", "mesh_path"))
    out = {}
    for r in rows:
        if r["candidate"] in out:
            raise ValueError(f"{generated_manifest}: candidate id {r['candidate']!r} is not unique")
        out[r["candidate"]] = r
    return out


def _require_latents(manifest: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    stale = [r["candidate"] for r in rows if "latents_path" not in r]
    if stale:
        raise ValueError(f"{manifest}: candidate(s) {stale[:3]} have no latents_path (written by an older "
                         f"generate stage); rerun generate so the arms train on the sampled latents")


def load_pairs(generator, pairs_path: str | Path, generated_manifest: str | Path,
               world_manifest: str | Path, *, stage: str) -> TargetSet:
    """Judge-labelled (winner, loser) pairs of flow stage ``stage``'s latents, clean-image conditioning."""
    rows = read_jsonl(pairs_path)
    _require_columns(pairs_path, rows, PAIR_KEYS)
    cands = candidates_by_id(generated_manifest)
    _require_latents(generated_manifest, cands.values())
    images = world_images(world_manifest)
    rows = sorted(rows, key=lambda r: (r["object_id"], r["winner_candidate"], r["loser_candidate"]))
    skipped: Counter = Counter()
    keep_ids, img_paths, xw, xl, empty = [], [], [], [], 0
    for r in tqdm(rows, desc="pair targets", leave=False):
        if r["object_id"] not in images:
            raise ValueError(f"{pairs_path}: object {r['object_id']!r} is not in {world_manifest}")
        targets = []
        for side in ("winner", "loser"):
            cand = cands.get(r[f"{side}_candidate"], {})
            x0, reason = load_target(cand, stage)
            if reason:
                skipped[f"{side}_{reason}"] += 1
                break
            targets.append((x0, bool(cand.get("empty"))))
        if len(targets) < 2:
            continue
        empty += sum(is_empty for _, is_empty in targets)
        keep_ids.append(r["object_id"])
        img_paths.append(images[r["object_id"]])
        xw.append(targets[0][0])
        xl.append(targets[1][0])
    if not keep_ids:
        raise NoTrainingData(f"{pairs_path}: no usable pairs ({dict(skipped)} skipped); check the generate stage")
    cond = encode_image_paths(generator, img_paths, desc="encode clean inputs")
    return TargetSet(keep_ids, cond, cat_latents(xw), cat_latents(xl), dict(skipped), empty)


def load_clean_targets(generator, degraded_manifest: str | Path, generated_manifest: str | Path,
                       allowed_ids: set[str], *, stage: str, budget: str = "high") -> TargetSet:
    """``sft_clean``: conditioning from the degraded image, target = flow stage ``stage``'s latent of
    the clean input's ``budget`` sample.

    Only objects in ``allowed_ids`` (the train split) are used."""
    deg = {r["object_id"]: r["image_path"] for r in degraded_rows(degraded_manifest)
           if r["object_id"] in allowed_ids}
    cands = sorted((r for r in candidates_by_id(generated_manifest).values()
                    if r.get("regime") == "clean" and r.get("budget") == budget and r["object_id"] in deg),
                   key=lambda r: (r["object_id"], r["candidate"]))
    if not cands:
        raise ValueError(f"{generated_manifest} has no clean '{budget}'-budget samples of objects in "
                         f"{degraded_manifest}; degrade the train split and generate the train set")
    _require_latents(generated_manifest, cands)
    skipped: Counter = Counter()
    keep_ids, img_paths, xw, empty = [], [], [], 0
    for r in tqdm(cands, desc="clean targets", leave=False):
        x0, reason = load_target(r, stage)
        if reason:
            skipped[f"target_{reason}"] += 1
            continue
        empty += bool(r.get("empty"))
        keep_ids.append(r["object_id"])
        img_paths.append(deg[r["object_id"]])
        xw.append(x0)
    if not keep_ids:
        raise NoTrainingData(f"{generated_manifest}: no usable clean targets ({dict(skipped)} skipped)")
    cond = encode_image_paths(generator, img_paths, desc="encode degraded inputs")
    return TargetSet(keep_ids, cond, cat_latents(xw), None, dict(skipped), empty)


def load_feature_pairs(generator, degraded_manifest: str | Path, allowed_ids: set[str]) -> FeaturePairs:
    """Conditioner repair: tokens of each object's degraded and clean input image (``allowed_ids`` only)."""
    rows = [r for r in degraded_rows(degraded_manifest) if r["object_id"] in allowed_ids]
    if not rows:
        raise ValueError(f"{degraded_manifest} has no train-split objects; degrade the train split too")
    ids = [r["object_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{degraded_manifest}: an object appears more than once")
    degraded = encode_image_paths(generator, [r["image_path"] for r in rows], desc="encode degraded")
    clean = encode_image_paths(generator, [r["clean_image_path"] for r in rows], desc="encode clean")
    return FeaturePairs(ids, degraded, clean)
