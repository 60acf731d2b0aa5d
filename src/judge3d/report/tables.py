"""The study table, the severity table and the calibration block, as markdown and CSV text.

Built only from ``metrics/arms/<arm>.json``, ``metrics/calibration.json`` and params, so ``verify``
rebuilds the same text and compares it byte for byte. Rules the tables keep:
- a diverged arm reads "diverged", never as a win (its meets column is "no (diverged)");
- where a calibration control fails, every table is marked UNRELIABLE and says which control;
- geometry deltas with missing oracle values are flagged with the count left out.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

from judge3d.report.arm_metrics import SEVERITIES, ReportSettings, field

# Where each calibration number lives in metrics/calibration.json (dotted paths).
CALIBRATION_FIELDS = {
    "clear_gap_strict": "clear_gap.strict",
    "clear_gap_ci": "clear_gap.strict_wilson_ci",
    "clear_gap_n": "clear_gap.n",
    "clear_gap_pass": "clear_gap.pass",
    "clear_gap_threshold": "thresholds.clear_gap_min_strict",
    "bvb_decisive": "base_vs_base.decisive",
    "bvb_ci": "base_vs_base.decisive_ci",
    "bvb_flip": "base_vs_base.flip_rate",
    "bvb_n": "base_vs_base.n",
    "bvb_pass": "base_vs_base.pass",
    "bvb_range": "thresholds.base_vs_base_decisive_range",
    "headroom": "headroom",                 # {severity: {strict, strict_wilson_ci, n, ...}}
    "kappa": "agreement.kappa",
    "kappa_ci": "agreement.kappa_ci",
    "judge_oracle_agreement": "clear_gap.judge_oracle_agreement",
}
REQUIRED_CALIBRATION = ("clear_gap_strict", "clear_gap_pass", "bvb_decisive", "bvb_pass")


def _has(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def calibration_view(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration numbers the report uses, checked; a missing required one is an error."""
    view = {name: field(calibration, path) for name, path in CALIBRATION_FIELDS.items()}
    # presence, not value: decisive is legitimately null when every base-vs-base pair flipped
    missing = [CALIBRATION_FIELDS[k] for k in REQUIRED_CALIBRATION if not _has(calibration, CALIBRATION_FIELDS[k])]
    if missing:
        raise ValueError(f"metrics/calibration.json lacks {missing}; rerun the calibrate stage.")
    for key in ("clear_gap_pass", "bvb_pass"):
        if not isinstance(view[key], bool):
            raise ValueError(f"metrics/calibration.json: {CALIBRATION_FIELDS[key]} must be true/false, got {view[key]!r}.")
    failed = []
    if not view["clear_gap_pass"]:
        failed.append("clear-gap control failed: the evaluation judge does not reliably see a real quality gap")
    if not view["bvb_pass"]:
        failed.append("base-vs-base control failed: the evaluation judge has a systematic preference")
    view["reliable"] = not failed
    view["failures"] = failed
    return view


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def fmt(value: Any, signed: bool = False, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", "−")


def fmt_ci(ci: Sequence[Any] | None, signed: bool = False) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "[n/a]"
    return f"[{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]"


def _csv_num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv_text(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_num(row.get(h)) for h in header])
    return buf.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _banner(cal: Mapping[str, Any]) -> str:
    if cal["reliable"]:
        return "Calibration: both controls pass (see calibration.md).\n"
    return ("**UNRELIABLE**: " + "; ".join(cal["failures"])
            + ". Win-rates below cannot be read as true nulls or wins.\n")


def judge_win_text(m: Mapping[str, Any]) -> str:
    """The judge-win cell: a diverged arm is labelled as such, never shown as a plain win."""
    base = fmt(m["strict"])
    if not m["train"].get("trained", True):
        return f"untrained ({base})"
    return f"diverged ({base}*)" if m["diverged"] else base


def meets_text(m: Mapping[str, Any], reliable: bool = True) -> str:
    if m["diverged"]:
        return "no (diverged)"
    if not m["train"].get("trained", True):
        return "no (untrained: no training pairs)"
    if m["meets_bar"]:
        return "yes" if reliable else "yes (unreliable: calibration failed)"
    return "no"


def geom_text(delta: Mapping[str, Any]) -> str:
    text = f"{fmt(delta['delta'], signed=True)} {fmt_ci(delta['delta_ci'], signed=True)}"
    if delta.get("n_missing"):
        text += f" ({delta['n_missing']} missing)"
    return text


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
STUDY_CSV = ("arm", "intervention", "adapts", "regime", "n", "W", "L", "F", "judge_win", "judge_win_wilson_lo",
             "judge_win_wilson_hi", "judge_win_boot_lo", "judge_win_boot_hi", "tie_adjusted", "flip_rate",
             "prefer_first_rate", "judge_oracle_agreement", "geom_delta", "geom_delta_lo", "geom_delta_hi",
             "geom_missing", "oracle_win_rate", "oracle_win_lo", "oracle_win_hi", "oracle_ties", "meets_bar", "bar",
             "diverged", "calibration_reliable", "status", "iou_delta", "fscore_delta", "watertight_delta",
             "components_delta", "degenerate_faces_delta", "fm_mse_before", "fm_mse_after", "feat_mse_before",
             "feat_mse_after", "implicit_accuracy", "n_unjudged")


def probe_text(m: Mapping[str, Any]) -> str:
    """The arm's training probe: FM-MSE for flow arms, feature MSE for repair arms."""
    t = m["train"]
    if m["family"] == "repair":
        return f"feat {fmt(t['feat_mse_before'])}→{fmt(t['feat_mse_after'])}"
    return f"FM {fmt(t['fm_mse_before'])}→{fmt(t['fm_mse_after'])}"


def _delta(m: Mapping[str, Any], block: str, name: str) -> Any:
    return (m[block].get(name) or {}).get("delta")


def _status(m: Mapping[str, Any], cal: Mapping[str, Any]) -> str:
    if m["diverged"]:
        return "diverged"
    if not m["train"].get("trained", True):
        return "untrained"
    return "ok" if cal["reliable"] else "unreliable"


def study_table(arms: Mapping[str, Mapping[str, Any]], cal: Mapping[str, Any],
                settings: ReportSettings) -> tuple[str, str]:
    """(markdown, csv) of the study table, one row per arm in params order."""
    bar = fmt(settings.bar, digits=2)
    header = ["Intervention (what is adapted)", "Regime", "Judge win", "Wilson 95% CI", "Bootstrap 95% CI",
              "W/L/F", "Flip rate", "Geom Δ [95% CI]", "Oracle win (ties)", "Probe before→after", f"meets ≥ {bar}?"]
    md_rows, csv_rows = [], []
    for name, spec in settings.arms.items():
        m = arms[name]
        score = m["geom"]["score"]
        ow = m["oracle_win"]
        md_rows.append([f"{m['display']} ({spec.adapts})", spec.regime_label, judge_win_text(m),
                        fmt_ci(m["strict_wilson_ci"]), fmt_ci(m["strict_boot_ci"]), f"{m['W']}/{m['L']}/{m['F']}",
                        fmt(m["flip_rate"]), geom_text(score), f"{fmt(ow['rate'])} ({ow['ties']})", probe_text(m),
                        meets_text(m, cal["reliable"])])
        csv_rows.append({
            "arm": name, "intervention": m["display"], "adapts": spec.adapts, "regime": spec.regime, "n": m["n"],
            "W": m["W"], "L": m["L"], "F": m["F"], "judge_win": m["strict"],
            "judge_win_wilson_lo": m["strict_wilson_ci"][0], "judge_win_wilson_hi": m["strict_wilson_ci"][1],
            "judge_win_boot_lo": m["strict_boot_ci"][0], "judge_win_boot_hi": m["strict_boot_ci"][1],
            "tie_adjusted": m["tie_adjusted"], "flip_rate": m["flip_rate"], "prefer_first_rate": m["prefer_first_rate"],
            "judge_oracle_agreement": m["judge_oracle_agreement"], "geom_delta": score["delta"],
            "geom_delta_lo": score["delta_ci"][0], "geom_delta_hi": score["delta_ci"][1],
            "geom_missing": score["n_missing"], "oracle_win_rate": ow["rate"], "oracle_win_lo": ow["rate_ci"][0],
            "oracle_win_hi": ow["rate_ci"][1], "oracle_ties": ow["ties"], "meets_bar": m["meets_bar"],
            "bar": settings.bar, "diverged": m["diverged"], "calibration_reliable": cal["reliable"],
            "status": _status(m, cal), "iou_delta": _delta(m, "geom", "iou"), "fscore_delta": _delta(m, "geom", "fscore"),
            "watertight_delta": _delta(m, "validity", "watertight"),
            "components_delta": _delta(m, "validity", "components"),
            "degenerate_faces_delta": _delta(m, "validity", "degenerate_faces"),
            **{k: m["train"].get(k) for k in ("fm_mse_before", "fm_mse_after", "feat_mse_before", "feat_mse_after",
                                              "implicit_accuracy")},
            "n_unjudged": m["n_unjudged"]})
    n_text = sorted({m["n"] for m in arms.values()})
    md = ("# Study table: evaluation-judge win-rate of each arm against the base\n\n" + _banner(cal) + "\n"
          + _md_table(header, md_rows)
          + f"\nJudge win = strict win-rate W/n (swap-consistent wins of the arm), n = {', '.join(map(str, n_text))} "
            "held-out objects; CIs are 95 % (Wilson; bootstrap over objects). Geom Δ = mean arm − base oracle score "
            "(paired bootstrap CI). Oracle win = share of objects whose arm mesh has the higher oracle score "
            "(ties in brackets). * a diverged arm's judge figure is a divergence artifact, never a win.\n")
    return md, _csv_text(STUDY_CSV, csv_rows)


SEVERITY_CSV = ("severity", "arm", "n", "spec_win", "spec_win_lo", "spec_win_hi", "headroom", "headroom_lo",
                "headroom_hi", "geom_delta", "geom_delta_lo", "geom_delta_hi", "feat_mse_before", "feat_mse_after",
                "diverged", "calibration_reliable")


def repair_arms_by_severity(arms: Mapping[str, Mapping[str, Any]], settings: ReportSettings) -> list[tuple[str, str]]:
    """(severity, arm) for the repair arms, mild → severe."""
    found = [(spec.regime, name) for name, spec in settings.arms.items() if spec.family == "repair"]
    return sorted(found, key=lambda sa: (SEVERITIES.index(sa[0]), sa[1]))


def severity_table(arms: Mapping[str, Mapping[str, Any]], cal: Mapping[str, Any],
                   settings: ReportSettings) -> tuple[str, str]:
    header = ["Severity", "Spec-vs-base win [95% CI]", "Clear-gap (headroom) [95% CI]", "Geom Δ [95% CI]",
              "Adapter feat-MSE before→after"]
    headroom = cal.get("headroom") or {}
    md_rows, csv_rows = [], []
    for severity, name in repair_arms_by_severity(arms, settings):
        m = arms[name]
        h = headroom.get(severity) or {}
        h_ci = h.get("strict_wilson_ci") or [None, None]
        score = m["geom"]["score"]
        t = m["train"]
        win = judge_win_text(m) + " " + fmt_ci(m["strict_wilson_ci"])
        md_rows.append([severity.capitalize(), win, f"{fmt(h.get('strict'))} {fmt_ci(h_ci)}", geom_text(score),
                        f"{fmt(t['feat_mse_before'])}→{fmt(t['feat_mse_after'])}"])
        csv_rows.append({"severity": severity, "arm": name, "n": m["n"], "spec_win": m["strict"],
                         "spec_win_lo": m["strict_wilson_ci"][0], "spec_win_hi": m["strict_wilson_ci"][1],
                         "headroom": h.get("strict"), "headroom_lo": h_ci[0], "headroom_hi": h_ci[1],
                         "geom_delta": score["delta"], "geom_delta_lo": score["delta_ci"][0],
                         "geom_delta_hi": score["delta_ci"][1], "feat_mse_before": t["feat_mse_before"],
                         "feat_mse_after": t["feat_mse_after"], "diverged": m["diverged"],
                         "calibration_reliable": cal["reliable"]})
    md = ("# Severity table: conditioner repair across degradation severity\n\n" + _banner(cal) + "\n"
          + _md_table(header, md_rows)
          + "\nClear-gap (headroom) = the evaluation judge's strict win of the base on the clean input over the base "
            "on the input degraded at that severity: how much a repair could win back.\n")
    return md, _csv_text(SEVERITY_CSV, csv_rows)


def calibration_block(cal: Mapping[str, Any]) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    rng = cal.get("bvb_range")
    rng_text = f"in [{fmt(rng[0], digits=2)}, {fmt(rng[1], digits=2)}]" if rng else "near 0.5"
    thr = cal.get("clear_gap_threshold")
    rows = [["clear-gap (high vs low budget)", "strict win", f"{fmt(cal['clear_gap_strict'])} {fmt_ci(cal['clear_gap_ci'])}",
             f"≥ {fmt(thr, digits=2)}" if thr is not None else "high", verdict(cal["clear_gap_pass"])],
            ["base-vs-base (two seeds)", "decisive", f"{fmt(cal['bvb_decisive'])} {fmt_ci(cal['bvb_ci'])}",
             rng_text, verdict(cal["bvb_pass"])],
            ["base-vs-base (two seeds)", "flip rate", fmt(cal["bvb_flip"]), "high (no real gap)", "info"]]
    for severity in SEVERITIES:
        h = (cal.get("headroom") or {}).get(severity)
        if h:
            rows.append([f"headroom ({severity})", "strict win",
                         f"{fmt(h.get('strict'))} {fmt_ci(h.get('strict_wilson_ci'))}", "info", "info"])
    if cal.get("kappa") is not None:
        rows.append(["inter-judge agreement", "Cohen's κ", f"{fmt(cal['kappa'])} {fmt_ci(cal['kappa_ci'])}", "info", "info"])
    status = "RELIABLE: both controls pass." if cal["reliable"] else "**UNRELIABLE**: " + "; ".join(cal["failures"]) + "."
    return ("# Calibration of the evaluation judge\n\n" + status + "\n\n"
            + _md_table(["control", "statistic", "value [95% CI]", "criterion", "result"], rows))


def build_tables(arms: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any],
                 settings: ReportSettings) -> dict[str, str]:
    """File name (under reports/) -> text, for every table the report writes."""
    missing = [a for a in settings.arms if a not in arms]
    if missing:
        raise ValueError(f"no metrics for arm(s) {missing}: run arm-metrics@<arm> (dvc repro).")
    cal = calibration_view(calibration)
    study_md, study_csv = study_table(arms, cal, settings)
    sev_md, sev_csv = severity_table(arms, cal, settings)
    return {"study_table.md": study_md, "study_table.csv": study_csv, "severity_table.md": sev_md,
            "severity_table.csv": sev_csv, "calibration.md": calibration_block(cal)}
