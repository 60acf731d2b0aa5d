import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge3d.core import stats
from judge3d.core.io import read_jsonl
from judge3d.judges.protocol import (Pair, aggregate, judge_agreement, pair_verdicts, queries_for, run_pairs,
                                     summarize)
from judge3d.judges.verdict_log import check_row, prompt_sha256, read_log, verdict_of

PROMPT = "Which 3D shape is better? Answer A or B."


# ---------------------------------------------------------------- hand-built log rows


def rows_for(specs, judge_id="judge-a", prompt_hash="p0"):
    """specs: (pair_id, object_id, p_xy, p_yx[, x_oracle, y_oracle]) -> the two query rows per pair."""
    rows = []
    for spec in specs:
        pid, oid, p_xy, p_yx = spec[:4]
        xo, yo = (spec[4], spec[5]) if len(spec) > 4 else (None, None)
        for order, p in (("xy", p_xy), ("yx", p_yx)):
            rows.append({"key": f"{pid}-{order}", "pair_id": pid, "object_id": oid, "order": order,
                         "judge_id": judge_id, "prompt_sha256": prompt_hash, "p_first": p,
                         "verdict": verdict_of(p), "x_oracle": xo, "y_oracle": yo})
    return rows


def agg(specs, n_boot=500):
    rows = rows_for(specs)
    return aggregate(pair_verdicts(rows), rows, n_boot=n_boot, seed=0)


def test_queries_for_orders():
    pair = Pair("p1", "o1", "x.png", "y.png")
    assert queries_for(pair) == [("xy", "x.png", "y.png"), ("yx", "y.png", "x.png")]


def test_swap_logic_maps_second_order_back():
    rows = rows_for([("win", "o", 0.9, 0.2), ("loss", "o", 0.3, 0.7), ("flip_first", "o", 0.8, 0.6),
                     ("flip_second", "o", 0.2, 0.4), ("tie", "o", 0.5, 0.5), ("half_tie", "o", 0.5, 0.1)])
    rec = {r["pair_id"]: r for r in pair_verdicts(rows)}
    assert (rec["win"]["v1"], rec["win"]["v2"], rec["win"]["winner"]) == ("x", "x", "x")
    assert (rec["loss"]["v1"], rec["loss"]["v2"], rec["loss"]["winner"]) == ("y", "y", "y")
    assert (rec["flip_first"]["v1"], rec["flip_first"]["v2"]) == ("x", "y")  # always answers "first"
    assert (rec["flip_second"]["v1"], rec["flip_second"]["v2"]) == ("y", "x")  # always answers "second"
    assert not rec["flip_first"]["consistent"] and rec["flip_first"]["winner"] is None
    # a tie in both orders is v1 == v2 but not a consistent verdict
    assert rec["tie"]["v1"] == rec["tie"]["v2"] == "tie" and not rec["tie"]["consistent"]
    assert rec["half_tie"]["v2"] == "x" and not rec["half_tie"]["consistent"]
    assert rec["win"]["soft"] == pytest.approx((0.9 + 0.8) / 2)
    assert rec["flip_first"]["soft"] == pytest.approx((0.8 + 0.4) / 2)


def test_aggregate_all_win():
    a = agg([(f"p{i}", f"o{i}", 0.9, 0.2) for i in range(4)])
    assert (a["n"], a["W"], a["L"], a["F"]) == (4, 4, 0, 0)
    assert a["strict"] == a["tie_adjusted"] == a["decisive"] == 1.0
    assert a["flip_rate"] == 0.0
    assert a["prefer_first_rate"] == 0.5  # 'first' in xy, 'second' in yx
    assert a["mean_soft"] == pytest.approx(0.85)
    assert a["strict_boot_ci"] == [1.0, 1.0] and a["flip_rate_ci"] == [0.0, 0.0]
    assert a["strict_wilson_ci"] == [stats.wilson_interval(4, 4)[0], 1.0]
    assert a["decisive_undefined"] is False


def test_aggregate_all_loss():
    a = agg([(f"p{i}", f"o{i}", 0.3, 0.7) for i in range(4)])
    assert (a["W"], a["L"], a["F"]) == (0, 4, 0)
    assert a["strict"] == a["tie_adjusted"] == a["decisive"] == a["flip_rate"] == 0.0
    assert a["mean_soft"] == pytest.approx(0.3)
    assert a["strict_wilson_ci"][0] == 0.0


def test_aggregate_all_flip_has_undefined_decisive():
    a = agg([(f"p{i}", f"o{i}", 0.8, 0.6) for i in range(4)])
    assert (a["W"], a["L"], a["F"]) == (0, 0, 4)
    assert a["strict"] == 0.0 and a["tie_adjusted"] == 0.5 and a["flip_rate"] == 1.0
    assert a["decisive"] is None and a["decisive_ci"] == [None, None] and a["decisive_undefined"] is True
    assert a["prefer_first_rate"] == 1.0
    assert a["mean_soft"] == pytest.approx(0.6)


def test_aggregate_ties_count_as_flips_and_not_first():
    a = agg([("t1", "o1", 0.5, 0.5), ("t2", "o2", 0.5, 0.3), ("w", "o3", 0.7, 0.1)])
    assert (a["W"], a["L"], a["F"]) == (1, 0, 2)
    assert a["tie_adjusted"] == pytest.approx((1 + 2 / 2) / 3, abs=1e-6)
    # queries answered 'first': only w/xy; ties are not 'first'
    assert a["prefer_first_rate"] == pytest.approx(1 / 6, abs=1e-6)


def test_aggregate_mixed_hand_computed():
    specs = [("a1", "A", 0.9, 0.1, 0.8, 0.5),   # W, oracle agrees
             ("a2", "A", 0.6, 0.45, 0.4, 0.7),  # W, oracle disagrees
             ("b1", "B", 0.2, 0.9, 0.3, 0.6),   # L, oracle agrees
             ("b2", "B", 0.7, 0.8, 0.9, 0.1),   # F (first both times), excluded from oracle agreement
             ("c1", "C", 0.3, 0.2, 0.5, 0.5)]   # F (second both times)
    a = agg(specs, n_boot=2000)
    assert (a["n"], a["W"], a["L"], a["F"], a["n_objects"], a["n_queries"]) == (5, 2, 1, 2, 3, 10)
    assert a["strict"] == 0.4
    assert a["tie_adjusted"] == 0.6
    assert a["decisive"] == pytest.approx(2 / 3, abs=1e-6)
    assert a["flip_rate"] == 0.4
    # 'first' answers: a1 xy, a2 xy, b1 yx, b2 xy, b2 yx -> 5 of 10
    assert a["prefer_first_rate"] == 0.5
    softs = [(0.9 + 0.9) / 2, (0.6 + 0.55) / 2, (0.2 + 0.1) / 2, (0.7 + 0.2) / 2, (0.3 + 0.8) / 2]
    assert a["mean_soft"] == pytest.approx(np.mean(softs), abs=1e-6)
    assert a["judge_oracle_agreement"] == pytest.approx(2 / 3, abs=1e-6) and a["n_oracle"] == 3
    assert a["strict_wilson_ci"] == list(stats.wilson_interval(2, 5))
    for name, ci_name in [("strict", "strict_boot_ci"), ("tie_adjusted", "tie_adjusted_ci"),
                          ("flip_rate", "flip_rate_ci"), ("mean_soft", "mean_soft_ci")]:
        lo, hi = a[ci_name]
        assert lo <= a[name] <= hi, name
    # bootstrap is over objects: per-object (W, pairs) = A (2, 2), B (0, 2), C (0, 1)
    expected = stats.bootstrap_ci([np.array([[2.0, 2.0]]), np.array([[0.0, 2.0]]), np.array([[0.0, 1.0]])],
                                  stats.ratio_of(0, 1), n_boot=2000, seed=0)
    assert a["strict_boot_ci"] == list(expected)


def test_oracle_ties_and_missing_are_counted_not_scored():
    a = agg([("p1", "o1", 0.9, 0.1, 0.5, 0.5), ("p2", "o2", 0.9, 0.1), ("p3", "o3", 0.9, 0.1, 0.9, 0.2)])
    assert a["n_oracle"] == 1 and a["oracle_ties"] == 1 and a["oracle_missing"] == 1
    assert a["judge_oracle_agreement"] == 1.0
    b = agg([("p1", "o1", 0.9, 0.1)])
    assert b["judge_oracle_agreement"] is None and b["judge_oracle_agreement_ci"] == [None, None]


def test_aggregate_is_json_stable_and_order_independent():
    specs = [(f"p{i}", f"o{i % 5}", 0.1 + 0.8 * ((i * 7) % 10) / 10, 0.05 + 0.9 * ((i * 3) % 10) / 10)
             for i in range(20)]
    rows = rows_for(specs)
    a = summarize(rows, n_boot=300)
    b = summarize(list(reversed(rows)), n_boot=300)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_pair_verdicts_rejects_incomplete_or_mixed_rows():
    rows = rows_for([("p1", "o1", 0.9, 0.1)])
    with pytest.raises(ValueError, match="no answer for order"):
        pair_verdicts(rows[:1])
    mixed = rows + rows_for([("p2", "o1", 0.9, 0.1)], judge_id="judge-b")
    with pytest.raises(ValueError, match="mix"):
        pair_verdicts(mixed)
    with pytest.raises(ValueError, match="do not match"):
        aggregate(pair_verdicts(rows), rows[:1])


def test_judge_agreement_kappa_hand_computed():
    # judge a: x x y flip ; judge b: x y y flip  -> po = 3/4
    # marginals a: x 2, y 1, flip 1 ; b: x 1, y 2, flip 1 -> pe = (2*1 + 1*2 + 1*1) / 16 = 5/16
    # kappa = (12/16 - 5/16) / (11/16) = 7/11
    ra = pair_verdicts(rows_for([("p1", "o1", 0.9, 0.1), ("p2", "o1", 0.9, 0.1), ("p3", "o2", 0.1, 0.9),
                                 ("p4", "o2", 0.9, 0.9)]))
    rb = pair_verdicts(rows_for([("p1", "o1", 0.9, 0.1), ("p2", "o1", 0.1, 0.9), ("p3", "o2", 0.1, 0.9),
                                 ("p4", "o2", 0.1, 0.1), ("p5", "o3", 0.9, 0.1)], judge_id="judge-b"))
    k = judge_agreement(ra, rb, n_boot=500)
    assert k["kappa"] == pytest.approx(7 / 11, abs=1e-6)
    assert k["n"] == 4 and k["n_only_b"] == 1 and k["observed_agreement"] == 0.75
    assert k["kappa_ci"][0] <= k["kappa"] <= k["kappa_ci"][1]


# ---------------------------------------------------------------- run_pairs with a fake backend


class FakeBackend:
    """Deterministic judge of image content: prefers the brighter image, with a position term of its
    own (so some near pairs flip). Records every query it is asked."""

    def __init__(self, judge_id="fake-judge", fail_after_calls=None):
        self.judge_id = judge_id
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.batches = []

    def p_first(self, pairs, prompt):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.batches.append([(Path(a).name, Path(b).name) for a, b in pairs])
        out = []
        for a, b in pairs:
            ma = np.asarray(Image.open(a), dtype=np.float64).mean()
            mb = np.asarray(Image.open(b), dtype=np.float64).mean()
            out.append(1.0 / (1.0 + np.exp(-(ma - mb) / 10.0 - 0.4)))
        return np.asarray(out, dtype=np.float32)

    @property
    def n_queries(self):
        return sum(len(b) for b in self.batches)


def make_world(tmp_path, n_pairs=6):
    img_dir = tmp_path / "montages"
    img_dir.mkdir()
    pairs = []
    for i in range(n_pairs):
        paths = []
        for side, value in (("x", 120 + 9 * i), ("y", 150 - 4 * i)):
            path = img_dir / f"{i}_{side}.png"
            Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
            paths.append(str(path))
        pairs.append(Pair(f"pair{i:02d}", f"obj{i // 2}", paths[0], paths[1], x_candidate=f"arm{i}",
                          y_candidate=f"base{i}", x_oracle=float(i), y_oracle=2.5, meta={"regime": "clean"}))
    return pairs


def test_run_pairs_logs_every_query_and_batches_pairs(tmp_path):
    pairs = make_world(tmp_path)
    log = tmp_path / "verdicts.jsonl"
    backend = FakeBackend()
    rows = run_pairs(backend, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert len(rows) == 12 and read_jsonl(log) == rows
    assert [(r["pair_id"], r["order"]) for r in rows[:2]] == [("pair00", "xy"), ("pair00", "yx")]
    assert rows[1]["first"] == pairs[0].y and rows[1]["second"] == pairs[0].x
    assert all(r["prompt_sha256"] == prompt_sha256(PROMPT) and r["judge_id"] == "fake-judge" for r in rows)
    assert rows[0]["x_oracle"] == 0.0 and rows[0]["meta"] == {"regime": "clean"}
    assert all(check_row(r, check_images=True) == [] for r in rows)
    # both orders of each pair share a batch
    assert backend.batches[0] == [("0_x.png", "0_y.png"), ("0_y.png", "0_x.png"),
                                  ("1_x.png", "1_y.png"), ("1_y.png", "1_x.png")]
    backend3 = FakeBackend()
    run_pairs(backend3, pairs, tmp_path / "odd.jsonl", PROMPT, batch_size=3, show_progress=False)
    assert all(len(b) == 2 and b[0] == b[1][::-1] for b in backend3.batches)
    a = summarize(rows, n_boot=200)
    assert a["W"] + a["L"] + a["F"] == 6 and a["F"] > 0 and a["W"] > 0 and a["L"] > 0


def test_rerun_asks_nothing_and_gives_identical_aggregates(tmp_path):
    pairs = make_world(tmp_path)
    log = tmp_path / "verdicts.jsonl"
    first = run_pairs(FakeBackend(), pairs, log, PROMPT, batch_size=4, show_progress=False)
    before = log.read_bytes()
    again = FakeBackend()
    second = run_pairs(again, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert again.n_queries == 0 and second == first and log.read_bytes() == before
    assert summarize(second) == summarize(first) == summarize(read_log(log))


def test_resume_after_truncated_log(tmp_path):
    pairs = make_world(tmp_path)
    ref_log = tmp_path / "ref.jsonl"
    ref = run_pairs(FakeBackend(), pairs, ref_log, PROMPT, batch_size=4, show_progress=False)
    lines = ref_log.read_bytes().splitlines(keepends=True)
    log = tmp_path / "verdicts.jsonl"
    log.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # killed mid-row 6
    resumed_backend = FakeBackend()
    resumed = run_pairs(resumed_backend, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert resumed_backend.n_queries == 12 - 5
    assert resumed == ref
    assert summarize(resumed, n_boot=500) == summarize(ref, n_boot=500)
    assert len(read_jsonl(log)) == 12  # the partial row was dropped, not kept beside its redo


def test_resume_after_crash_after_k_queries(tmp_path):
    pairs = make_world(tmp_path)
    ref = run_pairs(FakeBackend(), pairs, tmp_path / "ref.jsonl", PROMPT, batch_size=4, show_progress=False)
    log = tmp_path / "verdicts.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pairs(FakeBackend(fail_after_calls=2), pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert len(read_jsonl(log)) == 8
    resumed_backend = FakeBackend()
    resumed = run_pairs(resumed_backend, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert resumed_backend.n_queries == 4
    assert resumed_backend.batches[0] == [("4_x.png", "4_y.png"), ("4_y.png", "4_x.png"),
                                          ("5_x.png", "5_y.png"), ("5_y.png", "5_x.png")]
    assert resumed == ref and summarize(resumed) == summarize(ref)


KILL_SCRIPT = """
import sys, time
import numpy as np
from judge3d.judges.protocol import Pair, run_pairs
pairs = [Pair(f"p{i}", f"o{i}", sys.argv[2], sys.argv[3]) for i in range(int(sys.argv[4]))]
class Slow:
    judge_id = "slow"
    def p_first(self, batch, prompt):
        time.sleep(0.05)
        return np.array([0.7 if a == sys.argv[2] else 0.4 for a, _ in batch])
run_pairs(Slow(), pairs, sys.argv[1], "prompt", batch_size=2, show_progress=False)
"""


def test_kill_9_mid_run_loses_at_most_the_batch_in_flight(tmp_path):
    x, y = tmp_path / "x.png", tmp_path / "y.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(x)
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(y)
    log = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(log), str(x), str(y), "400"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_bytes().count(b"\n") < 6):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = read_log(log)
    assert 6 <= len(logged) < 800
    assert all(check_row(r) == [] for r in logged)
    n_logged = len(logged)

    class Counting:
        judge_id = "slow"
        asked = 0

        def p_first(self, batch, prompt):
            Counting.asked += len(batch)
            return np.array([0.7 if a == str(x) else 0.4 for a, _ in batch])

    pairs = [Pair(f"p{i}", f"o{i}", str(x), str(y)) for i in range(400)]
    rows = run_pairs(Counting(), pairs, log, "prompt", batch_size=2, show_progress=False)
    assert Counting.asked == 800 - n_logged
    assert summarize(rows, n_boot=100)["W"] == 400


def test_other_judge_prompt_or_image_is_not_reused(tmp_path):
    pairs = make_world(tmp_path, n_pairs=3)
    log = tmp_path / "verdicts.jsonl"
    run_pairs(FakeBackend("judge-a"), pairs, log, PROMPT, batch_size=4, show_progress=False)

    other_judge = FakeBackend("judge-b")
    rows_b = run_pairs(other_judge, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert other_judge.n_queries == 6 and {r["judge_id"] for r in rows_b} == {"judge-b"}

    other_prompt = FakeBackend("judge-a")
    run_pairs(other_prompt, pairs, log, PROMPT + " Think of the geometry.", batch_size=4, show_progress=False)
    assert other_prompt.n_queries == 6

    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(pairs[1].x)  # a re-rendered montage
    changed = FakeBackend("judge-a")
    run_pairs(changed, pairs, log, PROMPT, batch_size=4, show_progress=False)
    assert changed.n_queries == 2 and {q for b in changed.batches for q in b} == {("1_x.png", "1_y.png"),
                                                                                ("1_y.png", "1_x.png")}
    assert len(read_log(log, judge_id="judge-b")) == 6
    assert len(read_log(log, judge_id="judge-a", prompt_hash=prompt_sha256(PROMPT))) == 8  # 6 + 2 for new image


def test_changed_metadata_restamps_without_asking(tmp_path):
    pairs = make_world(tmp_path, n_pairs=2)
    log = tmp_path / "verdicts.jsonl"
    first = run_pairs(FakeBackend(), pairs, log, PROMPT, batch_size=4, show_progress=False)
    updated = [Pair(**{**p.__dict__, "y_oracle": 9.0}) for p in pairs]
    backend = FakeBackend()
    rows = run_pairs(backend, updated, log, PROMPT, batch_size=4, show_progress=False)
    assert backend.n_queries == 0
    assert all(r["y_oracle"] == 9.0 for r in rows)
    assert [r["p_first"] for r in rows] == [r["p_first"] for r in first]
    assert read_log(log) == rows  # the latest row per key wins


def test_bad_inputs_fail_clearly(tmp_path):
    pairs = make_world(tmp_path, n_pairs=2)
    log = tmp_path / "verdicts.jsonl"
    missing = [Pair("p9", "o9", str(tmp_path / "nope.png"), pairs[0].y)]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run_pairs(FakeBackend(), missing, log, PROMPT, batch_size=2, show_progress=False)
    with pytest.raises(ValueError, match="twice"):
        run_pairs(FakeBackend(), [pairs[0], pairs[0]], log, PROMPT, batch_size=2, show_progress=False)

    class NanJudge(FakeBackend):
        def p_first(self, batch, prompt):
            return np.full(len(batch), np.nan)

    with pytest.raises(ValueError, match="probability"):
        run_pairs(NanJudge(), pairs, log, PROMPT, batch_size=2, show_progress=False)

    class ShortJudge(FakeBackend):
        def p_first(self, batch, prompt):
            return np.full(len(batch) - 1, 0.7)

    with pytest.raises(ValueError, match="probabilities for"):
        run_pairs(ShortJudge(), pairs, log, PROMPT, batch_size=2, show_progress=False)
    assert not log.exists() or read_jsonl(log) == []


def test_check_row_catches_tampering(tmp_path):
    pairs = make_world(tmp_path, n_pairs=1)
    rows = run_pairs(FakeBackend(), pairs, tmp_path / "v.jsonl", PROMPT, batch_size=2, show_progress=False)
    flipped = {**rows[0], "verdict": "second" if rows[0]["verdict"] == "first" else "first"}
    assert any("does not follow" in p for p in check_row(flipped))
    other_judge = {**rows[0], "judge_id": "someone-else"}
    assert any("key" in p for p in check_row(other_judge))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pairs[0].x)
    assert any("changed" in p for p in check_row(rows[0], check_images=True))


# ---------------------------------------------------------------- reference-aware judging (<image0>)
REF_PROMPT = "Input: <image0> A: <image1> B: <image2> Which 3D shape is better? Answer A or B."


class RefBackend(FakeBackend):
    """Prefers the montage whose brightness is closer to the reference's; records every triple."""

    judge_id = "fake-ref-judge"

    def __init__(self, fail_after_calls=None):
        super().__init__(self.judge_id, fail_after_calls)

    def p_first(self, queries, prompt):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.batches.append([tuple(Path(p).name for p in q) for q in queries])
        mean = {p: np.asarray(Image.open(p), dtype=np.float64).mean() for q in queries for p in q}
        return np.array([1.0 / (1.0 + np.exp((abs(mean[a] - mean[r]) - abs(mean[b] - mean[r])) / 10.0))
                         for r, a, b in queries])


def with_references(tmp_path, pairs):
    ref_dir = tmp_path / "inputs"
    ref_dir.mkdir()
    out = []
    for pair in pairs:
        path = ref_dir / f"{pair.object_id}.png"
        if not path.exists():
            Image.fromarray(np.full((8, 8, 3), 100 + 20 * len(out), dtype=np.uint8)).save(path)
        out.append(Pair(**{**pair.__dict__, "reference": str(path)}))
    return out


def test_reference_pairs_log_the_reference_and_resume(tmp_path):
    from judge3d.core.io import file_sha256
    from judge3d.core.resume import AnswerCache
    from judge3d.judges.verdict_log import query_key

    pairs = with_references(tmp_path, make_world(tmp_path, n_pairs=4))
    log = tmp_path / "verdicts.jsonl"
    backend = RefBackend()
    rows = run_pairs(backend, pairs, log, REF_PROMPT, batch_size=4, show_progress=False)
    assert len(rows) == 8 and read_jsonl(log) == rows
    # the reference comes first in both orders; only the montages swap, and a pair's orders share a batch
    assert backend.batches[0] == [("obj0.png", "0_x.png", "0_y.png"), ("obj0.png", "0_y.png", "0_x.png"),
                                  ("obj0.png", "1_x.png", "1_y.png"), ("obj0.png", "1_y.png", "1_x.png")]
    for row, pair in zip(rows, [p for p in pairs for _ in range(2)]):
        assert row["reference"] == Path(pair.reference).as_posix()
        assert row["reference_sha256"] == file_sha256(pair.reference)
        assert check_row(row, check_images=True) == []
    r = rows[0]
    plain = query_key(r["pair_id"], r["order"], r["judge_id"], r["prompt_sha256"], r["first_sha256"], r["second_sha256"])
    assert r["key"] != plain  # the same query without the reference is another query
    assert r["key"] == query_key(r["pair_id"], r["order"], r["judge_id"], r["prompt_sha256"], r["first_sha256"],
                                 r["second_sha256"], reference_sha=r["reference_sha256"])
    assert summarize(rows, n_boot=100) == summarize(read_log(log), n_boot=100)

    again = RefBackend()  # everything logged: nothing asked
    assert run_pairs(again, pairs, log, REF_PROMPT, batch_size=4, show_progress=False) == rows
    assert again.n_queries == 0

    # killed after one batch; the stage's log deleted (as dvc repro does): the resume cache answers it
    cache = AnswerCache(tmp_path / "cache")
    killed = tmp_path / "killed.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pairs(RefBackend(fail_after_calls=1), pairs, killed, REF_PROMPT, batch_size=4, show_progress=False,
                  answer_cache=cache)
    killed.unlink()
    resumed_backend = RefBackend()
    resumed = run_pairs(resumed_backend, pairs, killed, REF_PROMPT, batch_size=4, show_progress=False,
                        answer_cache=cache)
    assert resumed == rows and resumed_backend.n_queries == 4

    # a changed input image is a new query for its object's pairs only
    Image.fromarray(np.full((8, 8, 3), 3, dtype=np.uint8)).save(pairs[0].reference)
    assert any("reference image" in p and "changed" in p for p in check_row(rows[0], check_images=True))
    changed = RefBackend()
    run_pairs(changed, pairs, log, REF_PROMPT, batch_size=4, show_progress=False)
    assert changed.n_queries == 4 and {q[0] for b in changed.batches for q in b} == {"obj0.png"}


def test_reference_and_prompt_must_agree(tmp_path):
    plain = make_world(tmp_path, n_pairs=2)
    pairs = with_references(tmp_path, plain)
    log = tmp_path / "verdicts.jsonl"
    with pytest.raises(ValueError, match=r"pair pair00: the prompt shows a reference image \(<image0>\) but the pair "
                                         "has none"):
        run_pairs(RefBackend(), plain, log, REF_PROMPT, batch_size=2, show_progress=False)
    with pytest.raises(ValueError, match="pair pair01: the pair has a reference image .* no <image0> slot"):
        run_pairs(FakeBackend(), [plain[0], pairs[1]], log, PROMPT, batch_size=2, show_progress=False)
    gone = [Pair(**{**pairs[0].__dict__, "reference": str(tmp_path / "no_input.png")})]
    with pytest.raises(FileNotFoundError, match="pair pair00: reference image .*no_input.png not found"):
        run_pairs(RefBackend(), gone, log, REF_PROMPT, batch_size=2, show_progress=False)
    with pytest.raises(ValueError, match="reference slot <image0>"):
        run_pairs(RefBackend(), pairs, log, "A: <image1> <image0> B: <image2>", batch_size=2, show_progress=False)
    assert not log.exists() or read_jsonl(log) == []


def test_protocol_imports_no_model_stack():
    """The protocol, the log and the slot grammar stay usable (verify, the report) without torch."""
    code = ("import sys, judge3d.judges.protocol, judge3d.judges.slots, judge3d.judges.verdict_log; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
