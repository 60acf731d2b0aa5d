"""The swap protocol (docs/protocol.md#the-swap-protocol): both orders per pair, swap-consistent
verdicts, and the aggregates.

A backend is any object with ``judge_id: str`` and
``p_first(pairs: list[tuple[image, image]], prompt: str) -> np.ndarray`` (P(first is better)), and
optionally ``p_first_stream(batches, prompt, labels=...)`` answering many batches in order (replicas
on Ray: :class:`judge3d.pipeline.judge_replica.RayJudge`); for a
prompt naming the reference slot ``<image0>`` (:mod:`judge3d.judges.slots`) each query is a
(reference, first, second) triple instead, and the swap protocol swaps only first and second.
Answers go to the verdict log (:mod:`judge3d.judges.verdict_log`); every number below is computed
from log rows alone, so ``verify`` can recompute it without a model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from judge3d.core import stats
from judge3d.core.io import JsonlAppender, dumps, file_sha256, iter_jsonl
from judge3d.judges.slots import REFERENCE_SLOT, prompt_image_count
from judge3d.judges.verdict_log import ORDERS, latest_by_key, prompt_sha256, query_key, verdict_of
from judge3d.core.resume import AnswerCache

# Categories for inter-judge kappa. A flip (incl. a tie in either order) is its own category: it is
# the judge saying "cannot tell", and dropping those pairs would inflate agreement.
KAPPA_CATEGORIES = ("x", "y", "flip")


class Backend(Protocol):
    judge_id: str

    def p_first(self, pairs: list[tuple[Any, ...]], prompt: str) -> np.ndarray: ...


@dataclass(frozen=True)
class Pair:
    """One comparison of candidate x against candidate y (montage image paths).

    ``x_oracle``/``y_oracle``: the ground-truth quality of each candidate (higher is better; the
    caller picks the metric), used for judge-oracle agreement; None where unknown.
    ``reference``: the object's input image (a path), shown before both montages when the prompt
    names ``<image0>`` (reference-aware judging); None for the default, reference-free prompt.
    """
    pair_id: str
    object_id: str
    x: str
    y: str
    x_candidate: str | None = None
    y_candidate: str | None = None
    x_oracle: float | None = None
    y_oracle: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None


def queries_for(pair: Pair) -> list[tuple[str, str, str]]:
    """The pair's two queries as (order, first, second): 'xy' shows x first, 'yx' shows y first.
    The reference, if any, is the same in both orders (``pair.reference``)."""
    return [("xy", pair.x, pair.y), ("yx", pair.y, pair.x)]


def _pair_fields(pair: Pair) -> dict[str, Any]:
    return {"pair_id": pair.pair_id, "object_id": pair.object_id, "x_candidate": pair.x_candidate,
            "y_candidate": pair.y_candidate, "x_oracle": pair.x_oracle, "y_oracle": pair.y_oracle,
            "meta": dict(pair.meta)}


def _image_hashes(pairs: Sequence[Pair]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for pair in pairs:
        for path in (pair.x, pair.y):
            if path in hashes:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"pair {pair.pair_id}: montage {path} not found; run the render stage for this mesh set first.")
            hashes[path] = file_sha256(path)
        if pair.reference is not None and pair.reference not in hashes:
            if not Path(pair.reference).is_file():
                raise FileNotFoundError(f"pair {pair.pair_id}: reference image {pair.reference} not found; it is the "
                                        "object's input image (the one its meshes were generated from).")
            hashes[pair.reference] = file_sha256(pair.reference)
    return hashes


def _check_pairs(pairs: Sequence[Pair], n_images: int = 2) -> None:
    seen: set[str] = set()
    for pair in pairs:
        if pair.pair_id in seen:
            raise ValueError(f"pair id {pair.pair_id!r} appears twice; pair ids must be unique within a run.")
        seen.add(pair.pair_id)
        if n_images == 3 and pair.reference is None:
            raise ValueError(f"pair {pair.pair_id}: the prompt shows a reference image ({REFERENCE_SLOT}) but the pair "
                             "has none; give every Pair its object's input image as reference, or drop "
                             f"{REFERENCE_SLOT} from the prompt for reference-free judging.")
        if n_images == 2 and pair.reference is not None:
            raise ValueError(f"pair {pair.pair_id}: the pair has a reference image ({pair.reference}) but the prompt "
                             f"has no {REFERENCE_SLOT} slot to show it; name {REFERENCE_SLOT} in the prompt before "
                             "<image1> for reference-aware judging, or leave Pair.reference None.")
        for name in ("x_oracle", "y_oracle"):
            v = getattr(pair, name)
            if v is not None and not math.isfinite(float(v)):
                raise ValueError(f"pair {pair.pair_id}: {name} = {v!r} is not finite; flag the mesh and leave it None.")


def run_pairs(backend: Backend, pairs: Sequence[Pair], log_path: str | Path, prompt: str, batch_size: int,
              show_progress: bool = True, answer_cache: AnswerCache | None = None) -> list[dict[str, Any]]:
    """Ask every query of ``pairs`` that the log does not hold yet; return the log rows of these pairs.

    Both orders of a pair go in the same batch where the batch size allows. Each answered query is
    appended as one flushed row, so a kill loses at most the batch in flight. A logged answer is
    reused only under the same key (pair id, order, judge id, prompt hash, both image hashes, and
    the reference's hash for a reference-aware prompt); if its pair metadata changed, the row is
    re-stamped (appended again, same answer, no model call). Rows are returned in pair order, 'xy'
    before 'yx'.

    A prompt naming ``<image0>`` needs a ``reference`` on every pair (and a prompt without it on
    none): the backend is then asked (reference, first, second) triples, and the rows add
    ``reference`` and ``reference_sha256``.

    Answers also go to ``answer_cache`` (default: :class:`judge3d.core.resume.AnswerCache`), outside the
    stage's DVC outputs, batch by batch, so a stage killed under ``dvc repro`` (which deletes the log
    before rerunning) asks the model again only for the batches it had not finished. The cache files
    of this run are removed once every query is answered.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    judge_id = getattr(backend, "judge_id", None)
    if not isinstance(judge_id, str) or not judge_id:
        raise ValueError("backend.judge_id must be a non-empty string (model id + weights hash).")
    n_images = prompt_image_count(prompt)
    _check_pairs(pairs, n_images)
    hashes = _image_hashes(pairs)
    p_hash = prompt_sha256(prompt)

    wanted: list[tuple[Pair, dict[str, Any]]] = []  # (pair, row without the answer)
    for pair in pairs:
        for order, first, second in queries_for(pair):
            base = {"order": order, "first": Path(first).as_posix(), "second": Path(second).as_posix(),
                    "first_sha256": hashes[first], "second_sha256": hashes[second], "judge_id": judge_id,
                    "prompt_sha256": p_hash, **_pair_fields(pair)}
            ref_sha = None
            if pair.reference is not None:
                ref_sha = hashes[pair.reference]
                base.update(reference=Path(pair.reference).as_posix(), reference_sha256=ref_sha)
            base["key"] = query_key(pair.pair_id, order, judge_id, p_hash, hashes[first], hashes[second],
                                    reference_sha=ref_sha)
            wanted.append((pair, json.loads(dumps(base))))  # JSON-normalized: returned rows equal logged rows

    log_path = Path(log_path)
    with JsonlAppender(log_path) as log:  # opening drops a partial last row left by a kill
        logged = latest_by_key(iter_jsonl(log_path))
        answered: dict[str, dict[str, Any]] = {}
        todo: list[dict[str, Any]] = []
        for _, base in wanted:
            old = logged.get(base["key"])
            if old is None:
                todo.append(base)
                continue
            row = {**base, "p_first": old["p_first"], "verdict": verdict_of(old["p_first"])}
            if dumps(row) != dumps(old):  # same images, judge and prompt; the pair's metadata or paths changed
                log.append(row)
            answered[base["key"]] = row

        cache = answer_cache if answer_cache is not None else AnswerCache()
        batches = list(_batches_keeping_pairs(todo, batch_size))
        cached_answers = [cache.get([q["key"] for q in batch]) for batch in batches]
        # Only the batches with no answer yet go to the model, all at once, so a backend that spreads
        # them over replicas (Ray) gets the whole list; answers come back in this order.
        to_ask = [batch for batch, cached in zip(batches, cached_answers) if cached is None]
        answers = answer_stream(backend, [[_query_images(q, n_images) for q in batch] for batch in to_ask], prompt,
                                [f"pair {batch[0]['pair_id']} order {batch[0]['order']} (+{len(batch) - 1} queries)"
                                 for batch in to_ask])
        n_cached = n_asked = 0
        with tqdm(total=len(todo), desc=f"judge {judge_id}", unit="query", disable=not show_progress) as bar:
            for batch, cached in zip(batches, cached_answers):
                keys = [q["key"] for q in batch]
                if cached is not None:
                    probs = np.array([cached[k] for k in keys], dtype=np.float64)
                    n_cached += len(batch)
                else:
                    probs = np.asarray(next(answers), dtype=np.float64).reshape(-1)
                    if probs.shape != (len(batch),):
                        raise ValueError(f"judge {judge_id} returned {probs.size} probabilities for {len(batch)} queries.")
                    for q, p in zip(batch, probs):
                        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                            raise ValueError(f"judge {judge_id} returned p_first={p!r} for pair {q['pair_id']} "
                                             f"order {q['order']}; a probability in [0, 1] is required.")
                    cache.put({k: float(p) for k, p in zip(keys, probs)})
                    n_asked += len(batch)
                for q, p in zip(batch, probs):
                    row = {**q, "p_first": float(p), "verdict": verdict_of(float(p))}
                    log.append(row)
                    answered[q["key"]] = row
                bar.update(len(batch))
        cache.discard([[q["key"] for q in batch] for batch in batches])
    print(f"judge {judge_id[:40]}: {len(wanted)} queries: {len(wanted) - len(todo)} already logged, "
          f"{n_cached} from the resume cache, {n_asked} asked the model")
    return [answered[base["key"]] for _, base in wanted]


def _query_images(query: dict[str, Any], n_images: int) -> tuple[str, ...]:
    return (query["first"], query["second"]) if n_images == 2 else (query["reference"], query["first"], query["second"])


def answer_stream(backend: Backend, batches: list[list[tuple[Any, ...]]], prompt: str,
                  labels: list[str]) -> Iterator[np.ndarray]:
    """The backend's P(first) for each batch, in order, lazily: through ``backend.p_first_stream``
    where the backend has one (replicas answer many batches at once), else one ``p_first`` a batch."""
    stream = getattr(backend, "p_first_stream", None)
    if stream is not None:
        return iter(stream(batches, prompt, labels=labels))
    return (backend.p_first(queries, prompt) for queries in batches)


def _batches_keeping_pairs(queries: list[dict[str, Any]], batch_size: int) -> Iterable[list[dict[str, Any]]]:
    """Chunk queries so a pair's orders share a batch unless the batch size is 1."""
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for q in queries:
        by_pair.setdefault(q["pair_id"], []).append(q)
    batch: list[dict[str, Any]] = []
    for group in by_pair.values():
        if batch and len(batch) + len(group) > batch_size:
            yield batch
            batch = []
        for q in group:
            batch.append(q)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def pair_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per pair (first-appearance order) from its two query rows.

    v1 = verdict of order xy as 'x'|'y'|'tie'; v2 = verdict of order yx mapped back to x/y;
    consistent = v1 == v2 and not a tie; winner = 'x'|'y' if consistent else None;
    soft = (p_xy + (1 - p_yx)) / 2. Rows must come from one judge and one prompt.
    """
    if not rows:
        raise ValueError("pair_verdicts: no query rows.")
    judges = sorted({(r["judge_id"], r["prompt_sha256"]) for r in rows})
    if len(judges) > 1:
        raise ValueError(f"pair_verdicts: rows mix {len(judges)} (judge_id, prompt) combinations {judges}; "
                         "filter the log to one judge and prompt (read_log(judge_id=..., prompt_hash=...)).")
    by_pair: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        orders = by_pair.setdefault(r["pair_id"], {})
        if r["order"] in orders:
            raise ValueError(f"pair {r['pair_id']}: two rows for order {r['order']} (different images?); "
                             "one row per pair and order is expected.")
        orders[r["order"]] = r
    records = []
    for pair_id, orders in by_pair.items():
        missing = [o for o in ORDERS if o not in orders]
        if missing:
            raise ValueError(f"pair {pair_id}: no answer for order(s) {missing}; rerun the judging stage to finish the log.")
        xy, yx = orders["xy"], orders["yx"]
        v1 = {"first": "x", "second": "y", "tie": "tie"}[verdict_of(xy["p_first"])]
        v2 = {"first": "y", "second": "x", "tie": "tie"}[verdict_of(yx["p_first"])]
        consistent = v1 == v2 and v1 != "tie"
        records.append({
            "pair_id": pair_id, "object_id": xy["object_id"], "judge_id": xy["judge_id"],
            "x_candidate": xy.get("x_candidate"), "y_candidate": xy.get("y_candidate"),
            "x_oracle": xy.get("x_oracle"), "y_oracle": xy.get("y_oracle"),
            "p_xy": xy["p_first"], "p_yx": yx["p_first"], "v1": v1, "v2": v2,
            "consistent": consistent, "winner": v1 if consistent else None,
            "soft": (xy["p_first"] + (1.0 - yx["p_first"])) / 2.0,
        })
    return records


def _oracle_outcome(rec: dict[str, Any]) -> str:
    """'agree'|'disagree' for a consistent verdict against the oracle; else why it does not count."""
    if not rec["consistent"]:
        return "flip"
    xo, yo = rec.get("x_oracle"), rec.get("y_oracle")
    if xo is None or yo is None:
        return "missing"
    if xo == yo:
        return "tie"
    truth = "x" if xo > yo else "y"
    return "agree" if rec["winner"] == truth else "disagree"


def _ci_list(lo_hi: tuple[float, float]) -> list[float | None]:
    return [stats.clean(lo_hi[0]), stats.clean(lo_hi[1])]


def aggregate(pair_records: Sequence[dict[str, Any]], query_rows: Sequence[dict[str, Any]],
              n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The aggregates with CIs, bootstrap over objects (object_id);
    definitions in docs/protocol.md#aggregates-and-confidence-intervals.

    Keys: n, n_objects, n_queries, W, L, F, strict (W/n), strict_wilson_ci, strict_boot_ci,
    tie_adjusted ((W+F/2)/n), tie_adjusted_ci, decisive (W/(W+L); None and decisive_undefined=True
    when W+L=0), decisive_ci, flip_rate (F/n), flip_rate_ci, prefer_first_rate (share of all queries
    whose verdict is 'first'; ties count as not first), prefer_first_rate_ci, mean_soft,
    mean_soft_ci, judge_oracle_agreement (share of consistent verdicts whose winner has the higher
    oracle score; pairs with equal or missing oracle scores are left out and counted in
    oracle_ties / oracle_missing), judge_oracle_agreement_ci, n_oracle, n_boot, seed.
    CIs are [lo, hi] lists; undefined values are None.
    """
    if not pair_records:
        raise ValueError("aggregate: no pairs; a judged mesh set must hold at least one pair.")
    pair_ids = {r["pair_id"] for r in pair_records}
    query_pair_ids = {r["pair_id"] for r in query_rows}
    if pair_ids != query_pair_ids or len(query_rows) != 2 * len(pair_records):
        raise ValueError(f"aggregate: query rows ({len(query_rows)} rows, {len(query_pair_ids)} pairs) do not match "
                         f"the {len(pair_records)} pair records; pass the rows the records were built from.")

    # Per-object totals of every count; each statistic is a ratio of two columns of these.
    cols = ["pairs", "W", "L", "F", "WL", "tie_adj", "soft", "queries", "first", "oracle_n", "oracle_agree"]
    c = {name: i for i, name in enumerate(cols)}
    objects: dict[str, np.ndarray] = {}
    oracle_counts = {"tie": 0, "missing": 0}
    # A fixed accumulation order keeps float sums (soft) identical however the log rows are ordered.
    for rec in sorted(pair_records, key=lambda r: str(r["pair_id"])):
        t = objects.setdefault(rec["object_id"], np.zeros(len(cols)))
        w, l = rec["winner"] == "x", rec["winner"] == "y"
        f = not rec["consistent"]
        t[c["pairs"]] += 1
        t[c["W"]] += w
        t[c["L"]] += l
        t[c["F"]] += f
        t[c["WL"]] += w or l
        t[c["tie_adj"]] += w + 0.5 * f
        t[c["soft"]] += rec["soft"]
        outcome = _oracle_outcome(rec)
        if outcome in oracle_counts:
            oracle_counts[outcome] += 1
        if outcome in ("agree", "disagree"):
            t[c["oracle_n"]] += 1
            t[c["oracle_agree"]] += outcome == "agree"
    object_of_pair = {r["pair_id"]: r["object_id"] for r in pair_records}
    for row in query_rows:
        t = objects[object_of_pair[row["pair_id"]]]
        t[c["queries"]] += 1
        t[c["first"]] += verdict_of(row["p_first"]) == "first"

    groups = [objects[k][None, :] for k in sorted(objects)]
    total = np.sum([g[0] for g in groups], axis=0)
    n, W, L, F = (int(total[c[k]]) for k in ("pairs", "W", "L", "F"))

    rates = {"strict": ("W", "pairs"), "tie_adjusted": ("tie_adj", "pairs"), "decisive": ("W", "WL"),
             "flip_rate": ("F", "pairs"), "prefer_first_rate": ("first", "queries"), "mean_soft": ("soft", "pairs"),
             "judge_oracle_agreement": ("oracle_agree", "oracle_n")}
    statistics = {name: stats.ratio_of(c[num], c[den]) for name, (num, den) in rates.items()}
    cis = stats.bootstrap_cis(groups, statistics, n_boot=n_boot, seed=seed)

    out: dict[str, Any] = {"n": n, "n_objects": len(groups), "n_queries": int(total[c["queries"]]),
                           "W": W, "L": L, "F": F, "n_boot": n_boot, "seed": seed}
    for name, statistic in statistics.items():
        out[name] = stats.clean(stats.point_statistic(groups, statistic))
        out[name + ("_boot_ci" if name == "strict" else "_ci")] = _ci_list(cis[name])
    out["strict_wilson_ci"] = _ci_list(stats.wilson_interval(W, n))
    out["decisive_undefined"] = W + L == 0
    out["n_oracle"] = int(total[c["oracle_n"]])
    out["oracle_ties"] = oracle_counts["tie"]
    out["oracle_missing"] = oracle_counts["missing"]
    return out


def summarize(rows: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """aggregate(pair_verdicts(rows), rows): the metrics of one judge's log rows."""
    return aggregate(pair_verdicts(rows), rows, n_boot=n_boot, seed=seed)


def pair_category(rec: dict[str, Any]) -> str:
    """'x' or 'y' for a consistent winner, 'flip' otherwise (see KAPPA_CATEGORIES)."""
    return rec["winner"] if rec["consistent"] else "flip"


def judge_agreement(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Cohen's kappa between two judges' pair verdicts (categories x / y / flip) on their shared
    pair ids, with a bootstrap CI over objects. Pairs only one judge saw are counted, not used."""
    a = {r["pair_id"]: r for r in records_a}
    b = {r["pair_id"]: r for r in records_b}
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("judge_agreement: the two judges share no pair ids; judge the same pairs with both.")
    for pid in shared:
        if a[pid]["object_id"] != b[pid]["object_id"]:
            raise ValueError(f"judge_agreement: pair {pid} has object {a[pid]['object_id']} for one judge and "
                             f"{b[pid]['object_id']} for the other; they are not the same pair.")
    cat_a = [pair_category(a[p]) for p in shared]
    cat_b = [pair_category(b[p]) for p in shared]
    kappa, lo, hi = stats.cohen_kappa_ci(cat_a, cat_b, group_ids=[a[p]["object_id"] for p in shared],
                                         categories=KAPPA_CATEGORIES, n_boot=n_boot, seed=seed)
    return {
        "kappa": stats.clean(kappa), "kappa_ci": _ci_list((lo, hi)), "n": len(shared),
        "observed_agreement": stats.clean(float(np.mean([x == y for x, y in zip(cat_a, cat_b)]))),
        "categories": list(KAPPA_CATEGORIES), "n_only_a": len(set(a) - set(b)), "n_only_b": len(set(b) - set(a)),
        "judge_a": records_a[0]["judge_id"] if records_a else None,
        "judge_b": records_b[0]["judge_id"] if records_b else None,
        "n_boot": n_boot, "seed": seed,
    }
