"""Confidence intervals and agreement statistics shared by the judge protocol, the report and verify.

Conventions:
- Every interval is a 95 % interval by default (``alpha=0.05``; Wilson takes ``z=1.96``).
- Undefined values are ``nan`` here (an empty sample, a ratio with a zero denominator); callers that
  write metrics turn ``nan`` into JSON ``null`` (see :func:`clean`), never into a number.
- Outputs are rounded to :data:`DECIMALS` places so metrics JSON is byte-stable across runs.
- The bootstrap resamples *groups* (objects), never rows: pairs of one object share an input image
  and are not independent.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import numpy as np

DECIMALS = 6

# A bootstrap statistic maps resampled column totals, shape (n_boot, n_features), to (n_boot,).
TotalsStatistic = Callable[[np.ndarray], np.ndarray]


def rnd(value: float, decimals: int = DECIMALS) -> float:
    """Round for metrics; ``nan`` stays ``nan`` (use :func:`clean` to get ``None``)."""
    value = float(value)
    return value if math.isnan(value) else round(value, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def clean(value: float | None, decimals: int = DECIMALS) -> float | None:
    """Round for a metrics file: ``nan``/``None`` -> ``None`` (JSON null), anything else rounded."""
    if value is None:
        return None
    value = float(value)
    return None if not math.isfinite(value) else rnd(value, decimals)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    ``n == 0`` returns ``(nan, nan)``: with no trials there is no proportion, and ``(0, 1)`` would
    read as a real (if wide) interval in a table.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}.")
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (rnd(max(0.0, centre - half)), rnd(min(1.0, centre + half)))


def _group_totals(groups: Sequence[np.ndarray]) -> np.ndarray:
    if len(groups) == 0:
        raise ValueError("bootstrap_ci: no groups to resample (empty sample).")
    totals = []
    width = None
    for i, g in enumerate(groups):
        arr = np.asarray(g, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"bootstrap_ci: group {i} must be 1-D or 2-D (rows x features), got shape {arr.shape}.")
        if width is None:
            width = arr.shape[1]
        elif arr.shape[1] != width:
            raise ValueError(f"bootstrap_ci: group {i} has {arr.shape[1]} features, group 0 has {width}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"bootstrap_ci: group {i} holds NaN/inf; drop or flag those rows first.")
        totals.append(arr.sum(axis=0))
    return np.stack(totals)


def resample_counts(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """How many times each group is drawn in each replicate, shape (n_boot, n_groups).

    Drawing with replacement is one ``integers`` call on a seeded ``numpy.random.Generator``, so
    the replicates depend only on (n_groups, n_boot, seed).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    gen = np.random.default_rng(seed)
    draws = gen.integers(0, n_groups, size=(n_boot, n_groups))
    flat = draws + (np.arange(n_boot)[:, None] * n_groups)
    return np.bincount(flat.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)


def bootstrap_ci(groups: Sequence[np.ndarray], statistic: TotalsStatistic, n_boot: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI, resampling whole groups with replacement.

    ``groups[i]`` holds the rows of group i (rows x features, or a 1-D column). The statistic of a
    replicate is computed on the concatenated rows of the drawn groups; every statistic here is a
    function of the column totals of those rows (counts, sums, ratios of sums, a confusion matrix),
    so ``statistic`` receives the totals, shape (n_boot, n_features), and returns (n_boot,) values.
    That makes 2000 replicates over ~100 groups one matrix product. Replicates where the statistic
    is undefined (``nan``, e.g. a ratio over zero draws) are left out; if all are, ``(nan, nan)``.
    """
    return bootstrap_cis(groups, {"ci": statistic}, n_boot, seed, alpha)["ci"]


def bootstrap_cis(groups: Sequence[np.ndarray], statistics: dict[str, TotalsStatistic], n_boot: int = 2000,
                  seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Several statistics on the same bootstrap replicates (same draws as :func:`bootstrap_ci`)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    totals = _group_totals(groups)
    counts = resample_counts(len(totals), n_boot, seed)
    replicate_totals = counts.astype(np.float64) @ totals
    out = {}
    for name, statistic in statistics.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.asarray(statistic(replicate_totals), dtype=np.float64)
        if values.shape != (n_boot,):
            raise ValueError(
                f"bootstrap_ci: statistic {name!r} must map totals of shape {replicate_totals.shape} to shape "
                f"({n_boot},), got {values.shape}; it receives column totals per replicate, not rows (see ratio_of()).")
        values = values[np.isfinite(values)]
        if values.size == 0:
            out[name] = (math.nan, math.nan)
            continue
        lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        out[name] = (rnd(lo), rnd(hi))
    return out


def point_statistic(groups: Sequence[np.ndarray], statistic: TotalsStatistic) -> float:
    """The statistic on the full sample (all groups once), with the same convention as bootstrap_ci."""
    totals = _group_totals(groups).sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return rnd(np.asarray(statistic(totals), dtype=np.float64).reshape(-1)[0])


def ratio_of(numerator: int, denominator: int) -> TotalsStatistic:
    """Statistic ``sum(col numerator) / sum(col denominator)``; nan where the denominator is 0."""
    def statistic(totals: np.ndarray) -> np.ndarray:
        den = totals[:, denominator]
        return np.where(den > 0, totals[:, numerator] / np.where(den > 0, den, 1.0), np.nan)
    return statistic


def _groups_by_id(columns: np.ndarray, group_ids: Sequence[Hashable] | None) -> list[np.ndarray]:
    """Split rows into groups by id (first-appearance order); no ids -> every row its own group."""
    if group_ids is None:
        return [columns[i:i + 1] for i in range(len(columns))]
    if len(group_ids) != len(columns):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(columns)} values.")
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        index.setdefault(g, []).append(i)
    return [columns[rows] for rows in index.values()]


def mean_ci(values: Sequence[float], group_ids: Sequence[Hashable] | None = None, n_boot: int = 2000,
            seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): mean of ``values`` with a bootstrap CI over groups (each value alone if no ids)."""
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.size == 0:
        raise ValueError("mean_ci: no values.")
    if not np.all(np.isfinite(vals)):
        raise ValueError("mean_ci: values hold NaN/inf; drop or flag those rows first.")
    columns = np.stack([vals, np.ones_like(vals)], axis=1)
    groups = _groups_by_id(columns, group_ids)
    stat = ratio_of(0, 1)
    return (point_statistic(groups, stat), *bootstrap_ci(groups, stat, n_boot, seed, alpha))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], group_ids: Sequence[Hashable] | None = None,
                   n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi) for paired values (e.g. arm vs base oracle score on the same object)."""
    a_arr = np.asarray(a, dtype=np.float64).reshape(-1)
    b_arr = np.asarray(b, dtype=np.float64).reshape(-1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_diff_ci: a has {a_arr.size} values, b has {b_arr.size}; they must be paired.")
    return mean_ci(a_arr - b_arr, group_ids, n_boot, seed, alpha)


def _kappa_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Cohen's kappa per row of flattened k x k confusion matrices, shape (B, k*k) -> (B,)."""
    b = conf.shape[0]
    k = int(round(math.sqrt(conf.shape[1])))
    m = conf.reshape(b, k, k)
    n = m.sum(axis=(1, 2))
    po = np.trace(m, axis1=1, axis2=2) / n
    pe = (m.sum(axis=2) * m.sum(axis=1)).sum(axis=1) / (n * n)
    # pe == 1: both raters used one and the same category throughout; kappa is 0/0, undefined.
    return np.where(pe < 1.0, (po - pe) / np.where(pe < 1.0, 1.0 - pe, 1.0), np.nan)


def _confusion_rows(a: Sequence[Hashable], b: Sequence[Hashable],
                    categories: Sequence[Hashable] | None) -> tuple[np.ndarray, list[Hashable]]:
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: rater a has {len(a)} labels, rater b has {len(b)}; they must be paired.")
    if len(a) == 0:
        raise ValueError("cohen_kappa: no paired labels.")
    cats = list(categories) if categories is not None else sorted(set(a) | set(b), key=str)
    pos = {c: i for i, c in enumerate(cats)}
    unknown = (set(a) | set(b)) - set(pos)
    if unknown:
        raise ValueError(f"cohen_kappa: labels {sorted(map(str, unknown))} are not in categories {cats}.")
    k = len(cats)
    rows = np.zeros((len(a), k * k))
    rows[np.arange(len(a)), [pos[x] * k + pos[y] for x, y in zip(a, b)]] = 1.0
    return rows, cats


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], categories: Sequence[Hashable] | None = None) -> float:
    """Cohen's kappa between two raters' labels on the same items; nan if chance agreement is 1."""
    rows, _ = _confusion_rows(a, b, categories)
    return rnd(_kappa_from_confusion(rows.sum(axis=0, keepdims=True))[0])


def cohen_kappa_ci(a: Sequence[Hashable], b: Sequence[Hashable], group_ids: Sequence[Hashable] | None = None,
                   categories: Sequence[Hashable] | None = None, n_boot: int = 2000, seed: int = 0,
                   alpha: float = 0.05) -> tuple[float, float, float]:
    """(kappa, lo, hi): kappa with a bootstrap CI over groups (objects) of the labelled items."""
    rows, _ = _confusion_rows(a, b, categories)
    groups = _groups_by_id(rows, group_ids)
    return (point_statistic(groups, _kappa_from_confusion),
            *bootstrap_ci(groups, _kappa_from_confusion, n_boot, seed, alpha))
