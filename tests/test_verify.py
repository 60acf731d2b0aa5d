"""`judge3d verify`: recomputes metrics/ and the report tables from raw logs; catches tampering."""
from __future__ import annotations

import json
import shutil

import pytest

from judge3d.cli import main as cli_main
from judge3d.core.io import read_json, write_json
from judge3d.pipeline.verify import diff_values, verify_repo
from report_fixture import build_repo, run_stages


@pytest.fixture(scope="module")
def clean_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "repo"
    params = build_repo(root, arm_gain={"repair_severe": 0.3}, diverged=("dpo_strong",))
    run_stages(root, params)
    return root


@pytest.fixture
def repo(clean_repo, tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(clean_repo, dst)
    return dst


def _rewrite_row(path, index, edit):
    lines = path.read_text().splitlines()
    row = json.loads(lines[index])
    edit(row)
    lines[index] = json.dumps(row, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def test_untampered_repo_verifies(clean_repo, capsys):
    assert verify_repo(clean_repo) == []
    assert cli_main(["verify", "--root", str(clean_repo)]) == 0
    assert "every number in metrics/ matches" in capsys.readouterr().out


def test_tampered_metric_is_named(repo, capsys):
    path = repo / "metrics/arms/repair_severe.json"
    m = read_json(path)
    true_strict = m["strict"]
    m["strict"] = 0.9
    write_json(path, m)
    lines = verify_repo(repo)
    assert lines == [f"metrics/arms/repair_severe.json: strict: expected {true_strict!r}, found 0.9"]
    assert cli_main(["verify", "--root", str(repo)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH metrics/arms/repair_severe.json: strict" in out and "1 mismatch" in out


def test_tampered_nested_metric_and_labels(repo):
    path = repo / "metrics/arms/dpo.json"
    m = read_json(path)
    m["geom"]["score"]["delta_ci"][1] = 0.5
    write_json(path, m)
    labels = read_json(repo / "metrics/labels.json")
    labels["iid_flip_rate"] = 0.94  # the seed's number, pasted over the measured one
    write_json(repo / "metrics/labels.json", labels)
    lines = verify_repo(repo)
    assert any(l.startswith("metrics/arms/dpo.json: geom.score.delta_ci[1]: expected") for l in lines)
    assert any(l.startswith("metrics/labels.json: iid_flip_rate: expected") for l in lines)


def test_tampered_verdict_row_is_caught(repo):
    log = repo / "data/evals/dpo/verdicts.jsonl"
    _rewrite_row(log, 0, lambda r: r.update(verdict="second" if r["verdict"] == "first" else "first"))
    lines = verify_repo(repo)
    assert any(l.startswith("data/evals/dpo/verdicts.jsonl: row 1") and "does not follow from p_first" in l
               for l in lines)
    # the arm's metrics can no longer be recomputed from a log that fails its own checks
    assert any(l.startswith("metrics/arms/dpo.json: cannot recompute") for l in lines)


def test_consistently_edited_verdict_changes_recomputed_metrics(repo):
    # p_first and verdict edited together pass the row check, but the metrics no longer follow
    log = repo / "data/evals/sft_best/verdicts.jsonl"
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    target = next(i for i, r in enumerate(rows) if r["order"] == "xy" and r["verdict"] == "second")
    _rewrite_row(log, target, lambda r: r.update(p_first=0.99, verdict="first"))
    yx = next(i for i, r in enumerate(rows) if r["pair_id"] == rows[target]["pair_id"] and r["order"] == "yx")
    _rewrite_row(log, yx, lambda r: r.update(p_first=0.01, verdict="second"))
    lines = verify_repo(repo)
    assert not any(l.startswith("data/evals/") for l in lines)
    assert any(l.startswith("metrics/arms/sft_best.json: W: expected 1, found 0") for l in lines)
    # the report tables were built from the old metrics and the old log: they are flagged too
    assert any(l.startswith("reports/study_table.csv: row 'sft_best'") for l in lines)


def test_tampered_calibration_and_report_table(repo):
    cal = read_json(repo / "metrics/calibration.json")
    cal["clear_gap"]["pass"] = not cal["clear_gap"]["pass"]
    write_json(repo / "metrics/calibration.json", cal)
    csv_path = repo / "reports/study_table.csv"
    csv_path.write_text(csv_path.read_text().replace("orpo,ORPO,flow DiT,clean,6,", "orpo,ORPO,flow DiT,clean,7,"))
    lines = verify_repo(repo)
    assert any(l.startswith("metrics/calibration.json: clear_gap.pass: expected True, found False")
               or l.startswith("metrics/calibration.json: clear_gap.pass: expected False, found True") for l in lines)
    assert "reports/study_table.csv: row 'orpo' column 'n': expected '6', found '7'" in lines


def test_unverifiable_and_missing_files_fail(repo):
    write_json(repo / "metrics/extra.json", {"win": 1.0})
    (repo / "metrics/arms/orpo.json").unlink()
    lines = verify_repo(repo)
    assert any(l.startswith("metrics/extra.json: no rule recomputes this file") for l in lines)
    assert any(l.startswith("metrics/arms/orpo.json: missing, but its verdict log exists") for l in lines)


def test_empty_metrics_dir_fails(tmp_path):
    from report_fixture import REPO
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert verify_repo(tmp_path) == ["metrics/: no metrics files to verify (run dvc pull, or dvc repro)"]


def test_diff_values_types_and_tolerance():
    assert diff_values({"a": 0.1234561}, {"a": 0.1234569}) == []  # within the rounding tolerance
    assert diff_values({"a": True}, {"a": 1}) == ["a: expected True, found 1"]
    assert diff_values({"a": [1, 2]}, {"a": [1]}) == ["a: expected 2 items, found 1"]
    assert diff_values({"a": None}, {"a": 0.0}) == ["a: expected None, found 0.0"]
    assert diff_values({"a": 1}, {}) == ["a: expected 1, found (missing)"]
