"""Metrics of `judge-train-labels` and `calibrate`, computed from raw verdict-log rows alone.

Pure functions (no model, no torch): the stages call them on the rows they just logged, and
``verify`` calls them on the cached logs. ``params`` is the whole params.yaml mapping; only the
`labels` / `calibrate` blocks are read. Definitions follow docs/protocol.md#aggregates-and-confidence-intervals via judge3d.judges.protocol.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from judge3d.core import stats
from judge3d.core.config import ParamsError, require
from judge3d.core.io import read_jsonl
from judge3d.judges.pairing import FLAGGED_LOG
from judge3d.judges.protocol import aggregate, judge_agreement, pair_verdicts
from judge3d.judges.verdict_log import read_log
from judge3d.report.confidence import confidence_metrics, coverage_csv_rows, reliability_csv_rows
from judge3d.world.degrade import SEVERITIES, require_severities

# The seed study's numbers, printed beside ours for comparison (never used in a decision).
SEED_REPORTED = {"strict_win_high_over_low": 0.89, "iid_flip_rate": 0.94}


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
def _bootstrap(params: Mapping[str, Any], block: str) -> tuple[int, int]:
    n = require(params, f"{block}.bootstrap.n", int, check=lambda v: v >= 100,
                hint="Use >= 100 replicates (2000 is the default).")
    seed = require(params, f"{block}.bootstrap.seed", int)
    return n, seed


def gap_bin_edges(params: Mapping[str, Any]) -> list[float]:
    edges = require(params, "calibrate.gap_bins", list, hint="A list of increasing |oracle gap| edges, e.g. [0, 0.05, 0.1, 1].")
    try:
        edges = [float(e) for e in edges]
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: 'calibrate.gap_bins' must hold numbers, got {edges!r}.") from exc
    if len(edges) < 2 or edges[0] < 0 or any(not math.isfinite(e) for e in edges) \
            or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ParamsError(f"params.yaml: 'calibrate.gap_bins' = {edges!r} must be >= 2 finite, strictly increasing, "
                          "non-negative edges.")
    return edges


def thresholds(params: Mapping[str, Any]) -> dict[str, Any]:
    min_strict = require(params, "calibrate.thresholds.clear_gap_min_strict", float, check=lambda v: 0 < v <= 1)
    rng = require(params, "calibrate.thresholds.base_vs_base_decisive", list,
                  check=lambda v: len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 <= v[0] < v[1] <= 1,
                  hint="A [low, high] range inside [0, 1], e.g. [0.35, 0.65].")
    return {"clear_gap_min_strict": float(min_strict), "base_vs_base_decisive_range": [float(rng[0]), float(rng[1])]}


# --------------------------------------------------------------------------------------------
# reading logs
# --------------------------------------------------------------------------------------------
def judged_rows(path: str | Path, *, judge_id: str | None = None, prompt_hash: str | None = None,
                pair_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Rows of one judge and prompt from a verdict log (latest row per key), optionally only ``pair_ids``.

    A log that holds several (judge, prompt) combinations (a stage rerun by hand after the judge
    changed) needs ``judge_id``/``prompt_hash`` to say which; guessing would mix judges.
    """
    rows = read_log(path, judge_id=judge_id, prompt_hash=prompt_hash)
    if pair_ids is not None:
        rows = [r for r in rows if r["pair_id"] in pair_ids]
    combos = sorted({(r["judge_id"], r["prompt_sha256"][:12]) for r in rows})
    if len(combos) > 1:
        raise ValueError(f"{path}: rows of {len(combos)} (judge, prompt) combinations {combos}; pass judge_id and "
                         "prompt_hash (recorded in the metrics JSON) or rerun the stage from a clean log.")
    if not rows:
        raise ValueError(f"{path}: no rows for judge {judge_id!r} / prompt {prompt_hash!r}; rerun the stage.")
    return rows


def _one_judge(rows: Sequence[dict[str, Any]], what: str) -> tuple[str, str]:
    combos = sorted({(r["judge_id"], r["prompt_sha256"]) for r in rows})
    if len(combos) != 1:
        raise ValueError(f"{what}: rows must come from one judge and prompt, got {combos}.")
    return combos[0]


# --------------------------------------------------------------------------------------------
# judge-train-labels
# --------------------------------------------------------------------------------------------
def labels_metrics(label_rows: Sequence[dict[str, Any]], iid_rows: Sequence[dict[str, Any]],
                   params: Mapping[str, Any], flagged: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """metrics/labels.json from the training judge's (high, low) rows and i.i.d. rows (x = high).

    ``flagged``: the pairs set aside unjudged because a montage is blank or clipped (flagged.jsonl)."""
    n_boot, seed = _bootstrap(params, "labels")
    judge_id, prompt_hash = _one_judge(label_rows, "labels log")
    if _one_judge(iid_rows, "i.i.d. log") != (judge_id, prompt_hash):
        raise ValueError("labels: the (high, low) and i.i.d. logs come from different judges or prompts.")
    records = pair_verdicts(label_rows)
    high_low = aggregate(records, label_rows, n_boot=n_boot, seed=seed)
    iid = aggregate(pair_verdicts(iid_rows), iid_rows, n_boot=n_boot, seed=seed)
    return {
        "judge_id": judge_id, "prompt_sha256": prompt_hash,
        "n": high_low["n"], "n_objects": high_low["n_objects"],
        "strict_win_high_over_low": high_low["strict"],
        "strict_wilson_ci": high_low["strict_wilson_ci"], "strict_boot_ci": high_low["strict_boot_ci"],
        "flip_rate": high_low["flip_rate"], "flip_rate_ci": high_low["flip_rate_ci"],
        "prefer_first_rate": high_low["prefer_first_rate"], "prefer_first_rate_ci": high_low["prefer_first_rate_ci"],
        "judge_oracle_agreement": high_low["judge_oracle_agreement"],
        "judge_oracle_agreement_ci": high_low["judge_oracle_agreement_ci"], "n_oracle": high_low["n_oracle"],
        "pairs_kept": high_low["W"] + high_low["L"],
        "pairs_kept_high_wins": high_low["W"], "pairs_kept_low_wins": high_low["L"],
        "iid_flip_rate": iid["flip_rate"], "iid_flip_rate_ci": iid["flip_rate_ci"], "iid_n": iid["n"],
        "high_vs_low": high_low, "iid": iid, "seed_reported": dict(SEED_REPORTED),
        "n_flagged": sum(1 for r in flagged if r.get("control") == "high_vs_low"),
        "iid_n_flagged": sum(1 for r in flagged if r.get("control") == "iid"),
    }


def labels_metrics_from_logs(labels_log: str | Path, iid_log: str | Path, params: Mapping[str, Any], *,
                             judge_id: str | None = None, prompt_hash: str | None = None) -> dict[str, Any]:
    """The labels metrics from the cached logs (what ``verify`` runs); flagged.jsonl beside them."""
    flagged_path = Path(labels_log).with_name(FLAGGED_LOG)
    flagged = read_jsonl(flagged_path) if flagged_path.is_file() else []
    unjudged = {r["pair_id"] for r in flagged}
    return labels_metrics([r for r in judged_rows(labels_log, judge_id=judge_id, prompt_hash=prompt_hash)
                           if r["pair_id"] not in unjudged],
                          [r for r in judged_rows(iid_log, judge_id=judge_id, prompt_hash=prompt_hash)
                           if r["pair_id"] not in unjudged], params, flagged=flagged)


# --------------------------------------------------------------------------------------------
# flip rate vs oracle gap
# --------------------------------------------------------------------------------------------
def _gap(rec: Mapping[str, Any]) -> float | None:
    xo, yo = rec.get("x_oracle"), rec.get("y_oracle")
    if xo is None or yo is None:
        return None
    return abs(float(xo) - float(yo))


def bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


def flip_vs_gap(pair_records: Sequence[dict[str, Any]], edges: Sequence[float]) -> dict[str, Any]:
    """Flip rate per |oracle gap| bin, [lo, hi) with the last bin closed.

    Returns {"bins": [{bin, gap_lo, gap_hi, gap_mid, n, flips, flip_rate, flip_rate_wilson_ci,
    mean_gap}], "n": pairs binned, "n_missing_oracle", "n_out_of_range"}. An empty bin has n = 0
    and flip_rate None. Pairs without both oracle scores or beyond the last edge are counted, not binned.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"flip_vs_gap: edges {edges} must be >= 2 strictly increasing values.")
    k = len(edges) - 1
    n = np.zeros(k, dtype=int)
    flips = np.zeros(k, dtype=int)
    gap_sum = np.zeros(k)
    missing = out_of_range = 0
    for rec in sorted(pair_records, key=lambda r: str(r["pair_id"])):  # fixed order: byte-stable float sums
        gap = _gap(rec)
        if gap is None:
            missing += 1
            continue
        if gap < edges[0] or gap > edges[-1]:
            out_of_range += 1
            continue
        i = min(int(np.searchsorted(edges, gap, side="right")) - 1, k - 1)
        n[i] += 1
        flips[i] += not rec["consistent"]
        gap_sum[i] += gap
    bins = []
    for i in range(k):
        lo, hi = edges[i], edges[i + 1]
        bins.append({
            "bin": bin_label(lo, hi), "gap_lo": lo, "gap_hi": hi, "gap_mid": stats.clean((lo + hi) / 2),
            "n": int(n[i]), "flips": int(flips[i]),
            "flip_rate": stats.clean(flips[i] / n[i]) if n[i] else None,
            "flip_rate_wilson_ci": [stats.clean(v) for v in stats.wilson_interval(int(flips[i]), int(n[i]))],
            "mean_gap": stats.clean(gap_sum[i] / n[i]) if n[i] else None,
        })
    return {"bins": bins, "n": int(n.sum()), "n_missing_oracle": missing, "n_out_of_range": out_of_range}


def _corr_from_totals(t: np.ndarray) -> np.ndarray:
    """Pearson r of (flip, gap) from column totals [n, Σf, Σg, Σg², Σfg] (Σf² = Σf for 0/1 flips)."""
    n, sf, sg, sgg, sfg = (t[:, i] for i in range(5))
    cov = n * sfg - sf * sg
    var_f = n * sf - sf * sf
    var_g = n * sgg - sg * sg
    den = np.sqrt(np.clip(var_f, 0, None) * np.clip(var_g, 0, None))
    return np.where(den > 0, cov / np.where(den > 0, den, 1.0), np.nan)


def flip_gap_correlation(pair_records: Sequence[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Point-biserial correlation of flip (0/1) with |oracle gap| over pairs with both scores, with a
    bootstrap CI over objects. The seed's claim (flip rate reads out the real gap) predicts r < 0."""
    by_object: dict[str, list[list[float]]] = {}
    for rec in sorted(pair_records, key=lambda r: str(r["pair_id"])):
        gap = _gap(rec)
        if gap is None:
            continue
        f = float(not rec["consistent"])
        by_object.setdefault(str(rec["object_id"]), []).append([1.0, f, gap, gap * gap, f * gap])
    if not by_object:
        return {"r": None, "r_ci": [None, None], "n": 0}
    groups = [np.asarray(by_object[k]) for k in sorted(by_object)]
    lo, hi = stats.bootstrap_ci(groups, _corr_from_totals, n_boot=n_boot, seed=seed)
    return {"r": stats.clean(stats.point_statistic(groups, _corr_from_totals)),
            "r_ci": [stats.clean(lo), stats.clean(hi)], "n": int(sum(len(g) for g in groups))}


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------
def control_names(severities: Sequence[str] = SEVERITIES) -> list[str]:
    """Eval-judge control names, which are also the calibration log stems (eval_<name>.jsonl)."""
    return ["clear_gap", *[f"headroom_{s}" for s in severities], "base_vs_base"]


def calibration_metrics(eval_rows: Mapping[str, Sequence[dict[str, Any]]],
                        train_rows: Mapping[str, Sequence[dict[str, Any]]],
                        params: Mapping[str, Any], flagged: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """metrics/calibration.json from each judge's rows per control.

    ``eval_rows``/``train_rows`` keys: 'clear_gap', 'base_vs_base', and 'headroom_<severity>' for each
    severity judged. The eval judge's rows decide the controls. Pass/fail uses the point estimates
    against params thresholds: clear-gap strict >= min; base-vs-base decisive inside the range (an
    undefined decisive, every pair a flip, fails: no preference can be shown). Both judges' pooled
    pairs give Cohen's kappa between them and each judge's confidence curves (report.confidence).
    ``flagged``: the pairs set aside unjudged for a flagged montage (calibrate's flagged.jsonl records);
    each control reports its count as ``n_flagged``, and the total is ``n_flagged``.
    """
    n_boot, seed = _bootstrap(params, "calibrate")
    thr = thresholds(params)
    edges = gap_bin_edges(params)
    n_flagged: dict[str, int] = {}
    for rec in flagged:
        n_flagged[str(rec["control"])] = n_flagged.get(str(rec["control"]), 0) + 1
    for name in ("clear_gap", "base_vs_base"):
        if not eval_rows.get(name):
            why = (f"all {n_flagged[name]} of its pairs have a flagged montage (blank or clipped; see "
                   "data/calibration/flagged.jsonl and the render stage's flags)" if n_flagged.get(name) else "rerun calibrate")
            raise ValueError(f"calibration: no eval-judge rows for the {name} control; {why}.")
    eval_rows = {name: rows for name, rows in eval_rows.items() if rows or not n_flagged.get(name)}
    train_rows = {name: rows for name, rows in train_rows.items() if rows}
    unknown = [k for k in [*eval_rows, *train_rows] if k not in ("clear_gap", "base_vs_base") and not k.startswith("headroom_")]
    if unknown:
        raise ValueError(f"calibration: unknown control(s) {unknown}; use clear_gap, base_vs_base, headroom_<severity>.")
    if set(train_rows) != set(eval_rows):
        raise ValueError(f"calibration: the training judge answered controls {sorted(train_rows)}, the eval judge "
                         f"{sorted(eval_rows)}; both judge every control (rerun calibrate).")
    all_rows = [r for name in sorted(eval_rows) for r in eval_rows[name]]
    eval_judge, prompt_hash = _one_judge(all_rows, "eval-judge calibration logs")
    all_train_rows = [r for name in sorted(train_rows) for r in train_rows[name]]
    train_judge, train_prompt = _one_judge(all_train_rows, "training-judge calibration logs")
    # A reference-aware eval judge (the ablation) is asked with its own prompt by design; otherwise
    # the two judges must have read the same words, or kappa would compare apples and pears.
    reference_aware = any(r.get("reference") for r in all_rows)
    if train_prompt != prompt_hash and not reference_aware:
        raise ValueError("calibration: the two judges were asked with different prompts; kappa would compare apples and pears.")

    records = {name: pair_verdicts(rows) for name, rows in eval_rows.items()}
    agg = {name: {**aggregate(records[name], eval_rows[name], n_boot=n_boot, seed=seed),
                  "n_flagged": n_flagged.get(name, 0)} for name in eval_rows}

    clear = dict(agg["clear_gap"])
    clear["pass"] = clear["strict"] is not None and clear["strict"] >= thr["clear_gap_min_strict"]
    clear["criterion"] = f"strict >= {thr['clear_gap_min_strict']:g}"
    # what degraded the y side (clear-gap-meshes records it on every pair); None for a log without it
    kinds = sorted({json.dumps((r.get("meta") or {}).get("corruption"), sort_keys=True) for r in eval_rows["clear_gap"]})
    clear["corruption"] = json.loads(kinds[0]) if len(kinds) == 1 else None
    bvb = dict(agg["base_vs_base"])
    lo, hi = thr["base_vs_base_decisive_range"]
    bvb["pass"] = bvb["decisive"] is not None and lo <= bvb["decisive"] <= hi
    bvb["criterion"] = f"{lo:g} <= decisive <= {hi:g}"
    if bvb["decisive"] is None:
        bvb["criterion"] += " (undefined: every pair flipped)"

    headroom = {name[len("headroom_"):]: agg[name] for name in sorted(agg) if name.startswith("headroom_")}
    all_records = [rec for name in sorted(records) for rec in records[name]]
    pooled = aggregate(all_records, all_rows, n_boot=n_boot, seed=seed)
    train_records = {name: pair_verdicts(rows) for name, rows in train_rows.items()}
    train_clear = aggregate(train_records["clear_gap"], train_rows["clear_gap"], n_boot=n_boot, seed=seed)
    all_train_records = [rec for name in sorted(train_records) for rec in train_records[name]]
    failed = [name for name, ok in (("clear_gap", clear["pass"]), ("base_vs_base", bvb["pass"])) if not ok]
    gap_table = flip_vs_gap(all_records, edges)
    gap_table["correlation"] = flip_gap_correlation(all_records, n_boot, seed)
    return {
        "eval_judge_id": eval_judge, "train_judge_id": train_judge, "prompt_sha256": prompt_hash,
        "train_prompt_sha256": train_prompt, "eval_reference_aware": reference_aware,
        "thresholds": thr, "clear_gap": clear, "base_vs_base": bvb, "headroom": headroom,
        "judge_oracle_agreement": pooled["judge_oracle_agreement"],
        "judge_oracle_agreement_ci": pooled["judge_oracle_agreement_ci"], "n_oracle": pooled["n_oracle"],
        "eval_judge_all_pairs": pooled,
        "train_judge_clear_gap": train_clear,
        "train_judge_all_pairs": aggregate(all_train_records, all_train_rows, n_boot=n_boot, seed=seed),
        # over every control's pairs pooled: the two judges' verdicts on the same montage pairs
        "agreement": judge_agreement(all_train_records, all_records, n_boot=n_boot, seed=seed),
        "confidence": {role: confidence_metrics(recs, n_boot=n_boot, seed=seed)
                       for role, recs in (("eval", all_records), ("train", all_train_records))},
        "flip_vs_gap": gap_table,
        "passed": not failed, "failed_controls": failed,
        # pairs never shown to a judge because a montage is blank or clipped, per control
        "n_flagged": sum(n_flagged.values()), "flagged_by_control": dict(sorted(n_flagged.items())),
    }


def calibration_metrics_from_dir(log_dir: str | Path, params: Mapping[str, Any], *, eval_judge_id: str | None = None,
                                 train_judge_id: str | None = None, prompt_hash: str | None = None,
                                 train_prompt_hash: str | None = None) -> dict[str, Any]:
    """calibration_metrics on data/calibration/{eval,train}_<control>.jsonl (verify's entry point)."""

    log_dir = Path(log_dir)
    severities = require_severities(params, "calibrate.severities")
    flagged_path = log_dir / FLAGGED_LOG
    flagged = read_jsonl(flagged_path) if flagged_path.is_file() else []  # absent: a log from before flags were read
    set_aside = {str(rec["pair_id"]) for rec in flagged}
    all_flagged = {str(rec["control"]) for rec in flagged}

    def rows_of(path: Path, name: str, **who) -> list[dict[str, Any]]:
        if name in all_flagged and (not path.is_file() or path.stat().st_size == 0):
            return []  # every pair of this control was set aside: nothing was asked
        # a flagged pair's rows from an earlier run (before its montage was flagged) are not counted
        return [r for r in judged_rows(path, **who) if r["pair_id"] not in set_aside]

    eval_rows = {name: rows_of(log_dir / f"eval_{name}.jsonl", name, judge_id=eval_judge_id, prompt_hash=prompt_hash)
                 for name in control_names(severities)}
    train_rows = {name: rows_of(log_dir / f"train_{name}.jsonl", name, judge_id=train_judge_id,
                                prompt_hash=train_prompt_hash or prompt_hash)
                  for name in control_names(severities)}
    return calibration_metrics(eval_rows, train_rows, params, flagged=flagged)


def flip_vs_gap_csv_rows(calibration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of metrics/plots/flip_vs_gap.csv: the non-empty bins (an empty bin has no rate to plot)."""
    cols = ("bin", "gap_lo", "gap_hi", "gap_mid", "mean_gap", "n", "flips", "flip_rate")
    out = []
    for b in calibration["flip_vs_gap"]["bins"]:
        if b["n"] == 0:
            continue
        row = {c: b[c] for c in cols}
        row["flip_rate_lo"], row["flip_rate_hi"] = b["flip_rate_wilson_ci"]
        out.append(row)
    return out


def confidence_csv_rows(calibration: Mapping[str, Any], role: str, curve: str) -> list[dict[str, Any]]:
    """Rows of metrics/plots/{reliability,coverage}_<role>.csv from the calibration metrics."""
    conf = calibration["confidence"][role]
    return reliability_csv_rows(conf) if curve == "reliability" else coverage_csv_rows(conf)
