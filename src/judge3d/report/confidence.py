"""Confidence, measured: how far a judge's soft preference and its two filters can be trusted,
checked against the oracle (docs/protocol.md#confidence-reliability-and-coverage).

Input: pair records of one judge from :func:`judge3d.judges.protocol.pair_verdicts` (fields
``object_id``, ``pair_id``, ``soft``, ``consistent``, ``winner``, ``x_oracle``, ``y_oracle``). The
oracle truth of a pair is "x is better" iff ``x_oracle > y_oracle``; pairs with equal or missing
oracle scores have no truth and are left out of everything here (and counted).

- :func:`reliability_curve`: the debiased soft preference s binned against the observed share of
  pairs where x is oracle-better, the expected calibration error (ECE) and the Brier score.
- :func:`coverage_curve`: judge–oracle agreement against coverage for no filter, the
  swap-consistency filter, a margin filter on |s − 0.5| and both together.

Pure numpy over the records (the bootstrap and intervals of :mod:`judge3d.core.stats`), so ``verify``
can recompute every number from the logs. Only :func:`confidence_table` touches the report's tables.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from judge3d.core import stats

DEFAULT_N_BINS = 10
DEFAULT_MARGINS = tuple(round(0.05 * i, 2) for i in range(10))   # 0, 0.05, ..., 0.45
DEFAULT_TARGET = 0.9          # the agreement the table asks of the margin filter
FILTERS = ("none", "swap", "margin", "swap+margin")
# |s − 0.5| ≥ m is tested with this slack: 0.6 − 0.5 is 0.0999… in floats and must pass m = 0.1.
MARGIN_SLACK = 1e-9

RELIABILITY_CSV = ("bin", "soft_lo", "soft_hi", "mean_soft", "observed", "observed_lo", "observed_hi", "n")
COVERAGE_CSV = ("filter", "margin", "coverage", "agreement", "agreement_lo", "agreement_hi", "n")


# --------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------
def _oracle_split(records: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[Mapping[str, Any], bool]], int, int]:
    """(pairs with a truth as (record, x_is_better), oracle ties, oracle missing), in pair-id order so
    float sums do not depend on the order of the log rows."""
    if not records:
        raise ValueError("confidence: no pair records; pass pair_verdicts(rows) of a judged log.")
    seen: set[str] = set()
    kept, ties, missing = [], 0, 0
    for rec in sorted(records, key=lambda r: str(r["pair_id"])):
        pid = str(rec["pair_id"])
        if pid in seen:
            raise ValueError(f"confidence: pair id {pid!r} appears twice; pool logs whose pair ids are distinct.")
        seen.add(pid)
        s = rec["soft"]
        if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s <= 1.0):
            raise ValueError(f"confidence: pair {pid} has soft = {s!r}; a probability in [0, 1] is required "
                             "(build the records with judge3d.judges.protocol.pair_verdicts).")
        xo, yo = rec.get("x_oracle"), rec.get("y_oracle")
        if xo is None or yo is None:
            missing += 1
        elif xo == yo:
            ties += 1
        else:
            kept.append((rec, bool(xo > yo)))
    return kept, ties, missing


def _ci(lo_hi: tuple[float, float]) -> list[float | None]:
    return [stats.clean(lo_hi[0]), stats.clean(lo_hi[1])]


def _bin_of(soft: float, n_bins: int) -> int:
    """Equal-width bins [k/n, (k+1)/n); the last bin also holds s = 1."""
    return min(int(math.floor(soft * n_bins)), n_bins - 1)


# --------------------------------------------------------------------------------------------
# reliability
# --------------------------------------------------------------------------------------------
def _ece_statistic(n_bins: int):
    """ECE from column totals [Y_0..Y_{B-1}, S_0..S_{B-1}, brier_sum, count]:
    sum_b (n_b / N) |Y_b / n_b − S_b / n_b| = sum_b |Y_b − S_b| / N."""
    def statistic(totals: np.ndarray) -> np.ndarray:
        gap = np.abs(totals[:, :n_bins] - totals[:, n_bins:2 * n_bins]).sum(axis=1)
        count = totals[:, -1]
        return np.where(count > 0, gap / np.where(count > 0, count, 1.0), np.nan)
    return statistic


def reliability_curve(records: Sequence[Mapping[str, Any]], n_bins: int = DEFAULT_N_BINS, n_boot: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """The soft preference s against P(x is oracle-better), over pairs with an oracle truth.

    Per bin (``n_bins`` equal-width bins over [0, 1]; empty bins are kept with n = 0 and nulls):
    n, mean s, the observed share where x is oracle-better and its Wilson 95 % interval. ECE =
    sum over bins of (n_b / N)·|observed_b − mean s_b|; Brier = mean (s − [x better])². Both get an
    object-bootstrap 95 % interval (objects resampled with the per-object totals, like
    :func:`judge3d.judges.protocol.aggregate`).

    s is debiased by the swap, so s(y, x) = 1 − s(x, y): relabelling a pair mirrors its point about
    (0.5, 0.5). The Brier score does not depend on which candidate is x; the curve and the ECE do (the
    pairing's convention: x is the candidate expected to be better), and read as P(x better | s).
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"reliability_curve: n_bins must be an integer >= 1, got {n_bins!r}.")
    kept, _, _ = _oracle_split(records)
    out: dict[str, Any] = {"n": len(kept), "n_bins": n_bins, "n_boot": n_boot, "seed": seed}
    per_bin = np.zeros((n_bins, 3))                      # n, sum s, number x-better
    width = 2 * n_bins + 2
    objects: dict[str, np.ndarray] = {}
    for rec, x_better in kept:
        s, y = float(rec["soft"]), float(x_better)
        b = _bin_of(s, n_bins)
        per_bin[b] += (1.0, s, y)
        t = objects.setdefault(str(rec["object_id"]), np.zeros(width))
        t[b] += y
        t[n_bins + b] += s
        t[-2] += (s - y) ** 2
        t[-1] += 1.0
    bins = []
    for b in range(n_bins):
        n, s_sum, k = per_bin[b]
        n, k = int(n), int(k)
        bins.append({"bin": b, "soft_lo": stats.clean(b / n_bins), "soft_hi": stats.clean((b + 1) / n_bins), "n": n,
                     "mean_soft": stats.clean(s_sum / n) if n else None,
                     "observed": stats.clean(k / n) if n else None,
                     "observed_ci": _ci(stats.wilson_interval(k, n))})
    out["bins"] = bins
    if not kept:
        out.update({"ece": None, "ece_ci": [None, None], "brier": None, "brier_ci": [None, None]})
        return out
    groups = [objects[k][None, :] for k in sorted(objects)]
    statistics = {"ece": _ece_statistic(n_bins), "brier": stats.ratio_of(width - 2, width - 1)}
    cis = stats.bootstrap_cis(groups, statistics, n_boot=n_boot, seed=seed)
    for name, statistic in statistics.items():
        out[name] = stats.clean(stats.point_statistic(groups, statistic))
        out[name + "_ci"] = _ci(cis[name])
    out["n_objects"] = len(groups)
    return out


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------
def _check_margins(margins: Sequence[float]) -> list[float]:
    try:
        ms = [float(m) for m in margins]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"coverage_curve: margins must be numbers, got {margins!r}.") from exc
    if not ms or any(not (math.isfinite(m) and 0.0 <= m < 0.5) for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"coverage_curve: margins = {margins!r} must be a non-empty, strictly increasing list in "
                         "[0, 0.5), e.g. [0, 0.05, ..., 0.45].")
    return ms


def _point(name: str, margin: float | None, kept: Sequence[bool], n_total: int) -> dict[str, Any]:
    """One filter setting: ``kept`` holds, per kept pair, whether its verdict matches the oracle."""
    n, k = len(kept), int(sum(kept))
    return {"filter": name, "margin": margin, "n": n, "n_agree": k,
            "coverage": stats.clean(n / n_total) if n_total else None,
            "agreement": stats.clean(k / n) if n else None,
            "agreement_ci": _ci(stats.wilson_interval(k, n))}


def coverage_curve(records: Sequence[Mapping[str, Any]], margins: Sequence[float] = DEFAULT_MARGINS) -> dict[str, Any]:
    """Judge–oracle agreement against coverage, over the N pairs with an oracle truth.

    Points (each with n kept, coverage = n / N, agreement = share of kept verdicts that pick the
    oracle-better candidate, and its Wilson 95 % interval):
    - ``none``: the side of s decides (s > 0.5 → x, s < 0.5 → y); s = 0.5 abstains;
    - ``swap``: swap-consistent pairs only, their winner decides;
    - ``margin`` at each m: pairs with |s − 0.5| ≥ m (up to :data:`MARGIN_SLACK`; and > 0, so m = 0
      equals ``none``), the side of s;
    - ``swap+margin`` at each m: both. A consistent winner always lies on the side of s, so the two
      deciders agree there.
    """
    ms = _check_margins(margins)
    kept, _, _ = _oracle_split(records)
    n_total = len(kept)
    soft = np.array([float(r["soft"]) for r, _ in kept])
    truth = np.array([t for _, t in kept], dtype=bool)
    consistent = np.array([bool(r["consistent"]) for r, _ in kept], dtype=bool)
    winner_x = np.array([r["winner"] == "x" for r, _ in kept], dtype=bool)
    distance = np.abs(soft - 0.5)
    side_right = (soft > 0.5) == truth               # read only where s != 0.5
    decided = distance > 0
    points = [_point("none", None, list(side_right[decided]), n_total),
              _point("swap", None, list((winner_x == truth)[consistent]), n_total)]
    for m in ms:
        keep = decided & (distance >= m - MARGIN_SLACK)
        points.append(_point("margin", stats.clean(m), list(side_right[keep]), n_total))
    for m in ms:
        keep = consistent & decided & (distance >= m - MARGIN_SLACK)
        points.append(_point("swap+margin", stats.clean(m), list((winner_x == truth)[keep]), n_total))
    return {"n": n_total, "margins": [stats.clean(m) for m in ms], "points": points}


# --------------------------------------------------------------------------------------------
# both, and their CSV / table forms
# --------------------------------------------------------------------------------------------
def confidence_metrics(records: Sequence[Mapping[str, Any]], *, n_bins: int = DEFAULT_N_BINS,
                       margins: Sequence[float] = DEFAULT_MARGINS, n_boot: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
    """The reliability curve and the coverage curve of one judge's pair records, JSON-ready.

    ``n_pairs`` counts every record; ``n_oracle`` those with an oracle truth; ``oracle_ties`` /
    ``oracle_missing`` those left out. With no oracle truth at all (a user's images) every value
    is null, not an error.
    """
    kept, ties, missing = _oracle_split(records)
    return {"n_pairs": len(records), "n_oracle": len(kept), "oracle_ties": ties, "oracle_missing": missing,
            "reliability": reliability_curve(records, n_bins=n_bins, n_boot=n_boot, seed=seed),
            "coverage": coverage_curve(records, margins)}


def reliability_csv_rows(conf: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reliability curve as rows of :data:`RELIABILITY_CSV` (for dvc plots); empty bins skipped."""
    rows = []
    for b in conf["reliability"]["bins"]:
        if b["n"] == 0:
            continue
        rows.append({"bin": b["bin"], "soft_lo": b["soft_lo"], "soft_hi": b["soft_hi"], "mean_soft": b["mean_soft"],
                     "observed": b["observed"], "observed_lo": b["observed_ci"][0], "observed_hi": b["observed_ci"][1],
                     "n": b["n"]})
    return rows


def coverage_csv_rows(conf: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The coverage curve as rows of :data:`COVERAGE_CSV`; ``margin`` is None for ``none`` and ``swap``."""
    return [{"filter": p["filter"], "margin": p["margin"], "coverage": p["coverage"], "agreement": p["agreement"],
             "agreement_lo": p["agreement_ci"][0], "agreement_hi": p["agreement_ci"][1], "n": p["n"]}
            for p in conf["coverage"]["points"]]


def points_of(conf: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in conf["coverage"]["points"] if p["filter"] == name]


def margin_for_agreement(conf: Mapping[str, Any], target: float = DEFAULT_TARGET,
                         filter_name: str = "margin") -> dict[str, Any] | None:
    """The first point (smallest margin) of ``filter_name`` whose agreement reaches ``target``; None if none does."""
    if filter_name not in ("margin", "swap+margin"):
        raise ValueError(f"margin_for_agreement: filter_name must be 'margin' or 'swap+margin', got {filter_name!r}.")
    for p in points_of(conf, filter_name):
        if p["agreement"] is not None and p["agreement"] >= target:
            return p
    return None
