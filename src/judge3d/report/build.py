"""Assemble the report from metrics and raw logs: tables, plot data, SVG figures and the HTML page.

:func:`report_texts` is every deterministic text file of ``reports/`` (tables and plot CSVs);
``verify`` rebuilds it and compares. The HTML embeds images and is written by :func:`write_report`,
which also writes ``metrics/ranking.json`` (:func:`compute_ranking`; verify recomputes it too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from judge3d.core.io import read_json, read_jsonl
from judge3d.judges.protocol import pair_verdicts
from judge3d.judges.verdict_log import read_log
from judge3d.adapt.arms import arm_paths
from judge3d.report.arm_metrics import ReportSettings, report_settings

REPORTS_DIR = "reports"
PLOTS_DIR = "reports/plots"
CALIBRATION_METRICS = "metrics/calibration.json"
LABELS_METRICS = "metrics/labels.json"
RANKING_METRICS = "metrics/ranking.json"


def load_arm_metrics(root: str | Path, settings: ReportSettings) -> dict[str, dict[str, Any]]:
    out = {}
    for arm, spec in settings.arms.items():
        path = arm_paths(arm, spec.regime, root).metrics
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run arm-metrics@{arm} (dvc repro).")
        out[arm] = read_json(path)
    return out


def load_calibration(root: str | Path) -> dict[str, Any]:
    path = Path(root) / CALIBRATION_METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the calibrate stage (dvc repro) or dvc pull.")
    return read_json(path)


def load_labels(root: str | Path) -> dict[str, Any] | None:
    """metrics/labels.json (the training signal), or None where the labels stage has not run (a report
    built from calibration and arm metrics alone still renders; it just lacks that row)."""
    path = Path(root) / LABELS_METRICS
    return read_json(path) if path.is_file() else None


def arm_pair_records(root: str | Path, settings: ReportSettings) -> list[dict[str, Any]]:
    """Pair verdicts (arm = x, base = y) of every arm's eval log, tagged with the arm."""
    records = []
    for arm, spec in settings.arms.items():
        for rec in pair_verdicts(read_log(arm_paths(arm, spec.regime, root).verdicts)):
            records.append({**rec, "arm": arm, "pair_id": f"{arm}/{rec['pair_id']}"})
    return records


def compute_ranking(root: str | Path, params: Mapping[str, Any],
                    arms: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The content of metrics/ranking.json (Bradley–Terry per regime) from the eval logs and arm metrics."""
    from judge3d.report.ranking import ranking

    settings = report_settings(params)
    arms = dict(arms) if arms is not None else load_arm_metrics(root, settings)
    return ranking(arm_pair_records(root, settings), arms, settings)


def _gap_edges(params: Mapping[str, Any]) -> list[float]:
    from judge3d.report.judge_metrics import gap_bin_edges

    return gap_bin_edges(params)


def report_texts(root: str | Path, params: Mapping[str, Any], *,
                 arms: Mapping[str, dict[str, Any]] | None = None,
                 calibration: Mapping[str, Any] | None = None,
                 ranking: Mapping[str, Any] | None = None,
                 labels: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Relative path -> text of every table and plot-data file the report stage writes.

    ``arms``/``calibration``/``ranking``/``labels`` replace the metrics files (verify passes its recomputed
    values, so the tables are checked against the raw logs, not against possibly edited metrics).
    """
    from judge3d.report.plots import plot_files
    from judge3d.report.ranking import ranking_table
    from judge3d.report.tables import build_tables, calibration_view

    settings = report_settings(params)
    arms = dict(arms) if arms is not None else load_arm_metrics(root, settings)
    calibration = calibration if calibration is not None else load_calibration(root)
    out = {f"{REPORTS_DIR}/{name}": text
           for name, text in build_tables(arms, calibration, settings,
                                          labels if labels is not None else load_labels(root)).items()}
    ranking = ranking if ranking is not None else compute_ranking(root, params, arms)
    table = ranking_table(ranking, calibration_view(calibration), settings)
    out[f"{REPORTS_DIR}/ranking.md"], out[f"{REPORTS_DIR}/ranking.csv"] = table.markdown(), table.csv()
    plots = plot_files(arms, calibration, settings, arm_pair_records(root, settings), _gap_edges(params))
    out.update({f"{PLOTS_DIR}/{name}": text for name, text in plots.items()})
    return out


def report_html(root: str | Path, params: Mapping[str, Any], ranking: Mapping[str, Any] | None = None) -> str:
    """The HTML page; its tables render from the same DataFrames as the markdown and CSV files."""
    from judge3d.report import plots
    from judge3d.report.html import build_html, gallery_items
    from judge3d.report.ranking import ranking_table
    from judge3d.report.tables import calibration_view, report_tables

    root = Path(root)
    settings = report_settings(params)
    arms = load_arm_metrics(root, settings)
    calibration = load_calibration(root)
    cal = calibration_view(calibration)
    svgs = {
        "win_rate": plots.svg_win_rate(plots.win_rate_rows(arms, settings), settings.bar),
        "severity": plots.svg_severity(plots.severity_rows(arms, calibration, settings), settings.bar),
        "flip_gap": plots.svg_flip_gap(plots.flip_gap_rows(arm_pair_records(root, settings), _gap_edges(params))),
    }
    galleries = {}
    for arm, spec in settings.arms.items():
        paths = arm_paths(arm, spec.regime, root)
        galleries[arm] = gallery_items(read_log(paths.verdicts), read_jsonl(paths.manifest),
                                       read_jsonl(paths.base_manifest), settings, arm)
    tables = report_tables(arms, calibration, settings, load_labels(root))
    tables["ranking"] = ranking_table(ranking if ranking is not None else compute_ranking(root, params, arms),
                                      cal, settings)
    return build_html(root, tables, svgs, arms, galleries, settings, cal["reliable"])


def write_report(root: str | Path, params: Mapping[str, Any]) -> list[Path]:
    """Write reports/*.md|csv, reports/plots/*.csv, reports/report.html and metrics/ranking.json;
    return the paths."""
    from judge3d.core.io import write_json

    root = Path(root)
    ranking = compute_ranking(root, params)
    texts = report_texts(root, params, ranking=ranking)
    write_json(root / RANKING_METRICS, ranking)
    written = [root / RANKING_METRICS]
    for rel, text in sorted(texts.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    html_path = root / REPORTS_DIR / "report.html"
    html_path.write_text(report_html(root, params, ranking), encoding="utf-8")
    written.append(html_path)
    return written
