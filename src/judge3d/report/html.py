"""The static HTML report: one self-contained file (inline CSS, SVG and base64 PNG thumbnails).

No server, no scripts, no external assets: it opens from disk or from a CI artifact. Sections (ids):
``calibration``, ``study-table``, ``severity-table``, ``ranking``, ``plots``, ``gallery`` (one ``gallery-<arm>``
per arm). The tables are the report's :class:`~judge3d.report.tables.Table` objects, rendered from the
same DataFrames as the markdown and CSV files.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from judge3d.judges.protocol import pair_verdicts
from judge3d.report.arm_metrics import ReportSettings, field, pair_manifests
from judge3d.report.tables import Table, no_oracle_text

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 12px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.unreliable{background:#fde2e2;border:2px solid #c00;padding:8px;font-weight:bold}
.reliable{background:#e6f4e6;border:1px solid #3a3;padding:8px}
.gallery td img{display:block;image-rendering:pixelated}.missing{color:#c00;font-size:12px}
.win{color:#2a7d2a;font-weight:bold}.loss{color:#b22;font-weight:bold}.flip{color:#a67c00;font-weight:bold}
figure{margin:12px 0}
"""


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def thumbnail_data_uri(path: str | Path, size: int) -> str | None:
    """A PNG data URI of the image shrunk to fit size×size; None if the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=False)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_cell(root: Path, rel: str | None, size: int, alt: str) -> str:
    if not rel:
        return f'<td><span class="missing">{html.escape(alt)}: no path in manifest</span></td>'
    uri = thumbnail_data_uri(root / rel, size)
    if uri is None:
        return f'<td><span class="missing">{html.escape(alt)}: {html.escape(rel)} missing or unreadable</span></td>'
    return f'<td><img src="{uri}" width="{size}" alt="{html.escape(alt)}" title="{html.escape(rel)}"></td>'


# --------------------------------------------------------------------------------------------
# gallery
# --------------------------------------------------------------------------------------------
def gallery_items(verdict_rows: Sequence[Mapping[str, Any]], arm_manifest: Sequence[Mapping[str, Any]],
                  base_manifest: Sequence[Mapping[str, Any]], settings: ReportSettings, arm: str) -> list[dict[str, Any]]:
    """Up to ``gallery_size`` judged pairs, taken in turn from arm wins, base wins and flips (pair-id
    order within each), so a reader sees every kind of verdict the arm got."""
    spec = settings.arms[arm]
    records = sorted(pair_verdicts([dict(r) for r in verdict_rows]), key=lambda r: str(r["pair_id"]))
    rows_by_pair: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in verdict_rows:
        rows_by_pair.setdefault(r["pair_id"], {})[r["order"]] = r
    manifest_by_object = {str(a.get("object_id")): (a, b)
                          for a, b in pair_manifests(arm_manifest, base_manifest, spec.regime, arm)}
    kinds = {"x": [], "y": [], "flip": []}
    for rec in records:
        kinds[rec["winner"] if rec["consistent"] else "flip"].append(rec)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < settings.gallery_size and any(kinds.values()):
        for kind in ("x", "y", "flip"):
            if kinds[kind] and len(chosen) < settings.gallery_size:
                chosen.append(kinds[kind].pop(0))
    items = []
    for rec in chosen:
        xy = rows_by_pair[rec["pair_id"]]["xy"]
        arm_row, base_row = manifest_by_object.get(str(rec["object_id"]), ({}, {}))
        input_image = field(arm_row, settings.input_image_key) or field(base_row, settings.input_image_key)
        items.append({"pair_id": rec["pair_id"], "object_id": rec["object_id"], "input_image": input_image,
                      "arm_montage": xy["first"], "base_montage": xy["second"], "p_xy": rec["p_xy"],
                      "p_yx": rec["p_yx"], "v1": rec["v1"], "v2": rec["v2"], "consistent": rec["consistent"],
                      "winner": rec["winner"], "x_oracle": rec["x_oracle"], "y_oracle": rec["y_oracle"]})
    return items


def _verdict_html(item: Mapping[str, Any]) -> str:
    names = {"x": "arm", "y": "base", "tie": "tie"}
    if item["consistent"]:
        cls, text = ("win", "arm wins") if item["winner"] == "x" else ("loss", "base wins")
    else:
        cls, text = "flip", "flip (inconsistent)"
    return (f'<span class="{cls}">{text}</span><br>order arm|base: p_first={item["p_xy"]:.3f} → {names[item["v1"]]}'
            f'<br>order base|arm: p_first={item["p_yx"]:.3f} → {names[item["v2"]]}')


def _oracle_text(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def gallery_html(root: Path, arm: str, m: Mapping[str, Any], items: Sequence[Mapping[str, Any]], size: int) -> str:
    title = f"{m['display']} ({m['adapts']}) · {m['regime']}" + (" · DIVERGED" if m["diverged"] else "")
    rows = []
    for it in items:
        rows.append("<tr>" + f"<td>{html.escape(str(it['object_id']))}</td>"
                    + _img_cell(root, it["input_image"], size, "input image")
                    + _img_cell(root, it["base_montage"], size, "base montage")
                    + _img_cell(root, it["arm_montage"], size, "arm montage")
                    + f"<td>{_verdict_html(it)}</td>"
                    + f"<td>arm {_oracle_text(it['x_oracle'])}<br>base {_oracle_text(it['y_oracle'])}</td></tr>")
    body = ("<table class=\"gallery\"><thead><tr><th>object</th><th>input image</th><th>base montage</th>"
            "<th>arm montage</th><th>verdicts (both orders)</th><th>oracle score</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>") if rows else "<p>No judged pairs.</p>"
    return (f'<section id="gallery-{html.escape(arm)}" class="arm-gallery"><h3>{html.escape(title)}</h3>'
            f"<p>strict win {m['strict']} (W/L/F {m['W']}/{m['L']}/{m['F']}), n={m['n']}</p>{body}</section>")


# --------------------------------------------------------------------------------------------
# page
# --------------------------------------------------------------------------------------------
def build_html(root: str | Path, tables: Mapping[str, Table], svgs: Mapping[str, str],
               arms: Mapping[str, Mapping[str, Any]], galleries: Mapping[str, Sequence[Mapping[str, Any]]],
               settings: ReportSettings, reliable: bool) -> str:
    """``tables``: the report's tables by file stem (``calibration``, ``study_table``, ``severity_table``,
    and ``ranking`` when given)."""
    root = Path(root)
    status = ('<p class="reliable">Calibration: both controls pass.</p>' if reliable else
              '<p class="unreliable">UNRELIABLE: a calibration control failed; see the calibration section.</p>')
    no_oracle = no_oracle_text(arms)
    if no_oracle:  # at the top too: every oracle figure below is n/a, and the reader must know why
        status += f'<p class="unreliable"><strong>NO ORACLE</strong>: {html.escape(no_oracle)}</p>'
    figures = "".join(f"<figure>{svg}</figure>" for svg in svgs.values())
    gallery = "".join(gallery_html(root, arm, arms[arm], galleries.get(arm, []), settings.thumb_px)
                      for arm in settings.arms)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>judge3d study report</title>"
            f"<style>{CSS}</style></head><body>"
            "<h1>judge3d: Judging to improve — study report</h1>" + status
            + f'<section id="calibration"><h2>Calibration</h2>{tables["calibration"].html()}</section>'
            + (f'<section id="confidence"><h2>Judge confidence</h2>{tables["confidence"].html()}</section>'
               if "confidence" in tables else "")
            + f'<section id="study-table"><h2>Study table</h2>{tables["study_table"].html()}</section>'
            + f'<section id="severity-table"><h2>Severity table</h2>{tables["severity_table"].html()}</section>'
            + (f'<section id="ranking"><h2>Ranking (Bradley–Terry)</h2>{tables["ranking"].html()}</section>'
               if "ranking" in tables else "")
            + f'<section id="plots"><h2>Plots</h2>{figures}</section>'
            + '<section id="gallery"><h2>Gallery of held-out objects</h2>'
              "<p>Input image, base montage, arm montage, the evaluation judge's verdict in both orders "
              "(p_first = P(first shown is better)) and the ground-truth oracle scores.</p>"
            + gallery + "</section></body></html>\n")
