"""A judge as a recipe (params, role, model) rather than a loaded model, and :class:`RayJudge`, the judge
backend whose batches run on Ray replicas of it (:mod:`judge3d.core.ray_executor`), one per GPU. Its
``judge_id`` is computed from the weight files without loading the model, so the driver holds no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from judge3d.core.config import require


def load_hf_judge(params: Mapping[str, Any], role: str, model: str | None = None):
    """The in-process judge of ``role`` ('train' | 'eval'), with dtype/device/attention/batch from
    params ``judge.*``."""
    from judge3d.judges.hf import HFJudge

    return HFJudge.load(
        model or require(params, f"judges.{role}.model", str),
        dtype=require(params, "judge.dtype", str), device=require(params, "judge.device", str),
        attn_implementation=require(params, "judge.attn_implementation", str),
        batch_size=require(params, "judge.batch_size", int, check=lambda v: v >= 1))


@dataclass(frozen=True)
class JudgeReplica:
    """A judge to load in a worker: ``role``'s model (or ``model``) with the stage's params.
    ``judge_id`` is what the driver computed from the weight files; a replica that loads other
    weights (another node's copy of the folder differs) refuses to answer."""
    params: Mapping[str, Any]
    role: str
    model: str | None
    judge_id: str
    seed: int = 0

    def load(self):
        from judge3d.core.seeding import seed_everything

        seed_everything(self.seed)
        judge = load_hf_judge(self.params, self.role, self.model)
        if judge.judge_id != self.judge_id:
            raise RuntimeError(f"the replica loaded judge {judge.judge_id}, the stage expects {self.judge_id}: the "
                               "worker sees other weight files at the same path; give every node the same copy")
        return judge


@dataclass(frozen=True)
class _JudgeBatches:
    """Ray work-item factory: a replica of the judge answers one batch of queries a call."""
    replica: JudgeReplica
    prompt: str

    def __call__(self) -> Callable[[Sequence[tuple]], np.ndarray]:
        judge = self.replica.load()
        return lambda queries: np.asarray(judge.p_first(list(queries), self.prompt), dtype=np.float64)


class RayJudge:
    """A judge backend whose batches run on Ray replicas (one per GPU) of ``replica``.

    ``p_first_stream`` answers many batches at once, in order; the swap protocol
    (:func:`judge3d.judges.protocol.run_pairs`) hands it every batch it has no answer for. Each
    replica answers exactly the batches the in-process judge would, so the answers are the same."""

    def __init__(self, replica: JudgeReplica):
        self.replica = replica
        self.judge_id = replica.judge_id

    @classmethod
    def for_role(cls, params: Mapping[str, Any], role: str, model: str | None = None) -> "RayJudge":
        from judge3d.judges.hf import identify_judge

        model = model or require(params, f"judges.{role}.model", str)
        return cls(JudgeReplica(dict(params), role, model, identify_judge(model), require(params, "seed", int)))

    def p_first(self, pairs: Sequence[tuple], prompt: str) -> np.ndarray:
        return next(self.p_first_stream([pairs], prompt, labels=["1 batch"]))

    def p_first_stream(self, batches: Iterable[Sequence[tuple]], prompt: str,
                       labels: Sequence[str] | None = None) -> Iterator[np.ndarray]:
        from judge3d.core.ray_executor import ordered_map

        batches = [list(b) for b in batches]
        labels = list(labels) if labels is not None else [f"batch {i}" for i in range(len(batches))]
        yield from ordered_map(_JudgeBatches(self.replica, prompt), batches, labels,
                               what=f"judge {self.replica.model} ({self.judge_id})")
