"""Plot data for ``dvc plots`` (CSV) and the same figures as inline SVG for the HTML report.

The SVG is written by hand (no plotting dependency): bars with CI whiskers, dashed reference lines.
Both outputs come from the same rows, so the HTML and ``dvc plots show`` cannot disagree.
"""
from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

from judge3d.report.arm_metrics import ReportSettings
from judge3d.report.tables import _csv_text, repair_arms_by_severity

PARITY = 0.5


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
def arm_label(m: Mapping[str, Any]) -> str:
    regime = "clean" if m["regime"] == "clean" else m["regime"]
    return f"{m['display']} · {regime}"


def win_rate_rows(arms: Mapping[str, Mapping[str, Any]], settings: ReportSettings) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(settings.arms):
        m = arms[name]
        rows.append({"arm_index": i, "arm": name, "label": arm_label(m), "win_rate": m["strict"],
                     "lo": m["strict_wilson_ci"][0], "hi": m["strict_wilson_ci"][1],
                     "oracle_win_rate": m["oracle_win"]["rate"], "parity": PARITY, "target": settings.bar,
                     "diverged": m["diverged"]})
    return rows


def severity_rows(arms: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any],
                  settings: ReportSettings) -> list[dict[str, Any]]:
    from judge3d.report.tables import calibration_view

    headroom = calibration_view(calibration).get("headroom") or {}
    rows = []
    for i, (severity, name) in enumerate(repair_arms_by_severity(arms, settings)):
        m = arms[name]
        rows.append({"severity_index": i + 1, "severity": severity, "arm": name, "win_rate": m["strict"],
                     "lo": m["strict_wilson_ci"][0], "hi": m["strict_wilson_ci"][1],
                     "headroom": (headroom.get(severity) or {}).get("strict"), "parity": PARITY,
                     "target": settings.bar})
    return rows


def flip_gap_rows(pair_records: Sequence[Mapping[str, Any]], edges: Sequence[float]) -> list[dict[str, Any]]:
    """Flip rate of the arms' (arm, base) pairs per |oracle gap| bin, pooled over arms.

    The same binning as calibrate's control pairs (``judge_metrics.flip_vs_gap``, ``calibrate.gap_bins``),
    here on the pairs the study is about: the seed reads the flip rate as a readout of the real gap.
    """
    from judge3d.report.judge_metrics import flip_vs_gap

    table = flip_vs_gap(list(pair_records), edges)
    return [{k: b[k] for k in ("bin", "gap_lo", "gap_hi", "mean_gap", "n", "flips", "flip_rate")}
            | {"flip_rate_lo": b["flip_rate_wilson_ci"][0], "flip_rate_hi": b["flip_rate_wilson_ci"][1]}
            for b in table["bins"]]


def plot_files(arms: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any], settings: ReportSettings,
               pair_records: Sequence[Mapping[str, Any]], gap_edges: Sequence[float]) -> dict[str, str]:
    """File name (under reports/plots/) -> CSV text, the data ``dvc plots`` draws."""
    win = win_rate_rows(arms, settings)
    sev = severity_rows(arms, calibration, settings)
    gap = [r for r in flip_gap_rows(pair_records, gap_edges) if r["n"]]  # an empty bin has no rate to plot
    return {
        "win_rate.csv": _csv_text(("arm_index", "arm", "label", "win_rate", "lo", "hi", "oracle_win_rate", "parity",
                                   "target", "diverged"), win),
        "repair_severity.csv": _csv_text(("severity_index", "severity", "arm", "win_rate", "lo", "hi", "headroom",
                                          "parity", "target"), sev),
        "arm_flip_vs_gap.csv": _csv_text(("bin", "gap_lo", "gap_hi", "mean_gap", "n", "flips", "flip_rate",
                                          "flip_rate_lo", "flip_rate_hi"), gap),
    }


# --------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------
W, H = 720, 320
ML, MR, MT, MB = 56, 16, 44, 92
LEGEND_Y = 30


def _y(v: float) -> float:
    return MT + (1.0 - v) * (H - MT - MB)


def _frame(title: str, y_label: str) -> list[str]:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{_y(v):.1f}" y2="{_y(v):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{ML - 6}" y="{_y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    parts.append(f'<text x="14" y="{(MT + H - MB) / 2:.0f}" transform="rotate(-90 14 {(MT + H - MB) / 2:.0f})" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    parts.append(f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}" stroke="#333"/>')
    parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}" stroke="#333"/>')
    return parts


def _ref_line(v: float, label: str, colour: str) -> str:
    return (f'<line x1="{ML}" x2="{W - MR}" y1="{_y(v):.1f}" y2="{_y(v):.1f}" stroke="{colour}" '
            f'stroke-dasharray="6 4" stroke-width="1.5"/>'
            f'<text x="{W - MR - 4}" y="{_y(v) - 4:.1f}" text-anchor="end" fill="{colour}" '
            f'stroke="white" stroke-width="3" paint-order="stroke">{html.escape(label)}</text>')


def _whisker(x: float, lo: Any, hi: Any) -> str:
    if lo is None or hi is None:
        return ""
    return (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_y(hi):.1f}" y2="{_y(lo):.1f}" stroke="#222"/>'
            f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{_y(hi):.1f}" y2="{_y(hi):.1f}" stroke="#222"/>'
            f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{_y(lo):.1f}" y2="{_y(lo):.1f}" stroke="#222"/>')


def svg_win_rate(rows: Sequence[Mapping[str, Any]], bar: float) -> str:
    parts = _frame("Evaluation-judge win-rate vs the base (95% Wilson CI)", "strict win-rate")
    slot = (W - ML - MR) / max(1, len(rows))
    for i, r in enumerate(rows):
        cx = ML + slot * (i + 0.5)
        v = r["win_rate"] or 0.0
        colour = "#bbbbbb" if r["diverged"] else "#4c78a8"
        parts.append(f'<rect x="{cx - slot * 0.3:.1f}" y="{_y(v):.1f}" width="{slot * 0.6:.1f}" '
                     f'height="{_y(0) - _y(v):.1f}" fill="{colour}"><title>{html.escape(r["label"])}: {v:.3f}</title></rect>')
        parts.append(_whisker(cx, r["lo"], r["hi"]))
        if r["oracle_win_rate"] is not None:
            parts.append(f'<circle cx="{cx:.1f}" cy="{_y(r["oracle_win_rate"]):.1f}" r="4" fill="#f58518">'
                         f'<title>oracle win {r["oracle_win_rate"]:.3f}</title></circle>')
        label = r["label"] + (" (diverged)" if r["diverged"] else "")
        parts.append(f'<text x="{cx:.1f}" y="{H - MB + 12}" text-anchor="end" '
                     f'transform="rotate(-35 {cx:.1f} {H - MB + 12})">{html.escape(label)}</text>')
    parts.append(_ref_line(PARITY, "0.50 parity", "#666666"))
    parts.append(_ref_line(bar, f"{bar:.2f} target", "#d62728"))
    parts.append(f'<circle cx="{ML + 8}" cy="{LEGEND_Y}" r="4" fill="#f58518"/>'
                 f'<text x="{ML + 16}" y="{LEGEND_Y + 4}">oracle win-rate (dot); bar: judge strict win-rate</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_severity(rows: Sequence[Mapping[str, Any]], bar: float) -> str:
    parts = _frame("Conditioner repair: win-rate and headroom vs severity", "rate")
    slot = (W - ML - MR) / max(1, len(rows))
    series = {"win_rate": ("#4c78a8", "repair win-rate"), "headroom": ("#54a24b", "clear-gap headroom")}
    for key, (colour, _) in series.items():
        pts = [(ML + slot * (i + 0.5), r[key]) for i, r in enumerate(rows) if r[key] is not None]
        if pts:
            parts.append('<polyline fill="none" stroke-width="2" stroke="%s" points="%s"/>'
                         % (colour, " ".join(f"{x:.1f},{_y(v):.1f}" for x, v in pts)))
            parts += [f'<circle cx="{x:.1f}" cy="{_y(v):.1f}" r="4" fill="{colour}"><title>{v:.3f}</title></circle>'
                      for x, v in pts]
    for i, r in enumerate(rows):
        cx = ML + slot * (i + 0.5)
        parts.append(_whisker(cx, r["lo"], r["hi"]))
        parts.append(f'<text x="{cx:.1f}" y="{H - MB + 16}" text-anchor="middle">{html.escape(r["severity"])}</text>')
    parts.append(_ref_line(PARITY, "0.50 parity", "#666666"))
    parts.append(_ref_line(bar, f"{bar:.2f} target", "#d62728"))
    for j, (colour, label) in enumerate(series.values()):
        parts.append(f'<circle cx="{ML + 8 + 160 * j}" cy="{LEGEND_Y}" r="4" fill="{colour}"/>'
                     f'<text x="{ML + 16 + 160 * j}" y="{LEGEND_Y + 4}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_flip_gap(rows: Sequence[Mapping[str, Any]]) -> str:
    parts = _frame("Flip rate vs oracle quality gap (arm-vs-base pairs, all arms)", "flip rate")
    slot = (W - ML - MR) / max(1, len(rows))
    for i, r in enumerate(rows):
        cx = ML + slot * (i + 0.5)
        if r["flip_rate"] is not None:
            v = r["flip_rate"]
            parts.append(f'<rect x="{cx - slot * 0.3:.1f}" y="{_y(v):.1f}" width="{slot * 0.6:.1f}" '
                         f'height="{_y(0) - _y(v):.1f}" fill="#72b7b2"><title>{v:.3f} (n={r["n"]})</title></rect>')
            parts.append(_whisker(cx, r["flip_rate_lo"], r["flip_rate_hi"]))
        parts.append(f'<text x="{cx:.1f}" y="{H - MB + 16}" text-anchor="middle">{html.escape(r["bin"])}</text>')
        parts.append(f'<text x="{cx:.1f}" y="{H - MB + 30}" text-anchor="middle" fill="#666">n={r["n"]}</text>')
    parts.append(f'<text x="{(ML + W - MR) / 2:.0f}" y="{H - MB + 48}" text-anchor="middle">'
                 '|oracle score(arm) − oracle score(base)|</text>')
    parts.append("</svg>")
    return "".join(parts)
