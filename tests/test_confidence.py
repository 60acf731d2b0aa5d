"""judge3d.report.confidence: the reliability curve and the coverage curve, on hand-built records."""
import random

import numpy as np
import pytest

from judge3d.judges.protocol import pair_verdicts
from judge3d.judges.verdict_log import verdict_of
from judge3d.report.confidence import (COVERAGE_CSV, RELIABILITY_CSV, confidence_metrics, coverage_csv_rows,
                                       coverage_curve, margin_for_agreement, reliability_csv_rows, reliability_curve)
from judge3d.report.tables import confidence_table


def records(specs):
    """specs: (pair_id, object_id, p_xy, p_yx, x_oracle, y_oracle) -> pair_verdicts of their log rows."""
    rows = []
    for pid, oid, p_xy, p_yx, xo, yo in specs:
        for order, p in (("xy", p_xy), ("yx", p_yx)):
            rows.append({"key": f"{pid}-{order}", "pair_id": pid, "object_id": oid, "order": order, "judge_id": "j",
                         "prompt_sha256": "p", "p_first": p, "verdict": verdict_of(p), "x_oracle": xo, "y_oracle": yo})
    return pair_verdicts(rows)


def soft_spec(pid, oid, s, x_better):
    """A swap-consistent pair (unless s = 0.5) whose debiased soft preference is exactly s."""
    return (pid, oid, s, 1.0 - s, 1.0 if x_better else 0.0, 0.0 if x_better else 1.0)


def point(conf, name, margin=None):
    [p] = [p for p in conf["points"] if p["filter"] == name and p["margin"] == margin]
    return p


def test_exactly_calibrated_objects_give_ece_zero_with_a_zero_interval_and_the_hand_brier():
    # every object: s = 0.75 with 3 of 4 x-better, s = 0.25 with 1 of 4; each resample stays exactly calibrated
    specs = []
    for o in range(6):
        for i, xb in enumerate([True, True, True, False]):
            specs.append(soft_spec(f"o{o}-hi{i}", f"o{o}", 0.75, xb))
        for i, xb in enumerate([True, False, False, False]):
            specs.append(soft_spec(f"o{o}-lo{i}", f"o{o}", 0.25, xb))
    rel = reliability_curve(records(specs), n_bins=10, n_boot=300, seed=1)
    assert rel["n"] == 48 and rel["n_objects"] == 6
    assert rel["ece"] == 0.0 and rel["ece_ci"] == [0.0, 0.0]
    # (3 * 0.25² + 0.75²) / 4 = 0.1875 for both halves
    assert rel["brier"] == pytest.approx(0.1875)
    filled = {b["bin"]: b for b in rel["bins"] if b["n"]}
    assert sorted(filled) == [2, 7]
    assert filled[7]["mean_soft"] == 0.75 and filled[7]["observed"] == 0.75 and filled[7]["n"] == 24
    lo, hi = filled[7]["observed_ci"]
    assert lo < 0.75 < hi


def test_ece_separates_a_calibrated_judge_from_an_overconfident_one():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.0, 1.0, 3000)
    truth = rng.uniform(0.0, 1.0, 3000) < s                      # P(x better | s) = s
    calibrated = records([soft_spec(f"p{i}", f"o{i // 3}", float(s[i]), bool(truth[i])) for i in range(3000)])
    # same verdict sides, pushed to 0.02 / 0.98: right side only as often as s says
    loud = records([soft_spec(f"p{i}", f"o{i // 3}", 0.98 if s[i] > 0.5 else 0.02, bool(truth[i])) for i in range(3000)])
    good = reliability_curve(calibrated, n_bins=10, n_boot=200, seed=0)
    bad = reliability_curve(loud, n_bins=10, n_boot=200, seed=0)
    assert good["ece"] < 0.04 and good["ece_ci"][0] <= good["ece"] <= good["ece_ci"][1]
    assert bad["ece"] > 0.15 and bad["ece_ci"][0] > good["ece_ci"][1]
    assert bad["brier"] > good["brier"]


def test_an_always_confident_always_right_judge_agrees_fully_at_every_margin():
    specs = [soft_spec(f"p{i}", f"o{i % 4}", 0.97 if i % 2 else 0.03, bool(i % 2)) for i in range(20)]
    cov = coverage_curve(records(specs), margins=[0.0, 0.1, 0.2, 0.3, 0.4, 0.45])
    assert len(cov["points"]) == 2 + 2 * 6
    for p in cov["points"]:
        assert (p["agreement"], p["coverage"], p["n"]) == (1.0, 1.0, 20), p


def test_margin_filter_by_hand_and_the_swap_filter_drops_an_inconsistent_pair():
    specs = [soft_spec("a", "o1", 0.52, True),     # |s-.5| = .02, right
             soft_spec("b", "o1", 0.60, False),    # .10, wrong
             soft_spec("c", "o2", 0.80, True),     # .30, right
             soft_spec("d", "o2", 0.30, True),     # .20, wrong (s says y)
             ("e", "o3", 0.70, 0.60, 1.0, 0.0),    # xy says x, yx says y: inconsistent; s = 0.55, right
             soft_spec("f", "o3", 0.50, True)]     # s = 0.5: abstains, inconsistent (a tie)
    recs = records(specs)
    assert [r["consistent"] for r in recs] == [True, True, True, True, False, False]
    cov = coverage_curve(recs, margins=[0.0, 0.05, 0.15, 0.25])
    assert cov["n"] == 6
    none = point(cov, "none")
    assert (none["n"], none["n_agree"], none["coverage"]) == (5, 3, pytest.approx(5 / 6, abs=1e-6))
    swap = point(cov, "swap")
    assert (swap["n"], swap["n_agree"], swap["coverage"]) == (4, 2, pytest.approx(4 / 6, abs=1e-6))
    expected = {0.0: (5, 3), 0.05: (4, 2), 0.15: (2, 1), 0.25: (1, 1)}
    for m, (n, k) in expected.items():
        p = point(cov, "margin", m)
        assert (p["n"], p["n_agree"]) == (n, k), m
        assert p["agreement"] == pytest.approx(k / n, abs=1e-6)
        lo, hi = p["agreement_ci"]
        assert lo <= p["agreement"] <= hi
    # the combination drops e (inconsistent) wherever the margin alone keeps it
    assert (point(cov, "swap+margin", 0.0)["n"], point(cov, "swap+margin", 0.05)["n"]) == (4, 3)
    assert point(cov, "margin", 0.0) == {**none, "filter": "margin", "margin": 0.0}


def test_oracle_ties_and_missing_are_left_out_and_counted():
    specs = [soft_spec("a", "o1", 0.9, True), soft_spec("b", "o1", 0.2, False),
             ("t", "o2", 0.9, 0.1, 0.5, 0.5), ("m1", "o2", 0.9, 0.1, None, 0.3), ("m2", "o3", 0.9, 0.1, None, None)]
    conf = confidence_metrics(records(specs), n_bins=5, margins=[0.0, 0.3], n_boot=100, seed=0)
    assert (conf["n_pairs"], conf["n_oracle"], conf["oracle_ties"], conf["oracle_missing"]) == (5, 2, 1, 2)
    assert conf["reliability"]["n"] == 2 and conf["coverage"]["n"] == 2
    assert point(conf["coverage"], "none")["coverage"] == 1.0


def test_no_oracle_at_all_gives_nulls_not_numbers():
    conf = confidence_metrics(records([("a", "o1", 0.9, 0.1, None, None)]), n_boot=100)
    assert conf["n_oracle"] == 0 and conf["reliability"]["ece"] is None and conf["reliability"]["ece_ci"] == [None, None]
    assert all(p["agreement"] is None and p["coverage"] is None for p in conf["coverage"]["points"])
    assert reliability_csv_rows(conf) == []


def test_csv_rows_skip_empty_bins_and_carry_the_columns():
    specs = [soft_spec("a", "o1", 0.05, False), soft_spec("b", "o1", 0.95, True), soft_spec("c", "o2", 0.97, False),
             soft_spec("d", "o2", 1.0, True)]                  # s = 1 falls in the last bin
    conf = confidence_metrics(records(specs), n_bins=10, margins=[0.0, 0.4], n_boot=100, seed=0)
    rows = reliability_csv_rows(conf)
    assert [r["bin"] for r in rows] == [0, 9] and [r["n"] for r in rows] == [1, 3]
    assert all(tuple(r) == RELIABILITY_CSV for r in rows)
    assert rows[1]["observed"] == pytest.approx(2 / 3, abs=1e-6)
    cov_rows = coverage_csv_rows(conf)
    assert all(tuple(r) == COVERAGE_CSV for r in cov_rows)
    assert [(r["filter"], r["margin"]) for r in cov_rows] == [("none", None), ("swap", None), ("margin", 0.0),
                                                              ("margin", 0.4), ("swap+margin", 0.0), ("swap+margin", 0.4)]


def test_bootstrap_is_deterministic_for_a_seed_and_ignores_record_order():
    rng = np.random.default_rng(3)
    specs = [soft_spec(f"p{i}", f"o{i // 2}", float(rng.uniform()), bool(rng.uniform() < 0.6)) for i in range(60)]
    a = confidence_metrics(records(specs), n_boot=300, seed=7)
    shuffled = list(specs)
    random.Random(0).shuffle(shuffled)
    assert confidence_metrics(records(shuffled), n_boot=300, seed=7) == a
    assert confidence_metrics(records(specs), n_boot=300, seed=8)["reliability"]["ece_ci"] != a["reliability"]["ece_ci"]


def test_bad_input_is_named():
    good = records([soft_spec("a", "o1", 0.9, True)])
    with pytest.raises(ValueError, match="margins"):
        coverage_curve(good, margins=[0.1, 0.05])
    with pytest.raises(ValueError, match="margins"):
        coverage_curve(good, margins=[0.5])
    with pytest.raises(ValueError, match="appears twice"):
        coverage_curve(good + good)
    with pytest.raises(ValueError, match="soft"):
        reliability_curve([{**good[0], "soft": 1.2}])
    with pytest.raises(ValueError, match="no pair records"):
        confidence_metrics([])


def test_table_gives_the_first_margin_reaching_the_target_or_never():
    # sure pairs are always right, unsure ones right half the time: agreement reaches 0.9 only at m >= 0.3
    specs = [soft_spec(f"s{i}", f"o{i}", 0.9, True) for i in range(10)]
    specs += [soft_spec(f"u{i}", f"o{i}", 0.6, i % 2 == 0) for i in range(10)]
    sharp = confidence_metrics(records(specs), margins=[0.0, 0.1, 0.3], n_boot=100, seed=0)
    hit = margin_for_agreement(sharp, 0.9)
    assert (hit["margin"], hit["coverage"], hit["agreement"]) == (0.3, 0.5, 1.0)
    coin = confidence_metrics(records([soft_spec(f"u{i}", f"o{i}", 0.6, i % 2 == 0) for i in range(10)]),
                              margins=[0.0, 0.1], n_boot=100, seed=0)
    assert margin_for_agreement(coin, 0.9) is None
    table = confidence_table({"eval": sharp, "train": coin})
    md = table.markdown()
    assert "| eval | 20 (0/0) |" in md and "0.30 (n = 10)" in md
    assert "| train | 10 (0/0) |" in md and "| never | n/a |" in md
    data = table.data.set_index("role")
    assert data.loc["eval", "target_margin"] == 0.3 and data.loc["train", "target_margin"] is None
    assert data.loc["eval", "agreement_all"] == pytest.approx(0.75)
