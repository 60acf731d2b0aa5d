"""Which prompt a judge is asked with, and the reference images of the reference-aware ablation.

The study's protocol is reference-free: the judge sees the two montages only (a judge shown many
images tends to answer by position). The ablation (``judges.eval.reference: true``) trains and asks
the evaluation judge with the object's input image beside them, at the prompt's ``<image0>`` slot
(``judge.reference_prompt``); the swap protocol swaps the two montages only. Every stage that trains
or asks a judge takes its prompt and references from here.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from judge3d.core.config import ParamsError, require
from judge3d.core.io import read_jsonl
from judge3d.judges.protocol import Pair
from judge3d.judges.slots import prompt_image_count


def is_reference_aware(params: Mapping[str, Any], role: str) -> bool:
    """judges.eval.reference: the eval judge is trained and asked with the object's input image beside
    the two montages (the reference-aware ablation; the study's protocol is reference-free). The
    training judge labels reference-free: judges.train.reference may only be absent or false."""
    if role != "eval":
        if (params.get("judges", {}).get(role) or {}).get("reference"):
            raise ParamsError(f"params.yaml: judges.{role}.reference is true, but only the evaluation judge has a "
                              "reference-aware ablation (judges.eval.reference); set it false or delete it.")
        return False
    return require(params, "judges.eval.reference", bool,
                   hint="true: the reference-aware ablation (input image + two montages); false: the study's "
                        "reference-free protocol")


def judge_prompt(params: Mapping[str, Any], role: str) -> str:
    """The prompt the judge of ``role`` is trained and asked with: judge.prompt (two montages), or
    judge.reference_prompt where the judge is reference-aware (the input image at <image0> as well)."""
    reference = is_reference_aware(params, role)
    key = "judge.reference_prompt" if reference else "judge.prompt"
    prompt = require(params, key, str, check=lambda v: bool(v.strip()))
    wanted = 3 if reference else 2
    try:
        n = prompt_image_count(prompt)
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {key}: {exc}") from exc
    if n != wanted:
        raise ParamsError(f"params.yaml: {key} shows {n} images, but judges.{role}.reference is "
                          f"{str(reference).lower()}, which needs {wanted}: "
                          + ("name <image0> (the input image) before <image1> and <image2>."
                             if reference else "leave <image0> out of judge.prompt."))
    return prompt


def input_images(world_manifest: str | Path) -> dict[str, str]:
    """object id -> its clean input image (the world manifest's image_path): a reference-aware judge's
    reference, the same for every regime, so that it can tell an output of another object."""
    rows = read_jsonl(world_manifest)
    if not rows:
        raise ValueError(f"{world_manifest}: empty world manifest; rerun the data stage (dvc repro data).")
    return {r["object_id"]: r["image_path"] for r in rows}


def with_references(pairs: Sequence[Pair], references: Mapping[str, str] | None) -> list[Pair]:
    """The pairs with each object's reference image (None: the pairs as they are)."""
    if references is None:
        return list(pairs)
    missing = sorted({p.object_id for p in pairs} - set(references))
    if missing:
        raise ValueError(f"no input image for object(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} in the "
                         "world manifest; rerun the data stage, or set judges.eval.reference false.")
    return [replace(p, reference=references[p.object_id]) for p in pairs]
