"""Per-arm metrics, the tables, plot data and the HTML report, on a crafted repo (tests/report_fixture.py)."""
from __future__ import annotations

import copy
import csv
import io
import re
import shutil

import numpy as np
import pytest

from judge3d.adapt.arms import arm_names
from judge3d.core import stats
from judge3d.core.io import read_json, read_jsonl
from judge3d.report.arm_metrics import arm_metrics, arm_metrics_from_files, load_arm_inputs
from judge3d.report.build import write_report
from report_fixture import build_repo, run_stages

GAINS = {"repair_severe": 0.3, "dpo_strong": 0.4}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "repo"
    params = build_repo(root, arm_gain=GAINS, diverged=("dpo_strong",))
    run_stages(root, params)
    return root, params


@pytest.fixture(scope="module")
def blind_repo(tmp_path_factory):
    """The same arms, but the evaluation judge fails its calibration controls."""
    root = tmp_path_factory.mktemp("report_blind") / "repo"
    params = build_repo(root, arm_gain=GAINS, diverged=("dpo_strong",), calibration_ok=False)
    run_stages(root, params)
    return root, params


def csv_rows(path):
    return {r["arm"]: r for r in csv.DictReader(io.StringIO(path.read_text()))}


def test_arm_metrics_match_hand_counts(repo):
    root, params = repo
    m = read_json(root / "metrics/arms/repair_severe.json")
    # arm quality = base + 0.3 + offset(i % 3) with offsets +0.02, -0.3, 0: deltas 0.32, 0, 0.3 (twice each)
    assert (m["n"], m["W"], m["L"], m["F"]) == (6, 4, 0, 2)
    assert m["strict"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["strict_wilson_ci"] == list(stats.wilson_interval(4, 6))
    assert m["meets_bar"] is True and m["diverged"] is False and m["bar"] == 0.65
    assert m["geom"]["score"]["delta"] == pytest.approx((0.32 + 0.0 + 0.3) / 3, abs=1e-6)
    lo, hi = m["geom"]["score"]["delta_ci"]
    assert lo <= m["geom"]["score"]["delta"] <= hi
    assert (m["oracle_win"]["wins"], m["oracle_win"]["ties"], m["oracle_win"]["losses"]) == (4, 2, 0)
    assert m["oracle_win"]["rate"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["train"]["feat_mse_before"] == 0.3 and m["train"]["feat_mse_after"] == 0.2
    assert m["train"]["fm_mse_before"] is None  # a repair arm has no flow probe: null, not 0
    # the validity proxies: base meshes are all watertight; 2 of 6 repair meshes have score <= 0.5
    base = {r["object_id"]: r for r in read_jsonl(root / "data/generated/heldout_severe/manifest.jsonl")}
    arm = read_jsonl(root / "data/evals/repair_severe/manifest.jsonl")
    expected_wt = np.mean([float(r["watertight"]) - float(base[r["object_id"]]["watertight"]) for r in arm])
    assert m["validity"]["watertight"]["delta"] == pytest.approx(expected_wt, abs=1e-6)


def test_flow_arm_records_probe_and_beta(repo):
    root, _ = repo
    dpo = read_json(root / "metrics/arms/dpo.json")
    assert dpo["display"] == "DPO β=0.1" and dpo["train"]["beta"] == 0.1
    assert (dpo["train"]["fm_mse_before"], dpo["train"]["fm_mse_after"]) == (0.09, 0.08)
    assert dpo["train"]["implicit_accuracy"] == 0.6
    assert read_json(root / "metrics/arms/dpo_strong.json")["display"] == "DPO β=0.5"


def test_diverged_arm_is_never_a_win(repo):
    root, _ = repo
    m = read_json(root / "metrics/arms/dpo_strong.json")
    assert m["strict"] == 1.0 and m["diverged"] is True
    assert m["meets_bar"] is False  # the judge says 1.0, the probe says diverged
    row = csv_rows(root / "reports/study_table.csv")["dpo_strong"]
    assert (row["meets_bar"], row["diverged"], row["status"]) == ("false", "true", "diverged")
    md_line = next(l for l in (root / "reports/study_table.md").read_text().splitlines() if "β=0.5" in l)
    assert "diverged (1.000*)" in md_line and "no (diverged)" in md_line and "| yes |" not in md_line
    plot = csv_rows(root / "reports/plots/win_rate.csv")["dpo_strong"]
    assert plot["diverged"] == "true"
    html = (root / "reports/report.html").read_text()
    assert "DIVERGED" in html


def test_healthy_calibration_is_not_marked_unreliable(repo):
    root, _ = repo
    for name in ("study_table.md", "severity_table.md", "calibration.md"):
        assert "UNRELIABLE" not in (root / "reports" / name).read_text()
    assert all(r["calibration_reliable"] == "true" for r in csv_rows(root / "reports/study_table.csv").values())
    cal_md = (root / "reports/calibration.md").read_text()
    assert "| clear-gap (output vs its deliberately degraded copy, n = 10) | strict win | 1.000" in cal_md
    assert "| training signal (training judge, high vs low budget; not a control) | strict win |" in cal_md


def test_failed_calibration_marks_every_table_unreliable(blind_repo):
    root, _ = blind_repo
    cal = read_json(root / "metrics/calibration.json")
    assert cal["clear_gap"]["pass"] is False
    for name in ("study_table.md", "severity_table.md", "calibration.md"):
        text = (root / "reports" / name).read_text()
        assert "**UNRELIABLE**" in text and "clear-gap control failed" in text
    assert "| FAIL |" in (root / "reports/calibration.md").read_text()
    rows = csv_rows(root / "reports/study_table.csv")
    assert all(r["calibration_reliable"] == "false" for r in rows.values())
    assert rows["sft_best"]["status"] == "unreliable" and rows["dpo_strong"]["status"] == "diverged"
    md_line = next(l for l in (root / "reports/study_table.md").read_text().splitlines() if "hard (severe)" in l
                   and "Conditioner" in l)
    assert "yes (unreliable: calibration failed)" in md_line
    assert 'class="unreliable"' in (root / "reports/report.html").read_text()


def test_severity_table_rows_in_severity_order(repo):
    root, _ = repo
    rows = list(csv.DictReader(io.StringIO((root / "reports/severity_table.csv").read_text())))
    assert [r["severity"] for r in rows] == ["mild", "medium", "severe"]
    headroom = read_json(root / "metrics/calibration.json")["headroom"]
    assert float(rows[2]["headroom"]) == headroom["severe"]["strict"]
    assert float(rows[2]["spec_win"]) == pytest.approx(4 / 6, abs=1e-6)
    assert (rows[0]["feat_mse_before"], rows[0]["feat_mse_after"]) == ("0.3", "0.2")


def test_bar_comes_from_params(repo):
    root, params = repo
    p = copy.deepcopy(params)
    p["report"]["bar"] = 0.7
    assert arm_metrics_from_files(root, "repair_severe", p)["meets_bar"] is False  # 0.667 < 0.7


def test_missing_oracle_value_is_flagged_not_imputed(repo, tmp_path):
    root, params = repo
    rows, manifest, base, train = load_arm_inputs(root, "repair_severe", params)
    manifest = copy.deepcopy(manifest)
    manifest[0]["oracle_score"] = None
    m = arm_metrics(rows, manifest, base, train, params, "repair_severe")
    assert (m["geom"]["score"]["n"], m["geom"]["score"]["n_missing"]) == (5, 1)
    assert (m["oracle_win"]["n"], m["oracle_win"]["n_missing"]) == (5, 1)
    from judge3d.report.tables import geom_text
    assert "(1 missing)" in geom_text(m["geom"]["score"])


def test_one_dataframe_renders_markdown_csv_and_html(repo):
    import html

    from judge3d.report.arm_metrics import report_settings
    from judge3d.report.build import load_arm_metrics, load_calibration, load_labels
    from judge3d.report.tables import csv_text, frame, report_tables

    root, params = repo
    settings = report_settings(params)
    tables = report_tables(load_arm_metrics(root, settings), load_calibration(root), settings, load_labels(root))
    assert set(tables) == {"study_table", "severity_table", "calibration", "confidence"}
    page = (root / "reports/report.html").read_text()
    for stem, table in tables.items():
        assert (root / f"reports/{stem}.md").read_text() == table.markdown()
        if table.data is not None:
            assert (root / f"reports/{stem}.csv").read_text() == table.csv()
            assert len(table.data) == len(table.display)
        fragment = table.html()
        assert fragment in page and fragment.count("<tr>") == len(table.display)
        for cell in [*table.display.columns, *table.display.to_numpy().ravel()]:
            assert f">{html.escape(str(cell), quote=False)}<" in fragment
    # CSV cells: None -> empty, booleans lower-case, ints stay ints, floats as their shortest repr
    assert csv_text(frame(("a", "b", "c", "d"), [{"a": None, "b": True, "c": 3, "d": 0.1}, {"c": 7}])) == \
        "a,b,c,d\n,true,3,0.1\n,,7,\n"


def test_arm_metrics_rejects_inconsistent_inputs(repo):
    root, params = repo
    rows, manifest, base, train = load_arm_inputs(root, "repair_severe", params)
    with pytest.raises(ValueError, match="no base output"):
        arm_metrics(rows, manifest, [r for r in base if r["object_id"] != "obj03"], train, params, "repair_severe")
    tampered = copy.deepcopy(rows)
    tampered[0]["verdict"] = "second" if tampered[0]["verdict"] == "first" else "first"
    with pytest.raises(ValueError, match="fails its own checks"):
        arm_metrics(tampered, manifest, base, train, params, "repair_severe")
    with pytest.raises(ValueError, match="feat_mse_after"):
        arm_metrics(rows, manifest, base, {k: v for k, v in train.items() if k != "feat_mse_after"}, params,
                    "repair_severe")
    with pytest.raises(ValueError, match="severity 'mild'"):
        arm_metrics(rows, manifest, base, {**train, "severity": "mild"}, params, "repair_severe")
    with pytest.raises(ValueError, match="not in the arm's manifest"):
        arm_metrics(rows, manifest[1:], base, train, params, "repair_severe")
    from judge3d.core.config import ParamsError
    with pytest.raises(ParamsError, match="no arm 'nope' under 'arms'"):
        arm_metrics(rows, manifest, base, train, params, "nope")


def test_outputs_are_byte_identical_on_rerun(repo, tmp_path):
    root, params = repo
    copy_root = tmp_path / "again"
    shutil.copytree(root, copy_root)
    run_stages(copy_root, params)
    for rel in ["metrics/arms/dpo.json", "reports/study_table.md", "reports/study_table.csv",
                "reports/severity_table.csv", "reports/plots/win_rate.csv", "reports/report.html"]:
        assert (copy_root / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_plot_data_files(repo):
    root, params = repo
    win = list(csv.DictReader(io.StringIO((root / "reports/plots/win_rate.csv").read_text())))
    assert [r["arm"] for r in win] == list(arm_names(params))
    assert {r["parity"] for r in win} == {"0.5"} and {r["target"] for r in win} == {"0.65"}
    sev = list(csv.DictReader(io.StringIO((root / "reports/plots/repair_severity.csv").read_text())))
    assert [r["severity_index"] for r in sev] == ["1", "2", "3"]
    gap = list(csv.DictReader(io.StringIO((root / "reports/plots/arm_flip_vs_gap.csv").read_text())))
    assert all(int(r["n"]) > 0 for r in gap)
    total = sum(int(r["n"]) for r in gap)
    assert total == 6 * len(arm_names(params))  # every arm-vs-base pair has both oracle scores


def test_html_is_self_contained_with_sections_and_gallery(repo):
    root, params = repo
    html = (root / "reports/report.html").read_text()
    for section in ("calibration", "study-table", "severity-table", "plots", "gallery"):
        assert f'<section id="{section}"' in html
    for arm in arm_names(params):
        assert f'<section id="gallery-{arm}"' in html
    assert html.count("<svg") == 3
    assert "<script" not in html and "<link" not in html
    # no external or relative asset (a "#id" reference stays inside the page: the SVGs' markers and clips)
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    # 3 gallery rows per arm x (input, base montage, arm montage)
    assert html.count('src="data:image/png;base64,') == 3 * 3 * len(arm_names(params))
    assert "p_first=" in html and "arm 0." in html and "base 0." in html


def test_gallery_flags_a_missing_image(repo, tmp_path):
    root, params = repo
    copy_root = tmp_path / "noimg"
    shutil.copytree(root, copy_root)
    (copy_root / "data/evals/sft_best/montages/obj00_s0.png").unlink()
    write_report(copy_root, params)
    assert "data/evals/sft_best/montages/obj00_s0.png missing or unreadable" in \
        (copy_root / "reports/report.html").read_text()


def test_report_needs_every_arm_metrics(repo, tmp_path):
    root, params = repo
    copy_root = tmp_path / "partial"
    shutil.copytree(root, copy_root)
    (copy_root / "metrics/arms/orpo.json").unlink()
    with pytest.raises(FileNotFoundError, match="arm-metrics@orpo"):
        write_report(copy_root, params)
