"""judge-eval: regenerate the held-out base reference with an arm, render it, and have the
evaluation judge compare arm vs base in both orders.

The arm's outputs use exactly the base reference's objects, input images (the arm's regime),
budget and noise seeds, so the only difference between x (arm) and y (base) is the arm itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from judge3d.adapt.arms import arm_spec
from judge3d.core.config import ParamsError, require
from judge3d.pipeline.mesh_sets import Job, generate_set, load_budgets
from judge3d.core.io import read_jsonl, write_jsonl
from judge3d.judges.pairing import FLAGGED_LOG, partition_flagged
from judge3d.judges.protocol import Pair, run_pairs
from judge3d.judges.references import input_images, is_reference_aware, judge_prompt, with_references

VERDICTS = "verdicts.jsonl"
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class ArmOnGenerator:
    """Puts the arm saved in ``arm_dir`` onto a loaded generator (:func:`judge3d.adapt.apply_arm`) and
    returns its conditioning transform: the ``arm`` of a
    :class:`~judge3d.pipeline.generator_replica.GeneratorReplica`, so a Ray replica can load it too."""
    arm_dir: str

    def __call__(self, generator) -> Callable:
        from judge3d.adapt import apply_arm

        return apply_arm(generator, self.arm_dir)

    def __str__(self) -> str:
        return f"arm {self.arm_dir}"


def arm_regime(params: Mapping[str, Any], arm: str) -> str:
    """The input regime an arm is evaluated in: its severity, or clean (the arm registry)."""
    return arm_spec(params, arm).regime


def base_reference(base_montage_rows: list[dict[str, Any]], budget: str, seed_index: int) -> list[dict[str, Any]]:
    """The base outputs every arm is compared with: one per held-out object at (budget, seed index)."""
    rows = [r for r in base_montage_rows if r["budget"] == budget and r["seed_index"] == seed_index]
    if not rows:
        raise ValueError(f"no base reference rows with budget={budget!r}, seed_index={seed_index}: "
                         "check generate.sets.heldout_<regime> and arm_eval.{budget,seed_index}")
    seen = set()
    for r in rows:
        if r["object_id"] in seen:
            raise ValueError(f"base reference has two rows for {r['object_id']}")
        seen.add(r["object_id"])
    return sorted(rows, key=lambda r: r["object_id"])


def arm_jobs(reference: list[dict[str, Any]], world_rows: list[dict[str, Any]],
             params: Mapping[str, Any], budget: str) -> list[Job]:
    """Jobs that regenerate each reference row (same object, input image, budget, seed)."""
    budgets = load_budgets(dict(params))
    if budget not in budgets:
        raise ParamsError(f"params.yaml: arm_eval.budget {budget!r} is not in sampler.budgets {sorted(budgets)}")
    world = {r["object_id"]: r for r in world_rows}
    jobs = []
    for r in reference:
        w = world.get(r["object_id"])
        if w is None:
            raise ValueError(f"base reference object {r['object_id']} is not in the world manifest; rerun data")
        jobs.append(Job(r["object_id"], r["category"], r["split"], r["regime"], budgets[budget],
                        int(r["seed_index"]), int(r["seed"]), r["input_image_path"], w["mesh_path"], w["voxel_path"]))
    return jobs


def arm_pairs(arm: str, arm_rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[Pair]:
    """x = the arm's montage, y = the base's, per object (a strict win is a win for the arm)."""
    base_by_object = {r["object_id"]: r for r in reference}
    pairs = []
    for a in arm_rows:
        b = base_by_object[a["object_id"]]
        pairs.append(Pair(pair_id=f"{arm}:{a['object_id']}", object_id=a["object_id"],
                          x=a["montage_path"], y=b["montage_path"], x_candidate=f"{arm}/{a['candidate']}",
                          y_candidate=f"base/{b['candidate']}", x_oracle=a.get("oracle_score"), y_oracle=b.get("oracle_score"),
                          meta={"arm": arm, "regime": a["regime"], "seed": a["seed"]}))
    return pairs


def evaluate_arm(arm: str, *, generator, judge, params: Mapping[str, Any],
                 base_montage_manifest: str | Path, world_manifest: str | Path, out_dir: str | Path,
                 show_progress: bool = True, cond_transform=None) -> list[dict[str, Any]]:
    """Generate, render and judge one arm; writes ``out_dir/{manifest.jsonl, verdicts.jsonl, meshes/, montages/}``.

    ``generator`` is a :class:`~judge3d.pipeline.generator_replica.GeneratorReplica` with the arm's folder as its
    ``arm_dir`` (or a loaded generator with the arm already on it and ``cond_transform``).
    Each step resumes: generation through its partial manifest, rendering through its progress
    file, judging through the verdict log (logged queries are not asked again).
    """
    from judge3d.render.batch import render_manifest

    out_dir = Path(out_dir)
    budget = require(params, "arm_eval.budget", str)
    seed_index = require(params, "arm_eval.seed_index", int, check=lambda v: v >= 0)
    batch = require(params, "generate.batch_size", int, check=lambda v: v > 0)
    reference = base_reference(read_jsonl(base_montage_manifest), budget, seed_index)
    regime = arm_regime(params, arm)
    if {r["regime"] for r in reference} != {regime}:
        raise ValueError(f"{base_montage_manifest} holds regimes {sorted({r['regime'] for r in reference})}, "
                         f"but arm {arm} is evaluated on {regime!r} (arms.{arm})")
    jobs = arm_jobs(reference, read_jsonl(world_manifest), params, budget)
    generate_set(generator, jobs, out_dir / "meshes", dict(params), batch_size=batch,
                 cond_transform=cond_transform, set_name=f"arm {arm}", extra={"arm": arm})
    arm_rows = render_manifest(out_dir / "meshes" / MANIFEST, out_dir / "montages", params)
    # The arm's manifest is the rendered rows (meshes + montages + oracle scores), at the top level.
    write_jsonl(out_dir / MANIFEST, arm_rows)
    prompt = judge_prompt(params, "eval")
    # A pair with a blank or clipped montage (arm's or base's) is not judged; it is recorded in
    # flagged.jsonl, which arm-metrics counts as n_flagged (written first, so a kill keeps it).
    pairs, flagged = partition_flagged(arm_pairs(arm, arm_rows, reference), arm_rows, reference)
    write_jsonl(out_dir / FLAGGED_LOG, flagged)
    # the reference-aware ablation: each pair also shows the object's clean input image (not the
    # regime's degraded one: the judge must be able to tell an output of another object)
    input_refs = input_images(world_manifest) if is_reference_aware(params, "eval") else None
    return run_pairs(judge, with_references(pairs, input_refs), out_dir / VERDICTS, prompt,
                     require(params, "arm_eval.batch_size", int, check=lambda v: v >= 1),
                     show_progress=show_progress)
