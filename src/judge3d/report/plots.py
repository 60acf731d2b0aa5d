"""Plot data for ``dvc plots`` (CSV) and the same figures as inline SVG for the HTML report.

The SVG is drawn by matplotlib: bars or lines with 95% CI whiskers, dashed reference lines.
Both outputs come from the same rows, so the HTML and ``dvc plots show`` cannot disagree.
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Mapping, Sequence

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
# SVG (matplotlib)
# --------------------------------------------------------------------------------------------
# The figures are DVC outputs (inlined in report.html), so their bytes must not depend on the run or
# the machine: matplotlib's own defaults (not the user's matplotlibrc), a fixed id salt, no date or
# creator, text kept as <text>, and DejaVu Sans, which ships with matplotlib and is found before any
# system copy, so text metrics (hence the layout) are the same everywhere.
SVG_RC = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "text.parse_math": False,       # an arm display name with "$" is text, not mathtext
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "judge3d",      # the hashed ids (clip paths, markers) are otherwise random
}
FIGSIZE_IN = (7.5, 3.6)
DPI = 96
SVG_METADATA = {"Date": None, "Creator": None}
BLUE, GREY, ORANGE, GREEN, TEAL, RED, DARK = "#4c78a8", "#bbbbbb", "#f58518", "#54a24b", "#72b7b2", "#d62728", "#222222"


def render_svg(name: str, draw: Callable[[Any], None]) -> str:
    """``draw(figure)`` under the fixed style, as an ``<svg>`` element to inline in HTML.

    ``name`` prefixes every element id (and reference to one): the page inlines several figures,
    and matplotlib numbers ``figure_1``, ``axes_1``... afresh in each."""
    import matplotlib.style
    from matplotlib.figure import Figure

    with matplotlib.style.context(["default", SVG_RC]):
        fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    text = buf.getvalue()
    text = text[text.index("<svg"):].rstrip()  # inline: no XML declaration or DOCTYPE
    return re.sub(r'( id="|="url\(#|href="#)', rf"\g<1>{name}-", text)


def _axes(fig: Any, title: str, y_label: str) -> Any:
    ax = fig.subplots()
    ax.set_title(title, fontweight="bold")
    ax.set_ylabel(y_label)
    ax.set_ylim(0.0, 1.1)               # headroom above 1.0 for the value labels
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax.grid(axis="y", color="#e5e5e5")
    ax.set_axisbelow(True)
    return ax


def _whiskers(ax: Any, rows: Sequence[Mapping[str, Any]], lo: str, hi: str) -> None:
    """95% CI whiskers where both ends are known (drawn about the midpoint: the interval, not an error)."""
    pts = [(i, r[lo], r[hi]) for i, r in enumerate(rows) if r[lo] is not None and r[hi] is not None]
    if pts:
        x, los, his = zip(*pts)
        ax.errorbar(x, [(a + b) / 2 for a, b in zip(los, his)], yerr=[(b - a) / 2 for a, b in zip(los, his)],
                    fmt="none", ecolor=DARK, elinewidth=1, capsize=4)


def _value_labels(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, above: str | None = None,
                  colour: str = DARK) -> None:
    """Each value as text: above the top of its whisker (``above``), else right of the point."""
    for i, r in enumerate(rows):
        if r[key] is None:
            continue
        if above and r[above] is not None:
            ax.annotate(f"{r[key]:.3f}", (i, r[above]), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8, color=colour)
        else:
            ax.annotate(f"{r[key]:.3f}", (i, r[key]), xytext=(7, 0), textcoords="offset points", ha="left",
                        va="center", fontsize=8, color=colour)


def _reference_lines(ax: Any, bar: float) -> None:
    ax.axhline(PARITY, color="#666666", linestyle="--", linewidth=1.2, label=f"{PARITY:.2f} parity")
    ax.axhline(bar, color=RED, linestyle="--", linewidth=1.2, label=f"{bar:.2f} target")


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def svg_win_rate(rows: Sequence[Mapping[str, Any]], bar: float) -> str:
    def draw(fig: Any) -> None:
        ax = _axes(fig, "Evaluation-judge win-rate vs the base (95% Wilson CI)", "strict win-rate")
        x = range(len(rows))
        ax.bar(x, [r["win_rate"] or 0.0 for r in rows], width=0.6,
               color=[GREY if r["diverged"] else BLUE for r in rows], label="judge strict win-rate")
        _whiskers(ax, rows, "lo", "hi")
        _value_labels(ax, rows, "win_rate", above="hi")
        oracle = [(i, r["oracle_win_rate"]) for i, r in enumerate(rows) if r["oracle_win_rate"] is not None]
        if oracle:
            ax.plot(*zip(*oracle), "o", color=ORANGE, label="oracle win-rate")
        _reference_lines(ax, bar)
        ax.set_xticks(x, [r["label"] + (" (diverged)" if r["diverged"] else "") for r in rows],
                      rotation=35, ha="right", rotation_mode="anchor")
        _legend(ax)

    return render_svg("win_rate", draw)


def svg_severity(rows: Sequence[Mapping[str, Any]], bar: float) -> str:
    def draw(fig: Any) -> None:
        ax = _axes(fig, "Conditioner repair: win-rate and headroom vs severity", "rate")
        for key, colour, label in (("win_rate", BLUE, "repair win-rate"), ("headroom", GREEN, "clear-gap headroom")):
            pts = [(i, r[key]) for i, r in enumerate(rows) if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, linewidth=2, label=label)
        _whiskers(ax, rows, "lo", "hi")
        _value_labels(ax, rows, "win_rate", above="hi")
        _value_labels(ax, rows, "headroom", colour=GREEN)
        _reference_lines(ax, bar)
        ax.set_xticks(range(len(rows)), [r["severity"] for r in rows])
        ax.set_xlim(-0.5, len(rows) - 0.5)
        _legend(ax)

    return render_svg("severity", draw)


def svg_flip_gap(rows: Sequence[Mapping[str, Any]]) -> str:
    def draw(fig: Any) -> None:
        ax = _axes(fig, "Flip rate vs oracle quality gap (arm-vs-base pairs, all arms)", "flip rate")
        ax.bar(range(len(rows)), [r["flip_rate"] or 0.0 for r in rows], width=0.6, color=TEAL)
        _whiskers(ax, rows, "flip_rate_lo", "flip_rate_hi")
        _value_labels(ax, rows, "flip_rate", above="flip_rate_hi")
        ax.set_xticks(range(len(rows)), [f"{r['bin']}\nn={r['n']}" for r in rows])
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel("|oracle score(arm) − oracle score(base)|")

    return render_svg("flip_gap", draw)
