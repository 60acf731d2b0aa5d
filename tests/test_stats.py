import math

import numpy as np
import pytest

from judge3d.core import stats


def test_wilson_known_values():
    # Reference values: Wilson score interval, z = 1.96 (e.g. Newcombe 1998, Brown-Cai-DasGupta 2001).
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0


def test_wilson_empty_and_invalid():
    lo, hi = stats.wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="k <= n"):
        stats.wilson_interval(5, 3)


def _naive_bootstrap(groups, row_statistic, n_boot, seed, alpha):
    """Reference: concatenate the rows of the drawn groups, loop over replicates."""
    gen = np.random.default_rng(seed)
    draws = gen.integers(0, len(groups), size=(n_boot, len(groups)))
    values = np.array([row_statistic(np.concatenate([groups[i] for i in d])) for d in draws])
    values = values[np.isfinite(values)]
    return tuple(round(float(v), 6) for v in np.quantile(values, [alpha / 2, 1 - alpha / 2]))


def test_bootstrap_matches_concatenated_rows_reference():
    gen = np.random.default_rng(1)
    # Unequal group sizes: a pooled mean differs from a mean of group means, so this checks the
    # statistic really is computed on concatenated rows.
    groups = [np.stack([gen.random(k), np.ones(k)], axis=1) for k in gen.integers(1, 6, size=20)]
    fast = stats.bootstrap_ci(groups, stats.ratio_of(0, 1), n_boot=500, seed=3)
    slow = _naive_bootstrap(groups, lambda rows: rows[:, 0].mean(), 500, 3, 0.05)
    assert fast == pytest.approx(slow, abs=1e-6)


def test_bootstrap_deterministic_and_contains_point():
    gen = np.random.default_rng(0)
    # continuous values, so replicate quantiles of two seeds do not land on one discrete grid point
    groups = [np.stack([gen.random(4), np.ones(4)], axis=1) for _ in range(40)]
    stat = stats.ratio_of(0, 1)
    a = stats.bootstrap_ci(groups, stat, n_boot=2000, seed=7)
    b = stats.bootstrap_ci(groups, stat, n_boot=2000, seed=7)
    c = stats.bootstrap_ci(groups, stat, n_boot=2000, seed=8)
    assert a == b
    assert a != c
    point = stats.point_statistic(groups, stat)
    assert a[0] < point < a[1]
    assert a[1] - a[0] < 0.2  # 160 rows in 40 groups: the interval is informative, not [0, 1]


def test_bootstrap_constant_sample_has_zero_width():
    groups = [np.array([[1.0, 1.0]]) for _ in range(10)]
    assert stats.bootstrap_ci(groups, stats.ratio_of(0, 1), n_boot=200) == (1.0, 1.0)


def test_bootstrap_rejects_row_statistic_and_bad_input():
    groups = [np.array([1.0, 2.0]), np.array([3.0])]
    with pytest.raises(ValueError, match="column totals"):
        stats.bootstrap_ci(groups, np.mean, n_boot=50)
    with pytest.raises(ValueError, match="no groups"):
        stats.bootstrap_ci([], stats.ratio_of(0, 0))
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci([np.array([np.nan])], stats.ratio_of(0, 0))


def test_bootstrap_undefined_everywhere_is_nan():
    groups = [np.array([[0.0, 0.0]]) for _ in range(5)]  # denominator always 0
    lo, hi = stats.bootstrap_ci(groups, stats.ratio_of(0, 1), n_boot=100)
    assert math.isnan(lo) and math.isnan(hi)


def test_mean_ci_and_paired_diff():
    mean, lo, hi = stats.mean_ci([1.0, 2.0, 3.0, 4.0], n_boot=500)
    assert mean == 2.5 and 1.0 <= lo <= 2.5 <= hi <= 4.0
    diff, lo, hi = stats.paired_diff_ci([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], group_ids=["a", "a", "b"], n_boot=500)
    assert diff == 2.0 and lo <= diff <= hi
    # groups: resampling object "a" (values 1,2) twice gives 1.5, "b" twice gives 3.
    assert lo >= 1.5 and hi <= 3.0
    with pytest.raises(ValueError, match="paired"):
        stats.paired_diff_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        stats.mean_ci([1.0, float("nan")])


def test_cohen_kappa_hand_computed():
    # 50 items: both yes 20, a yes/b no 5, a no/b yes 10, both no 15.
    # po = 35/50 = 0.7; pe = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    assert stats.cohen_kappa(a, a) == 1.0
    assert math.isnan(stats.cohen_kappa(["x"] * 4, ["x"] * 4))  # chance agreement 1: undefined
    with pytest.raises(ValueError, match="not in categories"):
        stats.cohen_kappa(["x", "z"], ["x", "y"], categories=["x", "y"])


def test_cohen_kappa_ci_contains_point_and_is_deterministic():
    gen = np.random.default_rng(2)
    a = gen.choice(["x", "y", "flip"], size=120).tolist()
    b = [v if gen.random() < 0.7 else gen.choice(["x", "y", "flip"]) for v in a]
    groups = [i // 3 for i in range(120)]
    k1 = stats.cohen_kappa_ci(a, b, group_ids=groups, n_boot=1000, seed=0)
    k2 = stats.cohen_kappa_ci(a, b, group_ids=groups, n_boot=1000, seed=0)
    assert k1 == k2
    kappa, lo, hi = k1
    assert kappa == stats.cohen_kappa(a, b)
    assert lo < kappa < hi


def test_clean_for_metrics():
    assert stats.clean(float("nan")) is None
    assert stats.clean(None) is None
    assert stats.clean(1 / 3) == 0.333333
    assert str(stats.clean(-0.0)) == "0.0"
