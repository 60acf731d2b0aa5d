"""Mesh sets: which (object, input regime, budget, seed) candidates a set holds, and producing them.

A set is defined in params ``generate.sets.<name>`` (split, regime, entries of budget/n_objects/n_seeds);
budgets in ``sampler.budgets`` (settings per flow stage over ``sampler.stages``). The noise seed of a
candidate depends only on (params seed, object, seed index), never on the set, budget or batch, so an
arm that regenerates a held-out output with the same seed index starts from the very same noise as
the base did. Each candidate keeps its mesh (``.ply``), the oracle's occupancy grid and the latents
every stage sampled (``.latents.safetensors``, manifest column ``latents_path``): the arms' targets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from judge3d.core.config import ParamsError, deep_merge, require
from judge3d.generators.base import Generator
from judge3d.generators.stages import StageSampler, pack_outputs
from judge3d.world.dataset import load_image
from judge3d.world.degrade import REGIMES
from judge3d.core.io import JsonlAppender, read_jsonl, write_jsonl
from judge3d.core.seeding import derive_seed
from judge3d.pipeline.generator_replica import GeneratorReplica


STAGE_SAMPLER_KEYS = ("steps", "cfg_strength", "cfg_interval", "rescale_t")


PIPELINE_SETTINGS = "pipeline"   # a budget's stage given as this word samples with the generator's own defaults


@dataclass(frozen=True)
class Budget:
    """A named sampling budget: the sampler settings of flow stages by name. A stage's settings may
    be None: the generator's own defaults (TRELLIS: its pipeline.json), filled in by :meth:`resolved`.
    ``sampler.stages`` may name stages of several backends; a generator samples with its own."""
    name: str
    stages: dict[str, StageSampler | None]

    def resolved(self, gen: Generator) -> "Budget":
        """The settings of the generator's stages, in its order, with its defaults filled in."""
        missing = [s for s in gen.stage_names if s not in self.stages]
        if missing:
            raise ParamsError(f"params.yaml: sampler.budgets.{self.name} has no settings for stage(s) {missing} of "
                              f"{type(gen).__name__} (stages {gen.stage_names}); add them under sampler.stages and "
                              f"sampler.budgets.{self.name}, or give '{PIPELINE_SETTINGS}'")
        defaults = gen.default_settings() if any(self.stages[s] is None for s in gen.stage_names) else {}
        return Budget(self.name, {s: self.stages[s] or defaults[s] for s in gen.stage_names})

    def row(self) -> dict[str, dict[str, Any]]:
        unresolved = [s for s, v in self.stages.items() if v is None]
        if unresolved:
            raise ValueError(f"budget '{self.name}' takes the generator's defaults for {unresolved}: resolve it first")
        return {stage: settings.as_dict() for stage, settings in self.stages.items()}


def load_budgets(params: dict[str, Any]) -> dict[str, Budget]:
    """``sampler.budgets.<budget>.<stage>`` over the shared ``sampler.stages.<stage>`` settings."""
    shared = require(params, "sampler.stages", dict, check=lambda v: len(v) > 0,
                     hint="one block per flow stage of the generator, e.g. `flow: {cfg_interval: [0.5, 1.0], "
                          "rescale_t: 3.0}`")
    budgets = {}
    for name in require(params, "sampler.budgets", dict):
        block = require(params, f"sampler.budgets.{name}", dict)
        unknown = sorted(set(block) - set(shared))
        if unknown:
            raise ParamsError(f"params.yaml: sampler.budgets.{name} names stage(s) {unknown} that sampler.stages "
                              f"does not list ({sorted(shared)})")
        stages = {}
        for stage in shared:
            if block.get(stage) == PIPELINE_SETTINGS:
                stages[stage] = None
                continue
            # Checked under the budget's own key path, so an error names sampler.budgets.<budget>.<stage>.<key>.
            settings = deep_merge(require(params, f"sampler.stages.{stage}", dict), block.get(stage) or {})
            merged = {"sampler": {"budgets": {name: {stage: settings}}}}
            where = f"sampler.stages.{stage} or sampler.budgets.{name}.{stage}"
            extra = sorted(set(settings) - set(STAGE_SAMPLER_KEYS))
            if extra:
                raise ParamsError(f"params.yaml: {where} set(s) {extra}; a stage's sampler reads {list(STAGE_SAMPLER_KEYS)}")
            get = lambda key, kind, check=None, hint="": require(  # noqa: E731
                merged, f"sampler.budgets.{name}.{stage}.{key}", kind, check=check, hint=f"(set it in {where}) {hint}".strip())
            interval = get("cfg_interval", list, lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1,
                           "two numbers lo <= hi in [0, 1], e.g. [0.5, 1.0]")
            stages[stage] = StageSampler(steps=get("steps", int, lambda v: v >= 1),
                                         cfg_strength=get("cfg_strength", float, lambda v: v >= 0),
                                         cfg_interval=(float(interval[0]), float(interval[1])),
                                         rescale_t=get("rescale_t", float, lambda v: v > 0))
        budgets[name] = Budget(name=name, stages=stages)
    return budgets


def candidate_seed(base_seed: int, object_id: str, seed_index: int) -> int:
    return derive_seed(base_seed, "generate", object_id, seed_index)


@dataclass(frozen=True)
class Job:
    object_id: str
    category: str
    split: str
    regime: str
    budget: Budget
    seed_index: int
    seed: int
    image_path: str
    mesh_path_gt: str | None    # None: a user's image (world.images_dir), no ground truth, no oracle
    voxel_path_gt: str | None

    @property
    def candidate(self) -> str:
        return f"{self.object_id}__{self.regime}__{self.budget.name}__s{self.seed_index}"


def regime_images(regime: str, degraded_dir: str | Path) -> dict[str, str] | None:
    """object_id -> degraded input image for a hard regime (None for clean: the world's own image)."""
    if regime == "clean":
        return None
    return {r["object_id"]: r["image_path"] for r in read_jsonl(Path(degraded_dir) / regime / "manifest.jsonl")}


def plan_set(params: dict[str, Any], set_name: str, world_rows: list[dict[str, Any]],
             degraded_dir: str | Path = "data/degraded") -> list[Job]:
    key = f"generate.sets.{set_name}"
    require(params, key, dict, hint="define the set under generate.sets in params.yaml")
    split = require(params, f"{key}.split", str)
    regime = require(params, f"{key}.regime", str, check=lambda v: v in REGIMES, hint=f"one of {REGIMES}")
    entries = require(params, f"{key}.entries", list, check=lambda v: len(v) > 0)
    budgets = load_budgets(params)
    base_seed = require(params, "seed", int)
    objects = sorted((r for r in world_rows if r["split"] == split), key=lambda r: r["object_id"])
    images = regime_images(regime, degraded_dir)
    jobs: list[Job] = []
    for i, entry in enumerate(entries):
        where = f"{key}.entries[{i}]"
        if not isinstance(entry, dict) or entry.get("budget") not in budgets:
            raise ParamsError(f"params.yaml: {where}.budget must name one of sampler.budgets {sorted(budgets)}")
        n_obj, n_seeds = entry.get("n_objects"), entry.get("n_seeds", 1)
        for name, v in (("n_objects", n_obj), ("n_seeds", n_seeds)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParamsError(f"params.yaml: {where}.{name} must be a positive integer, got {v!r}")
        if n_obj > len(objects):
            source = (f"world.images_dir/{split} holds that many images" if any(r.get("oracle") is False for r in objects)
                      else f"world.n_{split}")
            raise ParamsError(f"params.yaml: {where}.n_objects = {n_obj} but split '{split}' has "
                              f"{len(objects)} objects ({source})")
        for row in objects[:n_obj]:
            if images is not None and row["object_id"] not in images:
                raise FileNotFoundError(f"{degraded_dir}/{regime}/manifest.jsonl has no image for "
                                        f"{row['object_id']}: degrade split '{split}' (the degrade stage)")
            image = row["image_path"] if images is None else images[row["object_id"]]
            for s in range(n_seeds):
                jobs.append(Job(row["object_id"], row["category"], split, regime, budgets[entry["budget"]], s,
                                candidate_seed(base_seed, row["object_id"], s), image,
                                row["mesh_path"], row["voxel_path"]))
    names = [j.candidate for j in jobs]
    if len(set(names)) != len(names):
        raise ParamsError(f"params.yaml: {key} lists the same (budget, seed) twice for an object")
    return jobs


def _batches(jobs: list[Job], size: int) -> Iterable[list[Job]]:
    by_budget: dict[str, list[Job]] = {}
    for job in jobs:
        by_budget.setdefault(job.budget.name, []).append(job)
    for group in by_budget.values():
        for i in range(0, len(group), size):
            yield group[i:i + size]


def generate_set(gen: Generator | GeneratorReplica, jobs: list[Job], out_dir: str | Path, params: dict[str, Any], *,
                 batch_size: int = 32, cond_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 set_name: str = "", extra: dict[str, Any] | None = None,
                 workers: int | None = None) -> list[dict[str, Any]]:
    """Sample, decode, save and score every job; resumable through ``<out_dir>/.partial.jsonl``.

    ``gen`` is a loaded generator or a :class:`~judge3d.pipeline.generator_replica.GeneratorReplica` (a folder to
    load, optionally with an arm). ``cond_transform`` maps conditioning tokens before sampling (the
    repair arms; a replica with an arm brings its own); the generator only ever sees the input image,
    never the ground truth. Oracle metrics are computed after decoding, from the ground-truth files.

    In-process (the default), saving and scoring run in ``workers`` processes
    (:mod:`judge3d.core.parallel`; default ``$JUDGE3D_WORKERS`` or the CPU count), decoding too where
    the generator allows (:meth:`Generator.decode_jobs`), while this process samples the next batch.
    With ``JUDGE3D_EXECUTOR=ray`` (:mod:`judge3d.core.ray_executor`), each batch is sampled, decoded
    and scored on a Ray replica of ``gen`` (which must then be a replica), one per GPU. Rows and
    files are identical either way, for any worker or replica count: batches are cut the same way,
    every candidate's noise comes from its own seed, and this process writes the rows in job order.
    """
    from judge3d.core.parallel import ordered_map
    from judge3d.core.ray_executor import use_ray

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".partial.jsonl"
    done = {r["candidate"]: r for r in read_jsonl(partial)} if partial.exists() else {}
    todo = [j for j in jobs if j.candidate not in done]
    batches = list(_batches(todo, batch_size))
    score = _CandidateScorer(out_dir, params, set_name, extra or {})
    t0 = time.time()
    if isinstance(gen, GeneratorReplica) and cond_transform is not None:
        raise ValueError("with a GeneratorReplica, give the arm as its `arm`, not as cond_transform")
    if use_ray():
        if not isinstance(gen, GeneratorReplica):
            raise TypeError("JUDGE3D_EXECUTOR=ray sends a GeneratorReplica (the model folder and its settings) to its "
                            f"workers, not a loaded {type(gen).__name__}; pass GeneratorReplica(...) to generate_set")
        from judge3d.core.ray_executor import ordered_map as ray_ordered_map

        rows = (row for batch_rows in ray_ordered_map(_SetBatchOnReplica(gen, score), batches,
                                                      [f"candidates {b[0].candidate}..{b[-1].candidate}" for b in batches],
                                                      what=gen.describe())
                for row in batch_rows)
    else:
        if isinstance(gen, GeneratorReplica):
            gen, cond_transform = gen.load()
        rows = ordered_map(score, (item for batch in batches for item in _sample_batch(gen, cond_transform, batch)),
                           workers)
    with JsonlAppender(partial) as sink, tqdm(total=len(jobs), initial=len(jobs) - len(todo),
                                              desc=f"generate {set_name}".strip()) as bar:
        for row in rows:
            sink.append(row)
            done[row["candidate"]] = row
            bar.update(1)
    rows = [done[j.candidate] for j in jobs]
    write_jsonl(out_dir / "manifest.jsonl", rows)
    partial.unlink(missing_ok=True)
    print(f"generate {set_name}: {len(todo)} new candidates in {time.time() - t0:.1f} s "
          f"({len(jobs) - len(todo)} resumed)")
    return rows


def _sample_batch(gen: Generator, cond_transform: Callable | None, batch: list[Job]) -> list[tuple[Job, Any, dict]]:
    """Sample one batch (all one budget): (job with the budget resolved for ``gen``, its decode job,
    its latents) per member. The decode jobs are what the scorer turns into meshes."""
    batch = [replace(j, budget=j.budget.resolved(gen)) for j in batch]
    cond = gen.encode_images([load_image(j.image_path) for j in batch])
    if cond_transform is not None:
        cond = cond_transform(cond)
    outputs = gen.sample(cond, batch[0].budget.stages, seed=[j.seed for j in batch])
    # Decoding runs in the workers too, where the generator allows it (Generator.decode_jobs).
    decode_jobs = gen.decode_jobs(outputs)
    if len(decode_jobs) != len(batch):
        raise RuntimeError(f"{type(gen).__name__}.decode_jobs returned {len(decode_jobs)} jobs for "
                           f"{len(batch)} latents")
    return list(zip(batch, decode_jobs, (pack_outputs(outputs, i) for i in range(len(batch)))))


@dataclass(frozen=True)
class _SetBatchOnReplica:
    """Ray work-item factory: a replica of the generator samples, decodes and scores one batch a call
    and returns its manifest rows (the files go to the set's folder, as in-process)."""
    replica: GeneratorReplica
    score: "_CandidateScorer"

    def __call__(self) -> Callable[[list[Job]], list[dict[str, Any]]]:
        gen, cond_transform = self.replica.load()
        return lambda batch: [self.score(item) for item in _sample_batch(gen, cond_transform, batch)]


class _CandidateScorer:
    """Save one decoded candidate, score it against its ground truth and build its manifest row.
    Each worker process keeps its own cache of ground-truth references."""

    def __init__(self, out_dir: Path, params: dict[str, Any], set_name: str, extra: dict[str, Any]):
        from judge3d.world.geometry import GeometryConfig

        self.out_dir, self.set_name, self.extra = out_dir, set_name, extra
        self.geometry = GeometryConfig.from_params(params)
        self.refs: dict[str, Any] = {}

    def reference(self, job: Job):
        from judge3d.world.geometry import load_mesh, prepare_ground_truth

        if job.object_id not in self.refs:
            gt_mesh, flags = load_mesh(job.mesh_path_gt)
            if gt_mesh is None:
                raise ValueError(f"ground-truth mesh {job.mesh_path_gt} unusable ({flags}); rerun data")
            self.refs[job.object_id] = prepare_ground_truth(gt_mesh, np.load(job.voxel_path_gt), params=self.geometry,
                                                                source=job.mesh_path_gt)
        return self.refs[job.object_id]

    def __call__(self, item: tuple[Job, Any, dict[str, np.ndarray]]) -> dict[str, Any]:
        from safetensors.numpy import save_file

        from judge3d.world.geometry import no_oracle_metrics, oracle_metrics, validity
        from judge3d.world.voxel import voxelize

        job, decode_job, latents = item
        # What the sampler produced, every stage's output: the arms train on these exact latents.
        latents_path = self.out_dir / f"{job.candidate}{LATENTS_SUFFIX}"
        save_file(latents, str(latents_path))
        mesh = decode_job.mesh()
        mesh_path = self.out_dir / f"{job.candidate}.ply"
        occupancy_path = self.out_dir / f"{job.candidate}{OCCUPANCY_SUFFIX}"
        empty = bool(mesh.metadata.get("empty", len(mesh.faces) == 0))
        pred_voxels = None
        if not empty:
            mesh.export(mesh_path)
            # The grid the oracle's IoU is computed on, kept so a rescoring need not voxelize again.
            pred_voxels = voxelize(mesh, self.geometry.iou_resolution, self.geometry.iou_supersample)
            save_occupancy(occupancy_path, pred_voxels, self.geometry.iou_supersample)
        else:
            mesh_path.unlink(missing_ok=True)
            occupancy_path.unlink(missing_ok=True)
        pred_flags = {"empty": empty, "nan": bool(mesh.metadata.get("nan"))}
        has_oracle = job.mesh_path_gt is not None
        if has_oracle:
            metrics = oracle_metrics(None if empty else mesh, self.reference(job), params=self.geometry,
                                     pred_flags=pred_flags, pred_voxels=pred_voxels)
        else:  # a user's image: no ground truth, so null oracle fields, never a made-up score
            metrics = no_oracle_metrics(None if empty else mesh, pred_flags)
        row = {"object_id": job.object_id, "category": job.category, "split": job.split,
               "regime": job.regime, "budget": job.budget.name, "sampler": job.budget.row(),
               "seed": job.seed, "seed_index": job.seed_index,
               "candidate": job.candidate, "input_image_path": job.image_path,
               "mesh_path": mesh_path.as_posix(), "latents_path": latents_path.as_posix(),
               "occupancy_path": None if empty else occupancy_path.as_posix(),
               "gt_mesh_path": job.mesh_path_gt,
               "set": self.set_name, **metrics, "empty": empty, "validity": validity(None if empty else mesh)}
        if not has_oracle:
            row["oracle"] = False
        row.update(self.extra)
        return row


OCCUPANCY_SUFFIX = ".occupancy.npy"
LATENTS_SUFFIX = ".latents.safetensors"   # keys: a dense stage's name; <stage>.coords / <stage>.feats (sparse)


def save_occupancy(path: Path, grid: np.ndarray, supersample: int) -> None:
    """Occupancy fractions are k / supersample^3. Where that denominator is a power of two up to
    512 (supersample 1, 2, 4, 8), float16 holds every value exactly at half the bytes; otherwise
    the float32 grid is kept as it is."""
    cells = int(supersample) ** 3
    exact_in_half = cells <= 512 and cells & (cells - 1) == 0
    np.save(path, np.asarray(grid, dtype=np.float16 if exact_in_half else np.float32), allow_pickle=False)
