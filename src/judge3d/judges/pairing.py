"""Which pairs `judge-train-labels` and `calibrate` judge, built from render-stage montage manifests.

Every builder returns :class:`~judge3d.judges.protocol.Pair` lists with ``x`` = the candidate expected
to be better (high budget over low, clean input over degraded, an output over its deliberately
degraded copy, reference seed s0 over s1). Both
presentation orders are asked for every pair, so the choice of x only fixes the sign of the
reported rates ("strict" = x wins), never the position a montage is shown in.

Pair ids are stable strings ``<kind>:<object_id>:<x candidate>|<y candidate>`` (kind prefixes keep
the controls apart when pooled; headroom's is ``headroom_<severity>``). ``x_oracle``/``y_oracle`` are the manifest's ``oracle_score``
(F-score@tau, see judge3d.world.geometry); None where a row has none.

Rows used: object_id, budget, seed, candidate, montage_path, mesh_path, oracle_score (+ optional
seed_index / empty / category / image_path). Within one (object, budget), samples are ordered by
:func:`sample_rank`: ``seed_index`` when the manifest has it (0 = the reference seed s0), else the seed.
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from typing import Any, Iterable, Sequence

from judge3d.judges.protocol import Pair

KINDS = ("high_low", "iid", "clear_gap", "headroom", "base_vs_base")
_REQUIRED = ("object_id", "budget", "candidate", "montage_path")


def _check_rows(rows: Sequence[dict[str, Any]], source: str) -> None:
    if not rows:
        raise ValueError(f"{source}: the montage manifest has no rows; run generate + render for this set.")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if row.get(k) in (None, "")]
        if missing:
            hint = " (run the render stage on this set)" if "montage_path" in missing else ""
            raise ValueError(f"{source}: row {i} ({row.get('candidate', '?')}) lacks {missing}{hint}.")
        if row["candidate"] in seen:
            raise ValueError(f"{source}: candidate {row['candidate']!r} appears twice; candidate ids must be unique.")
        seen.add(row["candidate"])


def _oracle(row: dict[str, Any]) -> float | None:
    value = row.get("oracle_score")
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None  # a NaN score is unknown, never a number


def sample_rank(row: dict[str, Any]) -> tuple:
    """Order of i.i.d. samples within an (object, budget): seed_index if present, else seed, then id."""
    if row.get("seed_index") is not None:
        return (0, int(row["seed_index"]), str(row["candidate"]))
    if row.get("seed") is not None:
        return (1, int(row["seed"]), str(row["candidate"]))
    return (2, 0, str(row["candidate"]))


def _by_object_budget(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        out[str(row["object_id"])][str(row["budget"])].append(row)
    for budgets in out.values():
        for samples in budgets.values():
            samples.sort(key=sample_rank)
    return out


def _one(samples: list[dict[str, Any]], source: str, object_id: str, budget: str) -> dict[str, Any]:
    if len(samples) != 1:
        raise ValueError(f"{source}: object {object_id} has {len(samples)} '{budget}' rows, expected exactly one "
                         f"(candidates {[r['candidate'] for r in samples]}); regenerate the set.")
    return samples[0]


def _side(row: dict[str, Any]) -> dict[str, Any]:
    return {"budget": row.get("budget"), "seed": row.get("seed"), "regime": row.get("regime"),
            "mesh_path": row.get("mesh_path"), "empty": bool(row.get("empty", False))}


def make_pair(kind: str, x: dict[str, Any], y: dict[str, Any], *, id_prefix: str | None = None, **meta: Any) -> Pair:
    """A Pair of two manifest rows of the same object, x expected better; meta gets kind + both sides.

    ``id_prefix`` (default: the kind) starts the pair id; headroom uses headroom_<severity>, since
    candidate ids need only be unique within one mesh set."""
    if kind not in KINDS:
        raise ValueError(f"pair kind {kind!r} is not one of {KINDS}.")
    if str(x["object_id"]) != str(y["object_id"]):
        raise ValueError(f"{kind}: x is object {x['object_id']}, y is object {y['object_id']}; pairs are within one object.")
    object_id = str(x["object_id"])
    return Pair(
        pair_id=f"{id_prefix or kind}:{object_id}:{x['candidate']}|{y['candidate']}", object_id=object_id,
        x=str(x["montage_path"]), y=str(y["montage_path"]), x_candidate=str(x["candidate"]),
        y_candidate=str(y["candidate"]), x_oracle=_oracle(x), y_oracle=_oracle(y),
        meta={"kind": kind, "x": _side(x), "y": _side(y), **meta})


def train_label_pairs(rows: Sequence[dict[str, Any]], *, winner_budget: str = "high", loser_budget: str = "low",
                      source: str = "train set") -> list[Pair]:
    """One (high, low) pair per object that has both budgets; x = high. Objects with neither are skipped
    (the i.i.d.-only subset); an object with only one of the two is an error (a broken generate run)."""
    _check_rows(rows, source)
    pairs = []
    for object_id, budgets in sorted(_by_object_budget(rows).items()):
        has_w, has_l = winner_budget in budgets, loser_budget in budgets
        if not (has_w or has_l):
            continue
        if has_w != has_l:
            missing = loser_budget if has_w else winner_budget
            raise ValueError(f"{source}: object {object_id} has no '{missing}' budget row to pair with; regenerate the set.")
        pairs.append(make_pair("high_low", _one(budgets[winner_budget], source, object_id, winner_budget),
                               _one(budgets[loser_budget], source, object_id, loser_budget)))
    if not pairs:
        raise ValueError(f"{source}: no object has both '{winner_budget}' and '{loser_budget}' rows; "
                         "check generate.sets.train in params.yaml.")
    return pairs


def iid_pairs(rows: Sequence[dict[str, Any]], *, budget: str = "default", source: str = "train set") -> list[Pair]:
    """All (i, j), i < j, pairs of the i.i.d. ``budget`` samples of each object (x = the earlier sample)."""
    _check_rows(rows, source)
    pairs = []
    for object_id, budgets in sorted(_by_object_budget(rows).items()):
        for a, b in combinations(budgets.get(budget, []), 2):
            pairs.append(make_pair("iid", a, b))
    if not pairs:
        raise ValueError(f"{source}: no object has two or more '{budget}' samples, so there are no i.i.d. pairs; "
                         "check generate.sets.train (k i.i.d. samples per object, k >= 2).")
    return pairs


def clear_gap_pairs(clean_rows: Sequence[dict[str, Any]], corrupted_rows: Sequence[dict[str, Any]], *,
                    clean_source: str = "heldout_clean", corrupted_source: str = "clear_gap") -> list[Pair]:
    """The clear-gap control: each base output (x) against the same output deliberately degraded (y).

    ``corrupted_rows`` come from the clear-gap-meshes stage: each names its clean side in
    ``source_candidate``; a corrupted row whose clean side is missing is an error."""
    _check_rows(clean_rows, clean_source)
    _check_rows(corrupted_rows, corrupted_source)
    by_candidate = {str(r["candidate"]): r for r in clean_rows}
    pairs = []
    for row in sorted(corrupted_rows, key=lambda r: (str(r["object_id"]), str(r["candidate"]))):
        source = row.get("source_candidate")
        if source is None or str(source) not in by_candidate:
            raise ValueError(f"{corrupted_source}: row {row['candidate']} names source candidate {source!r}, which "
                             f"{clean_source} does not hold; rerun clear-gap-meshes and render@clear_gap.")
        pairs.append(make_pair("clear_gap", by_candidate[str(source)], row, corruption=row.get("corruption")))
    return pairs


def _reference(budgets: dict[str, list[dict[str, Any]]], budget: str, source: str, object_id: str) -> dict[str, Any]:
    samples = budgets.get(budget, [])
    if not samples:
        raise ValueError(f"{source}: object {object_id} has no '{budget}' row (the base reference s0).")
    return samples[0]


def headroom_pairs(clean_rows: Sequence[dict[str, Any]], degraded_rows: Sequence[dict[str, Any]], severity: str,
                   *, budget: str = "default", clean_source: str = "heldout_clean",
                   degraded_source: str | None = None) -> list[Pair]:
    """Headroom at one severity: (clean-input default s0, degraded-input default s0) per object; x = clean.

    The clean row is the one with the degraded row's seed (same noise, only the input differs); if
    none has it, the error says so rather than pairing different noise.
    """
    degraded_source = degraded_source or f"heldout_{severity}"
    _check_rows(clean_rows, clean_source)
    _check_rows(degraded_rows, degraded_source)
    clean = _by_object_budget(clean_rows)
    pairs = []
    for object_id, budgets in sorted(_by_object_budget(degraded_rows).items()):
        deg = _reference(budgets, budget, degraded_source, object_id)
        if object_id not in clean:
            raise ValueError(f"{degraded_source}: object {object_id} is not in {clean_source}; both sets must use "
                             "the same held-out objects.")
        same_seed = [r for r in clean[object_id].get(budget, []) if r.get("seed") == deg.get("seed")]
        if not same_seed:
            raise ValueError(f"{clean_source}: object {object_id} has no '{budget}' row with seed {deg.get('seed')} "
                             f"(the seed of {degraded_source}'s row); regenerate with the same seeds.")
        pairs.append(make_pair("headroom", same_seed[0], deg, id_prefix=f"headroom_{severity}", severity=severity))
    return pairs


def base_vs_base_pairs(rows: Sequence[dict[str, Any]], *, budget: str = "default",
                       source: str = "heldout_clean") -> list[Pair]:
    """Base-vs-base control: the first two ``budget`` samples (s0 vs s1) of each object; x = s0."""
    _check_rows(rows, source)
    pairs = []
    for object_id, budgets in sorted(_by_object_budget(rows).items()):
        samples = budgets.get(budget, [])
        if len(samples) < 2:
            raise ValueError(f"{source}: object {object_id} has {len(samples)} '{budget}' samples; base-vs-base "
                             "needs two seeds (s0, s1) per object; check generate.sets.heldout_clean.")
        pairs.append(make_pair("base_vs_base", samples[0], samples[1]))
    return pairs


# --------------------------------------------------------------------------------------------
# kept training pairs (the arms' (winner, loser) data)
# --------------------------------------------------------------------------------------------
_COPIED = ("candidate", "mesh_path", "montage_path", "budget", "seed", "oracle_score")


def kept_pairs(pair_records: Sequence[dict[str, Any]], manifest_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Swap-consistent (high, low) verdicts as (winner, loser) rows for the arms, sorted by pair id.

    ``confidence`` is the debiased soft preference for the winner (s for x, 1 - s for y);
    ``judge_agrees_with_budget`` is False where the judge preferred the low-budget mesh;
    ``oracle_agrees`` is None where the oracle scores are missing or equal.
    """
    by_candidate = {str(r["candidate"]): r for r in manifest_rows}
    out = []
    for rec in sorted(pair_records, key=lambda r: str(r["pair_id"])):
        if not rec["consistent"]:
            continue
        sides = {}
        for side in ("x", "y"):
            cand = rec[f"{side}_candidate"]
            if cand not in by_candidate:
                raise ValueError(f"pair {rec['pair_id']}: candidate {cand} is not in the montage manifest; "
                                 "the verdict log and manifest are from different runs (rerun judge-train-labels).")
            sides[side] = by_candidate[cand]
        win, lose = ("x", "y") if rec["winner"] == "x" else ("y", "x")
        w, l = sides[win], sides[lose]
        row: dict[str, Any] = {"pair_id": rec["pair_id"], "object_id": rec["object_id"],
                               "confidence": rec["soft"] if win == "x" else 1.0 - rec["soft"],
                               "judge_agrees_with_budget": win == "x"}
        for key in _COPIED:
            row[f"winner_{key}"] = w.get(key)
            row[f"loser_{key}"] = l.get(key)
        for key in ("category", "image_path", "split", "regime"):
            if key in w:
                row[key] = w[key]
        wo, lo = _oracle(w), _oracle(l)
        row["oracle_agrees"] = None if wo is None or lo is None or wo == lo else wo > lo
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# flagged montages: counted, never judged
# --------------------------------------------------------------------------------------------
# Render flags (render stage) that make a montage unfit to judge: only background (no mesh, NaN,
# corrupt, zero-area faces or zero coverage), or part of the mesh cut off by the frame. A judge
# shown such a montage answers anyway, so a pair holding one is set aside and counted instead.
MONTAGE_FLAGS = ("render_empty", "render_clipped")
FLAGGED_LOG = "flagged.jsonl"


def montage_flags(row: dict[str, Any]) -> list[str]:
    """The montage flags set on a render-stage manifest row ([] for a montage fit to judge)."""
    return [f for f in MONTAGE_FLAGS if row.get(f)]


def partition_flagged(pairs: Sequence[Pair], *manifests: Sequence[dict[str, Any]],
                      control: str | None = None) -> tuple[list[Pair], list[dict[str, Any]]]:
    """(pairs to judge, one record per pair set aside because a side's montage is flagged).

    Sides are found by montage path in ``manifests`` (the rows the pairs were built from); a record
    holds pair_id, object_id, both candidates, each side's flags and ``control`` when given."""
    flags_of: dict[str, set[str]] = {}  # montage path -> flags of every row showing it
    for rows in manifests:
        for r in rows:
            flags_of.setdefault(str(r["montage_path"]), set()).update(montage_flags(r))
    judged, flagged = [], []
    for pair in pairs:
        x_flags = sorted(flags_of.get(pair.x, ()))
        y_flags = sorted(flags_of.get(pair.y, ()))
        if not (x_flags or y_flags):
            judged.append(pair)
            continue
        rec = {"pair_id": pair.pair_id, "object_id": pair.object_id, "x_candidate": pair.x_candidate,
               "y_candidate": pair.y_candidate, "x_flags": x_flags, "y_flags": y_flags}
        if control is not None:
            rec["control"] = control
        flagged.append(rec)
    return judged, flagged
