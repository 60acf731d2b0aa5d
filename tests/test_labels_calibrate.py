"""judge-train-labels and calibrate: pairing, kept pairs, metrics, pass/fail, resume, flip-vs-gap bins.

Crafted montage manifests and PNGs; a fake deterministic backend that reads each montage's
"quality" from its grey level and answers sigmoid(k * (q_first - q_second) + position_bias). The
fake's position bias is what makes small gaps flip, so flips follow from the crafted qualities.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge3d.core.config import ParamsError, load_params
from judge3d.judges.pairing import (base_vs_base_pairs, clear_gap_pairs, headroom_pairs, iid_pairs, kept_pairs,
                                    train_label_pairs)
from judge3d.judges.protocol import pair_verdicts
from judge3d.pipeline.judging import run_calibrate, run_judge_train_labels
from judge3d.judges.verdict_log import prompt_sha256, query_key, verdict_of
from judge3d.report.judge_metrics import (calibration_metrics, calibration_metrics_from_dir, flip_gap_correlation,
                                          flip_vs_gap, labels_metrics_from_logs, thresholds)
from judge3d.core.io import read_json, read_jsonl, write_jsonl

PROMPT = "Which montage is the better reconstruction? Answer A or B."
PARAMS = {
    "labels": {"batch_size": 4, "bootstrap": {"n": 200, "seed": 0}},
    "calibrate": {"batch_size": 4, "bootstrap": {"n": 200, "seed": 0}, "severities": ["mild", "severe"],
                  "thresholds": {"clear_gap_min_strict": 0.83, "base_vs_base_decisive": [0.35, 0.65]},
                  "gap_bins": [0.0, 0.1, 0.5, 1.0]},
}


# --------------------------------------------------------------------------------------------
# fixtures: montages whose grey level encodes a quality in [0, 1]
# --------------------------------------------------------------------------------------------
def _grey(q: float) -> int:
    return int(round(20 + 200 * q))


def _quality(path) -> float:
    return (float(np.asarray(Image.open(path)).mean()) - 20) / 200


class FakeJudge:
    """Deterministic stand-in for HFJudge: P(first) from the two images' encoded qualities."""

    def __init__(self, judge_id="fake@000000000000", k=10.0, bias=0.5, fail_after=None):
        self.judge_id, self.k, self.bias, self.fail_after = judge_id, k, bias, fail_after
        self.queries = 0

    def p_first(self, pairs, prompt):
        if self.fail_after is not None and self.queries + len(pairs) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.queries += len(pairs)
        out = [1 / (1 + math.exp(-(self.k * (_quality(a) - _quality(b)) + self.bias))) for a, b in pairs]
        return np.asarray(out)


def _row(root: Path, set_name: str, object_id: str, budget: str, q: float, oracle: float | None, seed: int,
         seed_index: int = 0, **extra):
    cand = f"{object_id}_{budget}_s{seed_index}"
    png = root / "montages" / set_name / f"{cand}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (_grey(q),) * 3).save(png)
    return {"object_id": object_id, "budget": budget, "seed": seed, "seed_index": seed_index, "candidate": cand,
            "montage_path": str(png), "mesh_path": f"data/generated/{set_name}/{cand}.ply", "oracle_score": oracle,
            "empty": False, "regime": extra.pop("regime", "clean"), "category": "chair", **extra}


@pytest.fixture()
def train_manifest(tmp_path):
    """4 (high, low) objects: o0-o2 with a clear gap (judge prefers high), o3 where the judge prefers the
    LOW budget (its montage looks better), o4 with a tiny gap (flips); 2 i.i.d.-only objects, 3 samples each."""
    rows = []
    for oid, qh, ql in [("o0", 0.9, 0.2), ("o1", 0.8, 0.3), ("o2", 0.7, 0.1), ("o3", 0.2, 0.8), ("o4", 0.51, 0.5)]:
        rows.append(_row(tmp_path, "train", oid, "high", qh, oracle=qh, seed=100))
        rows.append(_row(tmp_path, "train", oid, "low", ql, oracle=ql, seed=101))
    for oid, qs in [("o5", [0.5, 0.52, 0.9]), ("o6", [0.3, 0.31, 0.305])]:
        for i, q in enumerate(qs):
            rows.append(_row(tmp_path, "train", oid, "default", q, oracle=q, seed=200 + i, seed_index=i))
    path = tmp_path / "montages" / "train" / "manifest.jsonl"
    write_jsonl(path, rows)
    return path, rows


def _heldout(tmp_path, bvb_gap=0.01, clear=(0.9, 0.1), n=4, severities=("mild", "severe")):
    """heldout_clean (default s0, s1, high, low) + heldout_<sev> (default s0, same seed) per object, and
    clear_gap: each default s0 output's degraded copy (quality ``clear[1]``), as clear-gap-meshes writes it."""
    root = tmp_path / "montages"
    clean, corrupted = [], []
    sev_rows = {s: [] for s in severities}
    for j in range(n):
        oid = f"h{j}"
        seed0, seed1 = 1000 + j, 2000 + j
        clean.append(_row(tmp_path, "heldout_clean", oid, "default", 0.6, 0.6, seed0, 0))
        clean.append(_row(tmp_path, "heldout_clean", oid, "default", 0.6 + bvb_gap * (-1) ** j, 0.6 + bvb_gap, seed1, 1))
        clean.append(_row(tmp_path, "heldout_clean", oid, "high", clear[0], clear[0], 3000 + j))
        clean.append(_row(tmp_path, "heldout_clean", oid, "low", clear[1], clear[1], 4000 + j))
        corrupted.append(dict(_row(tmp_path, "clear_gap", oid, "default", clear[1], clear[1], seed0, 0),
                              candidate=f"{oid}_default_s0__coarsen2", source_candidate=f"{oid}_default_s0"))
        for s in severities:
            q = {"mild": 0.57, "medium": 0.4, "severe": 0.2}[s]
            sev_rows[s].append(_row(tmp_path, f"heldout_{s}", oid, "default", q, q, seed0, 0, regime=s))
    write_jsonl(root / "heldout_clean" / "manifest.jsonl", clean)
    write_jsonl(root / "clear_gap" / "manifest.jsonl", corrupted)
    for s, rows in sev_rows.items():
        write_jsonl(root / f"heldout_{s}" / "manifest.jsonl", rows)
    return root, clean, sev_rows


# --------------------------------------------------------------------------------------------
# pairing
# --------------------------------------------------------------------------------------------
def test_pairing_builds_the_expected_pairs(tmp_path, train_manifest):
    _, rows = train_manifest
    hl = train_label_pairs(rows)
    assert [p.object_id for p in hl] == ["o0", "o1", "o2", "o3", "o4"]  # i.i.d.-only objects are skipped
    assert all(p.x_candidate.endswith("_high_s0") and p.y_candidate.endswith("_low_s0") for p in hl)
    assert hl[0].pair_id == "high_low:o0:o0_high_s0|o0_low_s0"
    assert (hl[3].x_oracle, hl[3].y_oracle) == (0.2, 0.8)
    assert hl[0].meta["x"]["mesh_path"] == "data/generated/train/o0_high_s0.ply"

    iid = iid_pairs(rows)
    assert [(p.x_candidate, p.y_candidate) for p in iid if p.object_id == "o5"] == [
        ("o5_default_s0", "o5_default_s1"), ("o5_default_s0", "o5_default_s2"), ("o5_default_s1", "o5_default_s2")]
    assert len(iid) == 6 and len({p.pair_id for p in iid}) == 6

    _, clean, sev = _heldout(tmp_path)
    corrupted = read_jsonl(tmp_path / "montages" / "clear_gap" / "manifest.jsonl")
    cg = clear_gap_pairs(clean, list(reversed(corrupted)))
    assert [p.object_id for p in cg] == ["h0", "h1", "h2", "h3"]
    assert all(p.x_candidate.endswith("default_s0") and p.y_candidate == p.x_candidate + "__coarsen2" for p in cg)
    bvb = base_vs_base_pairs(list(reversed(clean)))  # row order must not decide which seed is s0
    assert all(p.x_candidate.endswith("default_s0") and p.y_candidate.endswith("default_s1") for p in bvb)
    hr = headroom_pairs(clean, sev["mild"], "mild")
    assert all(p.meta["x"]["regime"] == "clean" and p.meta["y"]["regime"] == "mild" for p in hr)
    assert all(p.meta["x"]["seed"] == p.meta["y"]["seed"] for p in hr)  # same noise, only the input differs
    assert hr[0].pair_id.startswith("headroom_mild:h0:") and hr[0].meta["severity"] == "mild"
    # candidate ids repeat across sets; pooled pair ids must not
    all_ids = [p.pair_id for p in cg + bvb + hr + headroom_pairs(clean, sev["severe"], "severe")]
    assert len(all_ids) == len(set(all_ids))


def test_pairing_rejects_broken_manifests(tmp_path, train_manifest):
    _, rows = train_manifest
    with pytest.raises(ValueError, match="o0 has no 'low'"):
        train_label_pairs([r for r in rows if r["candidate"] != "o0_low_s0"])
    no_montage = [dict(r) for r in rows]
    del no_montage[0]["montage_path"]
    with pytest.raises(ValueError, match="render stage"):
        train_label_pairs(no_montage)
    with pytest.raises(ValueError, match="appears twice"):
        iid_pairs(rows + [rows[0]])
    _, clean, sev = _heldout(tmp_path)
    with pytest.raises(ValueError, match="seed 9"):
        headroom_pairs(clean, [dict(sev["mild"][0], seed=9)], "mild")
    with pytest.raises(ValueError, match="two seeds"):
        base_vs_base_pairs([r for r in clean if r["seed_index"] == 0 or r["budget"] != "default"])
    corrupted = read_jsonl(tmp_path / "montages" / "clear_gap" / "manifest.jsonl")
    nan_oracle = clear_gap_pairs([dict(r, oracle_score=float("nan")) for r in clean], corrupted)
    assert nan_oracle[0].x_oracle is None  # unknown, not a number
    with pytest.raises(ValueError, match="source candidate 'h0_default_s9'"):
        clear_gap_pairs(clean, [dict(corrupted[0], source_candidate="h0_default_s9")])


# --------------------------------------------------------------------------------------------
# judge-train-labels
# --------------------------------------------------------------------------------------------
def test_labels_keeps_consistent_pairs_and_winners(tmp_path, train_manifest):
    manifest, rows = train_manifest
    judge = FakeJudge()
    m = run_judge_train_labels(judge, manifest, tmp_path / "labels", tmp_path / "metrics/labels.json", PARAMS,
                               PROMPT, show_progress=False)
    assert judge.queries == 2 * (5 + 6)
    kept = read_jsonl(tmp_path / "labels" / "train_pairs.jsonl")
    # o4 (gap 0.01) flips under the fake's position bias; o3 is kept with the LOW budget as winner
    assert [k["object_id"] for k in kept] == ["o0", "o1", "o2", "o3"]
    by_obj = {k["object_id"]: k for k in kept}
    assert by_obj["o0"]["winner_candidate"] == "o0_high_s0" and by_obj["o0"]["loser_candidate"] == "o0_low_s0"
    assert by_obj["o0"]["judge_agrees_with_budget"] is True
    o3 = by_obj["o3"]
    assert (o3["winner_candidate"], o3["loser_candidate"]) == ("o3_low_s0", "o3_high_s0")
    assert o3["winner_budget"] == "low" and o3["judge_agrees_with_budget"] is False
    assert o3["winner_mesh_path"] == "data/generated/train/o3_low_s0.ply"
    assert o3["winner_montage_path"].endswith("o3_low_s0.png") and o3["oracle_agrees"] is True
    assert all(k["confidence"] > 0.5 for k in kept)
    # confidence = debiased soft preference of the winner, from both orders
    rec = {r["pair_id"]: r for r in pair_verdicts(read_jsonl(tmp_path / "labels" / "verdicts.jsonl"))}
    assert o3["confidence"] == pytest.approx(1 - rec[o3["pair_id"]]["soft"])

    assert m["n"] == 5 and m["pairs_kept"] == 4 and m["pairs_kept_high_wins"] == 3 and m["pairs_kept_low_wins"] == 1
    assert m["strict_win_high_over_low"] == pytest.approx(3 / 5)
    assert m["flip_rate"] == pytest.approx(1 / 5)
    lo, hi = m["strict_wilson_ci"]
    assert lo < 0.6 < hi and m["strict_boot_ci"][0] <= 0.6 <= m["strict_boot_ci"][1]
    # o3: the judge picked the oracle-better (low) mesh, so every consistent verdict agrees with the oracle
    assert m["judge_oracle_agreement"] == 1.0 and m["n_oracle"] == 4
    # o4 flip: both orders answered "first"; all consistent pairs answer first once -> 4*1 + 2 = 6 of 10
    assert m["prefer_first_rate"] == pytest.approx(6 / 10)
    # i.i.d.: o5 (0.5, 0.52, 0.9): only pairs with 0.9 are consistent; o6: all three flip -> 4 of 6
    assert m["iid_n"] == 6 and m["iid_flip_rate"] == pytest.approx(4 / 6)
    # verify's path: the same numbers from the logs alone
    again = labels_metrics_from_logs(tmp_path / "labels/verdicts.jsonl", tmp_path / "labels/iid_verdicts.jsonl", PARAMS)
    assert json.dumps(again, sort_keys=True) == json.dumps(read_json(tmp_path / "metrics/labels.json"), sort_keys=True)


def test_labels_rerun_and_resume(tmp_path, train_manifest):
    manifest, _ = train_manifest
    out, met = tmp_path / "labels", tmp_path / "labels.json"
    run_judge_train_labels(FakeJudge(), manifest, out, met, PARAMS, PROMPT, show_progress=False)
    before = {p.name: p.read_bytes() for p in [met, *sorted(out.iterdir())]}
    judge = FakeJudge()
    run_judge_train_labels(judge, manifest, out, met, PARAMS, PROMPT, show_progress=False)
    assert judge.queries == 0
    assert {p.name: p.read_bytes() for p in [met, *sorted(out.iterdir())]} == before

    # a run killed mid-way resumes: only the unlogged queries are asked, same metrics and kept pairs
    out2, met2 = tmp_path / "labels2", tmp_path / "labels2.json"
    with pytest.raises(KeyboardInterrupt):
        run_judge_train_labels(FakeJudge(fail_after=9), manifest, out2, met2, PARAMS, PROMPT, show_progress=False)
    assert len(read_jsonl(out2 / "verdicts.jsonl")) == 8
    judge = FakeJudge()
    run_judge_train_labels(judge, manifest, out2, met2, PARAMS, PROMPT, show_progress=False)
    assert judge.queries == 22 - 8
    assert met2.read_bytes() == before["labels.json"]
    assert (out2 / "train_pairs.jsonl").read_bytes() == before["train_pairs.jsonl"]


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------
def test_calibrate_stage_end_to_end_and_rerun(tmp_path):
    root, _, _ = _heldout(tmp_path, bvb_gap=0.01)
    out, met, plots = tmp_path / "cal", tmp_path / "metrics/calibration.json", tmp_path / "metrics/plots"
    plot = plots / "flip_vs_gap.csv"
    ev, tr = FakeJudge("eval@aaaaaaaaaaaa"), FakeJudge("train@bbbbbbbbbbbb", bias=-0.3)
    m = run_calibrate(ev, tr, root, out, met, plots, PARAMS, PROMPT, show_progress=False)
    controls = ["base_vs_base", "clear_gap", "headroom_mild", "headroom_severe"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{j}_{c}.jsonl" for j in ("eval", "train") for c in controls),
                                                            "flagged.jsonl"])
    assert sorted(p.name for p in plots.iterdir()) == ["coverage_eval.csv", "coverage_train.csv", "flip_vs_gap.csv",
                                                       "reliability_eval.csv", "reliability_train.csv"]
    assert (out / "flagged.jsonl").read_text() == "" and m["n_flagged"] == 0  # no render flags in this fixture
    assert ev.queries == 2 * 4 * 4 and tr.queries == 2 * 4 * 4
    assert m["clear_gap"]["strict"] == 1.0 and m["clear_gap"]["pass"] is True
    # base-vs-base gap 0.01 < the fake's position bias: every pair flips, decisive undefined -> fail
    assert m["base_vs_base"]["flip_rate"] == 1.0 and m["base_vs_base"]["decisive"] is None
    assert m["base_vs_base"]["pass"] is False and m["passed"] is False and m["failed_controls"] == ["base_vs_base"]
    # headroom: clean 0.6 vs mild 0.57 flips (gap 0.03), vs severe 0.2 is a clear win
    assert m["headroom"]["mild"]["flip_rate"] == 1.0 and m["headroom"]["severe"]["strict"] == 1.0
    # kappa pools every control's pairs, which both judges answered
    assert m["agreement"]["n"] == 16 and m["agreement"]["n_only_a"] == m["agreement"]["n_only_b"] == 0
    assert set(m["confidence"]) == {"eval", "train"} and m["confidence"]["eval"]["n_oracle"] == 16
    csv_lines = plot.read_text().splitlines()
    assert csv_lines[0].startswith("bin,gap_lo,gap_hi,gap_mid")
    # gaps: bvb 0.01 (4) + mild 0.03 (4) in [0, 0.1) all flip; severe 0.4 (4) in [0.1, 0.5); clear 0.8 (4) in [0.5, 1]
    assert [l.split(",")[0] for l in csv_lines[1:]] == ["0-0.1", "0.1-0.5", "0.5-1"]
    assert [b["n"] for b in m["flip_vs_gap"]["bins"]] == [8, 4, 4]
    assert [b["flip_rate"] for b in m["flip_vs_gap"]["bins"]] == [1.0, 0.0, 0.0]
    assert m["flip_vs_gap"]["correlation"]["r"] < 0

    before = met.read_bytes(), {p.name: p.read_bytes() for p in plots.iterdir()}
    ev2, tr2 = FakeJudge("eval@aaaaaaaaaaaa"), FakeJudge("train@bbbbbbbbbbbb", bias=-0.3)
    run_calibrate(ev2, tr2, root, out, met, plots, PARAMS, PROMPT, show_progress=False)
    assert ev2.queries == 0 and tr2.queries == 0
    assert (met.read_bytes(), {p.name: p.read_bytes() for p in plots.iterdir()}) == before
    again = calibration_metrics_from_dir(out, PARAMS)
    assert json.dumps(again, sort_keys=True) == json.dumps(read_json(met), sort_keys=True)


def _crafted_rows(pair_ps, judge_id="eval@x", prefix="c"):
    """Log rows from (p_xy, p_yx) per pair, one object per pair; x_oracle 1.0 > y_oracle 0.0 unless given."""
    rows = []
    ph = prompt_sha256(PROMPT)
    for i, item in enumerate(pair_ps):
        p_xy, p_yx, xo, yo = (*item, 1.0, 0.0) if len(item) == 2 else item
        pid = f"{prefix}:{i}"
        for order, p in (("xy", p_xy), ("yx", p_yx)):
            first, second = ("x.png", "y.png") if order == "xy" else ("y.png", "x.png")
            rows.append({"key": query_key(pid, order, judge_id, ph, first, second), "pair_id": pid,
                         "object_id": f"obj{i}", "order": order, "first": first, "second": second,
                         "first_sha256": first, "second_sha256": second, "judge_id": judge_id, "prompt_sha256": ph,
                         "p_first": p, "verdict": verdict_of(p), "x_candidate": f"x{i}", "y_candidate": f"y{i}",
                         "x_oracle": xo, "y_oracle": yo, "meta": {}})
    return rows


WIN, LOSS, FLIP = (0.9, 0.1), (0.1, 0.9), (0.9, 0.9)


def _calibrate(clear, bvb, params=PARAMS):
    eval_rows = {"clear_gap": _crafted_rows(clear, prefix="clear_gap"),
                 "base_vs_base": _crafted_rows(bvb, prefix="base_vs_base"),
                 "headroom_mild": _crafted_rows([WIN, FLIP], prefix="headroom_mild")}
    train_rows = {name: [dict(r, judge_id="train@y") for r in rows] for name, rows in eval_rows.items()}
    return calibration_metrics(eval_rows, train_rows, params)


def test_calibration_pass_fail_follows_the_thresholds():
    ok = _calibrate([WIN] * 9 + [FLIP], [WIN, WIN, LOSS, LOSS, FLIP])  # strict 0.9, decisive 0.5
    assert ok["clear_gap"]["strict"] == 0.9 and ok["clear_gap"]["pass"] is True
    assert ok["base_vs_base"]["decisive"] == 0.5 and ok["base_vs_base"]["pass"] is True
    assert ok["passed"] is True and ok["failed_controls"] == []
    assert ok["thresholds"] == {"clear_gap_min_strict": 0.83, "base_vs_base_decisive_range": [0.35, 0.65]}

    weak = _calibrate([WIN] * 8 + [FLIP, LOSS], [WIN, WIN, LOSS, LOSS])  # strict 0.8 < 0.83
    assert weak["clear_gap"]["strict"] == 0.8 and weak["clear_gap"]["pass"] is False
    assert weak["passed"] is False and weak["failed_controls"] == ["clear_gap"]

    biased = _calibrate([WIN] * 10, [WIN, WIN, WIN, LOSS])  # decisive 0.75 > 0.65
    assert biased["base_vs_base"]["decisive"] == 0.75 and biased["base_vs_base"]["pass"] is False
    assert biased["failed_controls"] == ["base_vs_base"]
    edge = _calibrate([WIN] * 10, [WIN] * 7 + [LOSS] * 13)  # decisive exactly 0.35: inside the closed range
    assert edge["base_vs_base"]["decisive"] == 0.35 and edge["base_vs_base"]["pass"] is True

    stricter = json.loads(json.dumps(PARAMS))
    stricter["calibrate"]["thresholds"]["clear_gap_min_strict"] = 0.95
    assert _calibrate([WIN] * 9 + [FLIP], [WIN, LOSS], stricter)["clear_gap"]["pass"] is False

    # kappa between judges over every control's pairs (10 + 5 + 2): identical verdicts -> 1
    assert ok["agreement"]["kappa"] == 1.0 and ok["agreement"]["n"] == 17
    # oracle: x is better in every crafted pair; consistent verdicts agree iff x won
    assert ok["clear_gap"]["judge_oracle_agreement"] == 1.0
    assert ok["base_vs_base"]["judge_oracle_agreement"] == 0.5


def test_calibration_rejects_bad_params_and_mixed_judges():
    bad = json.loads(json.dumps(PARAMS))
    bad["calibrate"]["thresholds"]["base_vs_base_decisive"] = [0.7, 0.3]
    with pytest.raises(ParamsError, match="base_vs_base_decisive"):
        _calibrate([WIN], [WIN, LOSS], bad)
    bad = json.loads(json.dumps(PARAMS))
    bad["calibrate"]["gap_bins"] = [0.0, 0.5, 0.2]
    with pytest.raises(ParamsError, match="gap_bins"):
        _calibrate([WIN], [WIN, LOSS], bad)
    mixed = {"clear_gap": _crafted_rows([WIN], prefix="clear_gap"),
             "base_vs_base": _crafted_rows([WIN], judge_id="other@z", prefix="base_vs_base")}
    with pytest.raises(ValueError, match="one judge"):
        calibration_metrics(mixed, {name: [dict(r, judge_id="train@y") for r in rows] for name, rows in mixed.items()},
                            PARAMS)
    one_control = {"clear_gap": mixed["clear_gap"], "base_vs_base": _crafted_rows([WIN], prefix="base_vs_base")}
    with pytest.raises(ValueError, match="both judge every control"):
        calibration_metrics(one_control, {"clear_gap": [dict(r, judge_id="train@y") for r in mixed["clear_gap"]]},
                            PARAMS)


def test_repo_params_blocks_are_valid():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert thresholds(params) == {"clear_gap_min_strict": 0.83, "base_vs_base_decisive_range": [0.35, 0.65]}
    assert params["labels"]["batch_size"] >= 1 and params["calibrate"]["batch_size"] >= 1


# --------------------------------------------------------------------------------------------
# flip rate vs oracle gap
# --------------------------------------------------------------------------------------------
def _rec(pid, obj, gap, flip):
    return {"pair_id": pid, "object_id": obj, "consistent": not flip,
            "x_oracle": gap, "y_oracle": None if gap is None else 0.0}  # exact gaps: edges are tested exactly


def test_flip_vs_gap_bins_hand_cases():
    recs = [_rec("a", "o1", 0.0, True), _rec("b", "o1", 0.05, True), _rec("c", "o2", 0.05, False),
            _rec("d", "o2", 0.1, False),   # on an edge: goes to the upper bin [0.1, 0.5)
            _rec("e", "o3", 1.0, False),   # the last edge is inside the last bin
            _rec("f", "o3", None, True),   # no oracle: counted, not binned
            _rec("g", "o4", 1.2, False)]   # beyond the last edge: counted, not binned
    table = flip_vs_gap(recs, [0.0, 0.1, 0.5, 1.0])
    assert [(b["bin"], b["n"], b["flips"]) for b in table["bins"]] == [("0-0.1", 3, 2), ("0.1-0.5", 1, 0),
                                                                       ("0.5-1", 1, 0)]
    assert table["bins"][0]["flip_rate"] == pytest.approx(2 / 3)
    assert table["bins"][0]["mean_gap"] == pytest.approx(0.1 / 3, abs=1e-6)
    assert table["n"] == 5 and table["n_missing_oracle"] == 1 and table["n_out_of_range"] == 1
    lo, hi = table["bins"][0]["flip_rate_wilson_ci"]
    assert lo < 2 / 3 < hi
    empty = flip_vs_gap(recs[:1], [0.0, 0.1, 1.0])["bins"][1]
    assert empty["n"] == 0 and empty["flip_rate"] is None and empty["flip_rate_wilson_ci"] == [None, None]

    binned = [r for r in recs if r["pair_id"] not in ("f",)]
    corr = flip_gap_correlation(binned, n_boot=200, seed=0)
    gaps = [abs(r["x_oracle"] - r["y_oracle"]) for r in binned]
    flips = [float(not r["consistent"]) for r in binned]
    assert corr["r"] == pytest.approx(np.corrcoef(flips, gaps)[0, 1], abs=1e-6) and corr["n"] == 6
    with pytest.raises(ValueError, match="increasing"):
        flip_vs_gap(recs, [0.0, 0.0, 1.0])


def test_kept_pairs_refuses_a_log_from_another_manifest(train_manifest):
    _, rows = train_manifest
    rec = {"pair_id": "high_low:zz:a|b", "object_id": "zz", "consistent": True, "winner": "x", "soft": 0.8,
           "x_candidate": "a", "y_candidate": "b"}
    with pytest.raises(ValueError, match="not in the montage manifest"):
        kept_pairs([rec], rows)


# --------------------------------------------------------------------------------------------
# through the real hf backend, on tiny random-weight judges
# --------------------------------------------------------------------------------------------
class CountingJudge:
    def __init__(self, judge):
        self.judge, self.judge_id, self.queries = judge, judge.judge_id, 0

    def p_first(self, pairs, prompt):
        self.queries += len(pairs)
        return self.judge.p_first(pairs, prompt)


def test_stages_through_tiny_hf_judges(tmp_path, train_manifest):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from judge3d.judges.hf import HFJudge
    from judge3d.judges.tiny import TinyLMSize, TinySizes, TinyVisionSize, build_tiny_internvl, build_tiny_qwen25vl

    small = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                      vision=TinyVisionSize(hidden=32, depth=2, heads=2, intermediate=64, patch=14), image_size=56)
    build_tiny_qwen25vl(tmp_path / "judges/train", small, seed=1)
    build_tiny_internvl(tmp_path / "judges/eval", small, seed=2)
    train = CountingJudge(HFJudge.load(tmp_path / "judges/train", batch_size=4))
    evalj = CountingJudge(HFJudge.load(tmp_path / "judges/eval", batch_size=4))

    manifest, _ = train_manifest
    out, met = tmp_path / "labels", tmp_path / "labels.json"
    m = run_judge_train_labels(train, manifest, out, met, PARAMS, PROMPT, show_progress=False)
    assert train.queries == 22 and m["judge_id"] == train.judge_id and m["n"] == 5 and m["iid_n"] == 6
    log = read_jsonl(out / "verdicts.jsonl")
    assert all(0.0 < r["p_first"] < 1.0 for r in log)
    kept = read_jsonl(out / "train_pairs.jsonl")
    consistent = [r for r in pair_verdicts(log) if r["consistent"]]
    assert len(kept) == m["pairs_kept"] == len(consistent)
    before = met.read_bytes()
    run_judge_train_labels(train, manifest, out, met, PARAMS, PROMPT, show_progress=False)
    assert train.queries == 22 and met.read_bytes() == before

    root, _, _ = _heldout(tmp_path, n=2)
    cal_met = tmp_path / "cal.json"
    c = run_calibrate(evalj, train, root, tmp_path / "cal", cal_met, tmp_path / "plots", PARAMS, PROMPT,
                      show_progress=False)
    assert evalj.queries == 2 * 2 * 4 and train.queries == 22 + 2 * 2 * 4  # both judges answer every control
    assert c["eval_judge_id"] == evalj.judge_id != c["train_judge_id"] == train.judge_id
    assert isinstance(c["passed"], bool) and c["flip_vs_gap"]["n"] == 8


# --------------------------------------------------------------------------------------------
# the reference-aware eval judge (ablation)
# --------------------------------------------------------------------------------------------
REF_PROMPT = "Input: <image0> A: <image1> B: <image2> Better: A or B?"


class FakeReferenceJudge(FakeJudge):
    """Answers (reference, first, second) triples only, from the two montages' qualities."""

    def p_first(self, triples, prompt):
        assert all(len(t) == 3 for t in triples), "a reference-aware judge gets the reference first"
        self.references = {str(t[0]) for t in triples}
        return super().p_first([(a, b) for _, a, b in triples], prompt)


def test_calibrate_with_a_reference_aware_eval_judge(tmp_path):
    root, _, _ = _heldout(tmp_path, bvb_gap=0.01)
    image = tmp_path / "input.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(image)
    objects = {r["object_id"] for p in (root / "heldout_clean").glob("manifest.jsonl") for r in read_jsonl(p)}
    references = {o: str(image) for o in objects}
    out, met, plots = tmp_path / "cal", tmp_path / "metrics/calibration.json", tmp_path / "metrics/plots"
    ev, tr = FakeReferenceJudge("eval@aaaaaaaaaaaa"), FakeJudge("train@bbbbbbbbbbbb", bias=-0.3)
    m = run_calibrate(ev, tr, root, out, met, plots, PARAMS, PROMPT, show_progress=False,
                      eval_prompt=REF_PROMPT, eval_references=references)
    assert ev.references == {str(image)} and ev.queries == tr.queries == 2 * 4 * 4
    assert m["eval_reference_aware"] is True and m["prompt_sha256"] != m["train_prompt_sha256"]
    rows = read_jsonl(out / "eval_clear_gap.jsonl")
    assert all(r["reference"] == image.as_posix() and r["reference_sha256"] for r in rows)
    assert not any("reference" in r for r in read_jsonl(out / "train_clear_gap.jsonl"))
    # verify's path: the logs alone give the same metrics (the two prompt hashes from the metrics file)
    again = calibration_metrics_from_dir(out, PARAMS, prompt_hash=m["prompt_sha256"],
                                         train_prompt_hash=m["train_prompt_sha256"])
    assert again == m


def test_reference_free_judges_must_share_one_prompt(tmp_path):
    root, _, _ = _heldout(tmp_path, bvb_gap=0.01)
    with pytest.raises(ValueError, match="apples and pears"):
        run_calibrate(FakeJudge("eval@aaaaaaaaaaaa"), FakeJudge("train@bbbbbbbbbbbb"), root, tmp_path / "cal",
                      tmp_path / "c.json", tmp_path / "plots", PARAMS, PROMPT, show_progress=False,
                      eval_prompt="<image1> <image2> Which one is better, A or B?")


def test_judge_prompt_follows_the_reference_switch():
    from judge3d.core.config import ParamsError
    from judge3d.judges.references import judge_prompt, with_references
    from judge3d.judges.protocol import Pair

    params = {"judge": {"prompt": PROMPT, "reference_prompt": REF_PROMPT},
              "judges": {"eval": {"reference": False}, "train": {}}}
    assert judge_prompt(params, "eval") == PROMPT and judge_prompt(params, "train") == PROMPT
    params["judges"]["eval"]["reference"] = True
    assert judge_prompt(params, "eval") == REF_PROMPT and judge_prompt(params, "train") == PROMPT
    params["judge"]["reference_prompt"] = PROMPT  # no <image0>: the switch and the prompt disagree
    with pytest.raises(ParamsError, match="judge.reference_prompt shows 2 images"):
        judge_prompt(params, "eval")
    params["judges"]["train"]["reference"] = True
    with pytest.raises(ParamsError, match="only the evaluation judge"):
        judge_prompt(params, "train")
    with pytest.raises(ValueError, match=r"no input image for object\(s\) \['b'\]"):
        with_references([Pair("p1", "a", "x.png", "y.png"), Pair("p2", "b", "x.png", "y.png")], {"a": "in.png"})
