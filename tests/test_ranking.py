"""The Bradley–Terry ranking (judge3d.report.ranking): known answers on synthetic records, ties as
half a win, the bootstrap intervals, a perfect record, regimes kept apart, and verify on a crafted repo."""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import yaml

from judge3d.core.io import read_json, write_json
from judge3d.pipeline.verify import verify_repo
from judge3d.report.arm_metrics import report_settings
from judge3d.report.ranking import ELO_BASE, fit_strength, ranking
from report_fixture import REPO, build_repo, run_stages

TINY = 1e-12  # a ridge that leaves the closed form exact to ~1e-11


def _settings(arms: tuple[str, ...], n_boot: int = 200, seed: int = 0):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["report"]["n_boot"] = n_boot
    params["report"]["seed"] = seed
    settings = report_settings(params)
    return dataclasses.replace(settings, arms={a: settings.arms[a] for a in arms})


def _records(arm: str, outcomes: str) -> list[dict]:
    """One pair per object; outcome letters: w = arm wins, l = base wins, f = flip."""
    recs = []
    for i, o in enumerate(outcomes):
        recs.append({"arm": arm, "pair_id": f"{arm}/p{i}", "object_id": f"obj{i:02d}", "consistent": o != "f",
                     "winner": {"w": "x", "l": "y", "f": None}[o]})
    return recs


def _metrics(outcomes: str, diverged: bool = False) -> dict:
    return {"display": "arm", "n": len(outcomes), "W": outcomes.count("w"), "L": outcomes.count("l"),
            "F": outcomes.count("f"), "diverged": diverged, "train": {"trained": True}, "flagged_objects": []}


def test_three_wins_of_four_is_log_three():
    # P(win) = 3/4 = σ(θ)  =>  θ = ln 3, by hand; Elo = 1000 + 400·log10(3)
    assert fit_strength(3, 1, ridge=0) == pytest.approx(math.log(3), abs=1e-12)
    out = ranking(_records("sft_best", "wwwl"), {"sft_best": _metrics("wwwl")}, _settings(("sft_best",)), ridge=TINY)
    p = out["regimes"]["clean"]["players"]
    assert p["sft_best"]["strength"] == pytest.approx(math.log(3), abs=1e-6)
    assert p["sft_best"]["elo"] == pytest.approx(1000 + 400 * math.log10(3), abs=1e-5)
    assert p["sft_best"]["win_prob_vs_base"] == pytest.approx(0.75, abs=1e-6)
    assert p["base"]["strength"] == 0.0 and p["base"]["elo"] == ELO_BASE
    assert (p["sft_best"]["rank"], p["base"]["rank"]) == (1, 2)
    assert out["regimes"]["clean"]["order"] == ["sft_best", "base"]


def test_ridge_solves_the_penalized_score_equation():
    lam = 0.01
    theta = fit_strength(3, 1, ridge=lam)
    sig = 1 / (1 + math.exp(-theta))
    assert 3 * (1 - sig) - sig - lam * theta == pytest.approx(0.0, abs=1e-10)
    assert 0 < theta < math.log(3)  # shrunk towards the base, not past it


def test_flip_counts_as_half_a_win_each():
    # W=2, L=0, F=2: wins 2 + 1 = 3, losses 0 + 1 = 1  ->  ln 3, as for 3 wins of 4
    out = ranking(_records("orpo", "wwff"), {"orpo": _metrics("wwff")}, _settings(("orpo",)), ridge=TINY)
    assert out["regimes"]["clean"]["players"]["orpo"]["strength"] == pytest.approx(math.log(3), abs=1e-6)
    # W=1, L=1, F=2: even, so equal to the base and sharing its rank
    even = ranking(_records("orpo", "wlff"), {"orpo": _metrics("wlff")}, _settings(("orpo",)))
    p = even["regimes"]["clean"]["players"]
    assert p["orpo"]["strength"] == 0.0 and p["orpo"]["rank"] == p["base"]["rank"] == 1


def test_bootstrap_interval_contains_point_and_is_seeded():
    outcomes = "wwlwfwlwwlfwwwlwlwwf"
    recs, m = _records("dpo", outcomes), {"dpo": _metrics(outcomes)}
    a = ranking(recs, m, _settings(("dpo",), seed=3))
    b = ranking(recs, m, _settings(("dpo",), seed=3))
    c = ranking(recs, m, _settings(("dpo",), seed=4))
    assert a == b
    p = a["regimes"]["clean"]["players"]["dpo"]
    for key in ("strength", "elo", "win_prob_vs_base"):
        lo, hi = p[f"{key}_ci"]
        assert lo < p[key] < hi, key
    assert p["rank_ci"][0] <= p["rank"] <= p["rank_ci"][1]
    assert c["regimes"]["clean"]["players"]["dpo"]["strength_ci"] != p["strength_ci"]


def test_perfect_record_stays_finite():
    assert fit_strength(4, 0, ridge=0) == math.inf  # unbounded without a ridge, and said so
    out = ranking(_records("dpo", "wwww"), {"dpo": _metrics("wwww")}, _settings(("dpo",)))
    p = out["regimes"]["clean"]["players"]["dpo"]
    values = [p["strength"], p["elo"], p["win_prob_vs_base"], *p["strength_ci"], *p["elo_ci"]]
    assert all(v is not None and math.isfinite(v) for v in values)
    assert p["strength"] > 3 and p["rank_ci"] == [1, 1]
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ranking(_records("dpo", "wwww"), {"dpo": _metrics("wwww")}, _settings(("dpo",)), ridge=0)


def test_regimes_are_separate_fits_and_diverged_is_marked():
    recs = _records("dpo", "wlwl") + _records("repair_severe", "wwwl") + _records("sft_clean", "llll")
    arms = {"dpo": _metrics("wlwl", diverged=True), "repair_severe": _metrics("wwwl"), "sft_clean": _metrics("llll")}
    out = ranking(recs, arms, _settings(("dpo", "repair_severe", "sft_clean")))
    assert list(out["regimes"]) == ["clean", "severe"]
    clean, severe = out["regimes"]["clean"], out["regimes"]["severe"]
    assert set(clean["players"]) == {"base", "dpo"} and set(severe["players"]) == {"base", "repair_severe", "sft_clean"}
    assert severe["order"] == ["repair_severe", "base", "sft_clean"]
    # the severe arms do not move the clean fit
    alone = ranking(_records("dpo", "wlwl"), {"dpo": arms["dpo"]}, _settings(("dpo",)))
    assert alone["regimes"]["clean"] == clean
    assert clean["players"]["dpo"]["diverged"] is True and clean["players"]["dpo"]["rank"] == 1


def test_stale_arm_metrics_are_refused():
    with pytest.raises(ValueError, match="metrics are stale"):
        ranking(_records("dpo", "wwwl"), {"dpo": _metrics("wwll")}, _settings(("dpo",)))


@pytest.fixture(scope="module")
def crafted_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking") / "repo"
    params = build_repo(root, arm_gain={"repair_severe": 0.3}, diverged=("dpo_strong",), n_boot=100)
    run_stages(root, params)
    return root


def test_report_writes_ranking_and_verify_catches_tampering(crafted_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(crafted_repo, root)
    found = read_json(root / "metrics/ranking.json")
    assert found["regimes"]["clean"]["players"]["dpo_strong"]["diverged"] is True
    assert "dpo_strong@clean" in (root / "reports/ranking.csv").read_text()
    assert '<section id="ranking">' in (root / "reports/report.html").read_text()
    assert verify_repo(root) == []
    true_elo = found["regimes"]["severe"]["players"]["repair_severe"]["elo"]
    found["regimes"]["severe"]["players"]["repair_severe"]["elo"] = true_elo + 50
    write_json(root / "metrics/ranking.json", found)
    assert verify_repo(root) == [f"metrics/ranking.json: regimes.severe.players.repair_severe.elo: "
                                 f"expected {true_elo!r}, found {true_elo + 50!r}"]
    (root / "reports/ranking.md").write_text("edited\n")
    assert any(l.startswith("reports/ranking.md: line 1") for l in verify_repo(root))
