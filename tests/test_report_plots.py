"""The report's matplotlib figures: byte-identical across runs, processes and user matplotlib
settings (they are DVC outputs), and they show the rows they are drawn from."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from judge3d.report import plots

WIN_ROWS = [
    {"arm_index": 0, "arm": "sft_best", "label": "SFT-on-best · clean", "win_rate": 0.125, "lo": 0.05, "hi": 0.28,
     "oracle_win_rate": 0.406, "parity": 0.5, "target": 0.65, "diverged": False},
    {"arm_index": 1, "arm": "dpo_strong", "label": "DPO β=0.5 · clean", "win_rate": 0.3125, "lo": 0.18, "hi": 0.49,
     "oracle_win_rate": None, "parity": 0.5, "target": 0.65, "diverged": True},
    {"arm_index": 2, "arm": "cash", "label": "cost $5 & <b>", "win_rate": None, "lo": None, "hi": None,
     "oracle_win_rate": 0.5, "parity": 0.5, "target": 0.65, "diverged": False},
]
SEVERITY_ROWS = [
    {"severity_index": 1, "severity": "mild", "arm": "repair_mild", "win_rate": 0.156, "lo": 0.07, "hi": 0.32,
     "headroom": 0.219, "parity": 0.5, "target": 0.65},
    {"severity_index": 2, "severity": "severe", "arm": "repair_severe", "win_rate": 0.594, "lo": 0.42, "hi": 0.75,
     "headroom": None, "parity": 0.5, "target": 0.65},
]
GAP_ROWS = [
    {"bin": "0-0.02", "gap_lo": 0.0, "gap_hi": 0.02, "mean_gap": 0.01, "n": 60, "flips": 41, "flip_rate": 41 / 60,
     "flip_rate_lo": 0.56, "flip_rate_hi": 0.79},
    {"bin": "0.5-1", "gap_lo": 0.5, "gap_hi": 1.0, "mean_gap": 0.6, "n": 0, "flips": 0, "flip_rate": None,
     "flip_rate_lo": None, "flip_rate_hi": None},
]


def render_all() -> dict[str, str]:
    return {"win_rate": plots.svg_win_rate(WIN_ROWS, 0.65), "severity": plots.svg_severity(SEVERITY_ROWS, 0.65),
            "flip_gap": plots.svg_flip_gap(GAP_ROWS)}


def texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_svg_bytes_repeat_in_process_and_in_a_fresh_one_with_hostile_user_settings(tmp_path):
    first = render_all()
    assert render_all() == first
    # A fresh interpreter with its own (empty) font cache, another hash seed and a user matplotlibrc
    # that changes fonts, text handling and id salting: none of it may reach the figures.
    config = tmp_path / "mplconfig"
    config.mkdir()
    (config / "matplotlibrc").write_text("font.family: serif\nfont.size: 14\nsvg.fonttype: path\n"
                                         "svg.hashsalt: other\nxtick.labelsize: 20\nlines.markersize: 12\n")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_report_plots as t; "
            "print(json.dumps(t.render_all()))")
    env = {**os.environ, "MPLCONFIGDIR": str(config), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == first


def test_svg_shows_the_rows_labels_and_values():
    svgs = render_all()
    win = texts(svgs["win_rate"])
    assert {"SFT-on-best · clean", "DPO β=0.5 · clean (diverged)", "cost $5 &amp; &lt;b&gt;"} <= set(win)
    assert {"0.125", "0.312", "0.50 parity", "0.65 target", "oracle win-rate", "strict win-rate"} <= set(win)
    assert "Evaluation-judge win-rate vs the base (95% Wilson CI)" in win
    assert not any(t == "None" or "nan" in t for t in win)      # a missing value is left out, not printed
    sev = texts(svgs["severity"])
    assert {"mild", "severe", "0.156", "0.594", "0.219", "repair win-rate", "clear-gap headroom"} <= set(sev)
    gap = texts(svgs["flip_gap"])
    assert "0.683" in gap and "|oracle score(arm) − oracle score(base)|" in gap
    assert {"0-0.02", "n=60", "0.5-1", "n=0"} <= set(gap)
    assert [t for t in gap if re.fullmatch(r"0\.\d{3}", t)] == ["0.683"]   # the empty bin gets no value
    for name, svg in svgs.items():
        assert svg.startswith("<svg") and svg.endswith("</svg>"), name  # inlinable: no XML prolog
        assert "DejaVu Sans" in svg and "<text" in svg, name            # text kept as text, one font
        assert "<dc:date>" not in svg and "Matplotlib v" not in svg, name
    # inlined together, the three figures share no element id, and every reference resolves
    page = "".join(svgs.values())
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert set(re.findall(r'(?:url\(#|href="#)([^")]+)', page)) <= set(ids)
