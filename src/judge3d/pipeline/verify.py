"""``judge3d verify``: recompute every number in ``metrics/`` (and the report's tables and plot data)
from the raw verdict logs and manifests alone, with the functions the stages use. No model, no GPU.

Returns one line per mismatch: the file, the key, expected (recomputed) vs found. Also checks every
verdict-log row against itself (``verdict_log.check_row``: a verdict that does not follow from its
p_first, a key that does not match its fields). A metrics file with no rule to recompute it is a
mismatch too: an unverifiable number is not verified.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

from judge3d.core.config import load_params
from judge3d.core.io import iter_jsonl, read_json

# Floats in metrics are rounded to 6 decimals; allow one unit in the last place for BLAS/platform
# noise at a rounding boundary. A tampered number moves by far more.
FLOAT_TOL = 1.5e-6
MAX_LINES_PER_FILE = 40

LABELS_DIR = "data/labels"
CALIBRATION_DIR = "data/calibration"
EVALS_DIR = "data/evals"


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def _same_number(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return abs(float(a) - float(b)) <= FLOAT_TOL
    return a == b


def diff_values(expected: Any, found: Any, key: str = "") -> list[str]:
    """'key: expected X, found Y' for every leaf that differs (dicts by key, lists by index)."""
    where = key or "(root)"
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for k in sorted(set(expected) | set(found), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in found:
                out.append(f"{sub}: expected {_short(expected[k])}, found (missing)")
            elif k not in expected:
                out.append(f"{sub}: expected (no such key), found {_short(found[k])}")
            else:
                out += diff_values(expected[k], found[k], sub)
        return out
    if isinstance(expected, list) and isinstance(found, list):
        if len(expected) != len(found):
            return [f"{where}: expected {len(expected)} items, found {len(found)}"]
        out = []
        for i, (e, f) in enumerate(zip(expected, found)):
            out += diff_values(e, f, f"{key}[{i}]")
        return out
    if isinstance(expected, (dict, list)) or isinstance(found, (dict, list)):
        return [f"{where}: expected {_short(expected)}, found {_short(found)}"]
    return [] if _same_number(expected, found) else [f"{where}: expected {expected!r}, found {found!r}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_cell(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def diff_csv(expected: str, found: str) -> list[str]:
    """Cell-wise diff of two CSV texts, naming row (first column's value) and column."""
    e_rows = list(csv.reader(io.StringIO(expected)))
    f_rows = list(csv.reader(io.StringIO(found)))
    if not e_rows or not f_rows or e_rows[0] != f_rows[0]:
        return [f"header: expected {e_rows[:1]}, found {f_rows[:1]}"]
    if len(e_rows) != len(f_rows):
        return [f"rows: expected {len(e_rows) - 1}, found {len(f_rows) - 1}"]
    header = e_rows[0]
    out = []
    for e, f in zip(e_rows[1:], f_rows[1:]):
        for col, ev, fv in zip(header, e, f):
            if not _same_number(_parse_cell(ev), _parse_cell(fv)):
                out.append(f"row {e[0]!r} column {col!r}: expected {ev!r}, found {fv!r}")
    return out


def diff_text(expected: str, found: str) -> list[str]:
    e_lines, f_lines = expected.splitlines(), found.splitlines()
    for i, (e, f) in enumerate(zip(e_lines, f_lines)):
        if e != f:
            return [f"line {i + 1}: expected {_short(e)}, found {_short(f)}"]
    if len(e_lines) != len(f_lines):
        return [f"expected {len(e_lines)} lines, found {len(f_lines)}"]
    return []


def _cap(rel: str, lines: list[str]) -> list[str]:
    out = [f"{rel}: {line}" for line in lines[:MAX_LINES_PER_FILE]]
    if len(lines) > MAX_LINES_PER_FILE:
        out.append(f"{rel}: ... and {len(lines) - MAX_LINES_PER_FILE} more")
    return out


# --------------------------------------------------------------------------------------------
# raw logs
# --------------------------------------------------------------------------------------------
def verdict_logs(root: Path) -> list[Path]:
    """Every verdict log in the repo's judged-data dirs (a JSONL whose rows carry p_first and a key)."""
    logs = []
    for pattern in (f"{EVALS_DIR}/*/verdicts.jsonl", f"{LABELS_DIR}/*.jsonl", f"{CALIBRATION_DIR}/*.jsonl"):
        for path in sorted(root.glob(pattern)):
            first = next(iter_jsonl(path), None)
            if first is not None and "p_first" in first and "key" in first:
                logs.append(path)
    return logs


def check_logs(root: Path, check_images: bool = False) -> list[str]:
    from judge3d.judges.verdict_log import check_row

    out = []
    for path in verdict_logs(root):
        rel = path.relative_to(root).as_posix()
        lines = []
        try:
            rows = list(iter_jsonl(path))
        except ValueError as exc:
            out.append(f"{rel}: unreadable ({exc})")
            continue
        for i, row in enumerate(rows):
            for problem in check_row(row, check_images=check_images, root=root):
                lines.append(f"row {i + 1} (pair {row.get('pair_id')}, order {row.get('order')}): {problem}")
        out += _cap(rel, lines)
    return out


# --------------------------------------------------------------------------------------------
# metrics rules: (metrics file, function recomputing its content)
# --------------------------------------------------------------------------------------------
def _labels_rule(root: Path, params: dict, found: dict) -> Any:
    from judge3d.pipeline.judging import IID_LOG, LABELS_LOG
    from judge3d.report.judge_metrics import labels_metrics_from_logs

    return labels_metrics_from_logs(root / LABELS_DIR / LABELS_LOG, root / LABELS_DIR / IID_LOG, params,
                                    judge_id=found.get("judge_id"), prompt_hash=found.get("prompt_sha256"))


def _calibration_rule(root: Path, params: dict, found: dict) -> Any:
    from judge3d.report.judge_metrics import calibration_metrics_from_dir

    return calibration_metrics_from_dir(root / CALIBRATION_DIR, params, eval_judge_id=found.get("eval_judge_id"),
                                        train_judge_id=found.get("train_judge_id"),
                                        prompt_hash=found.get("prompt_sha256"),
                                        train_prompt_hash=found.get("train_prompt_sha256"))


def _calibration_plot_rule(recomputed_calibration: dict[str, Any]) -> dict[str, str]:
    """metrics/plots/<name> -> CSV text of every calibrate plot, from metrics/calibration.json as
    recomputed from the raw logs (so the logs are read once)."""
    from judge3d.pipeline.judging import calibration_plot_texts

    return {f"metrics/plots/{name}": text for name, text in calibration_plot_texts(recomputed_calibration).items()}


def _base_rule(root: Path, params: dict, found: dict) -> Any:
    from judge3d.report import base_metrics

    if not hasattr(base_metrics, "base_metrics_from_files"):
        raise AttributeError("judge3d.report.base_metrics has no base_metrics_from_files(root, params), the entry "
                             "point verify uses to rebuild metrics/base.json from the generated manifests")
    return base_metrics.base_metrics_from_files(root, params)


def _arm_rule(arm: str) -> Callable[[Path, dict, dict], Any]:
    def rule(root: Path, params: dict, found: dict) -> Any:
        from judge3d.report.arm_metrics import arm_metrics_from_files

        return arm_metrics_from_files(root, arm, params)
    return rule


def _ranking_rule(root: Path, params: dict, recomputed: dict[str, Any]) -> Any:
    """metrics/ranking.json from the eval logs and the arm metrics as recomputed (stored where an arm's
    could not be recomputed: that failure is already reported)."""
    from judge3d.report.arm_metrics import report_settings
    from judge3d.report.build import compute_ranking, load_arm_metrics

    settings = report_settings(params)
    stored = load_arm_metrics(root, settings)
    arms = {arm: recomputed.get(f"metrics/arms/{arm}.json", stored[arm]) for arm in settings.arms}
    return compute_ranking(root, params, arms)


def _json_rules(root: Path, params: dict) -> dict[str, Callable[[Path, dict, dict], Any]]:
    from judge3d.report.arm_metrics import report_settings

    rules = {"metrics/labels.json": _labels_rule, "metrics/calibration.json": _calibration_rule,
             "metrics/base.json": _base_rule}
    for arm in report_settings(params).arms:
        rules[f"metrics/arms/{arm}.json"] = _arm_rule(arm)
    return rules


def check_metrics(root: Path, params: dict) -> tuple[list[str], set[str], dict[str, Any]]:
    """Mismatch lines, the metrics files that were checked, and the recomputed content per file."""
    out: list[str] = []
    checked: set[str] = set()
    recomputed: dict[str, Any] = {}
    for rel, rule in _json_rules(root, params).items():
        path = root / rel
        if not path.is_file():
            if rel.startswith("metrics/arms/") and (root / EVALS_DIR / Path(rel).stem / "verdicts.jsonl").is_file():
                out.append(f"{rel}: missing, but its verdict log exists (run dvc repro, or dvc pull)")
            continue
        checked.add(rel)
        try:
            found = read_json(path)
            expected = rule(root, params, found)
        except Exception as exc:  # any failure to recompute means the number is not verified
            out.append(f"{rel}: cannot recompute from the raw logs: {type(exc).__name__}: {exc}")
            continue
        recomputed[rel] = expected
        out += _cap(rel, diff_values(expected, found))
    ranking = "metrics/ranking.json"  # after the arm rules: it is built on their recomputed metrics
    if (root / ranking).is_file():
        checked.add(ranking)
        try:
            found = read_json(root / ranking)
            recomputed[ranking] = _ranking_rule(root, params, recomputed)
            out += _cap(ranking, diff_values(recomputed[ranking], found))
        except Exception as exc:
            out.append(f"{ranking}: cannot recompute from the raw logs: {type(exc).__name__}: {exc}")
    if "metrics/calibration.json" in recomputed:  # else its failure to recompute is already reported
        try:
            plots = _calibration_plot_rule(recomputed["metrics/calibration.json"])
        except Exception as exc:
            plots = {}
            out.append(f"metrics/plots (calibrate): cannot recompute from the raw logs: {type(exc).__name__}: {exc}")
        for plot, text in plots.items():
            checked.add(plot)
            if not (root / plot).is_file():
                out.append(f"{plot}: missing (run dvc repro calibrate, or dvc pull)")
                continue
            out += _cap(plot, diff_csv(text, (root / plot).read_text()))
    return out, checked, recomputed


def check_reports(root: Path, params: dict, recomputed: dict[str, Any]) -> list[str]:
    """The report's tables and plot data, rebuilt from the recomputed metrics and the logs, against
    reports/ (a metrics file that could not be recomputed is already reported; its stored copy is used)."""
    from judge3d.report.arm_metrics import report_settings
    from judge3d.report.build import (CALIBRATION_METRICS, RANKING_METRICS, REPORTS_DIR, load_arm_metrics,
                                      load_calibration, report_texts)

    if not (root / REPORTS_DIR).is_dir():
        return []
    try:
        settings = report_settings(params)
        stored = load_arm_metrics(root, settings)
        arms = {arm: recomputed.get(f"metrics/arms/{arm}.json", stored[arm]) for arm in settings.arms}
        calibration = recomputed.get(CALIBRATION_METRICS) or load_calibration(root)
        expected = report_texts(root, params, arms=arms, calibration=calibration,
                                ranking=recomputed.get(RANKING_METRICS), labels=recomputed.get("metrics/labels.json"))
    except Exception as exc:
        return [f"{REPORTS_DIR}/: cannot rebuild the tables: {type(exc).__name__}: {exc}"]
    out = []
    for rel, text in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            out.append(f"{rel}: missing (run the report stage, or dvc pull)")
            continue
        found = path.read_text(encoding="utf-8")
        lines = diff_csv(text, found) if rel.endswith(".csv") else diff_text(text, found)
        out += _cap(rel, lines)
    return out


def verify_repo(root: str | Path = ".", check_images: bool = False) -> list[str]:
    """Every mismatch between metrics/ (and reports/ tables) and a recomputation from raw files."""
    root = Path(root)
    params = load_params(root / "params.yaml")
    out = check_logs(root, check_images)
    metrics_out, checked, recomputed = check_metrics(root, params)
    out += metrics_out
    metrics_dir = root / "metrics"
    present = sorted(p.relative_to(root).as_posix() for p in metrics_dir.rglob("*")
                     if p.is_file() and p.name != ".gitkeep") if metrics_dir.is_dir() else []
    if not present:
        out.append("metrics/: no metrics files to verify (run dvc pull, or dvc repro)")
    for rel in present:
        if rel not in checked:
            out.append(f"{rel}: no rule recomputes this file from raw logs, so its numbers are unverified")
    out += check_reports(root, params, recomputed)
    return out
