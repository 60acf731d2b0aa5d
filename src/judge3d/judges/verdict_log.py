"""The raw verdict log: one JSON Lines row per answered query, appended and flushed.

The log is the source of truth: aggregates, the report and ``verify`` are computed from its rows
(plus the pair metadata stored in them). A row is reused on a rerun only under the same key, the
hash of everything that determines the answer: pair id, order, judge id, prompt hash and the
sha256 of both images (and of the reference image, for a reference-aware prompt). Later rows for
a key supersede earlier ones (append-only log).

Row fields: key, pair_id, object_id, order ('xy'|'yx'), first, second (image paths),
first_sha256, second_sha256, judge_id, prompt_sha256, p_first, verdict ('first'|'second'|'tie'),
x_candidate, y_candidate, x_oracle, y_oracle (None when unknown), meta (free dict). Rows of a
reference-aware prompt (one naming ``<image0>``) add reference (the input image's path) and
reference_sha256; reference-free rows have neither.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Iterable

from judge3d.core.io import file_sha256, iter_jsonl

ORDERS = ("xy", "yx")
VERDICTS = ("first", "second", "tie")
ROW_FIELDS = (
    "key", "pair_id", "object_id", "order", "first", "second", "first_sha256", "second_sha256",
    "judge_id", "prompt_sha256", "p_first", "verdict", "x_candidate", "y_candidate", "x_oracle",
    "y_oracle", "meta",
)


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def query_key(pair_id: str, order: str, judge_id: str, prompt_hash: str, first_sha: str, second_sha: str,
              *, reference_sha: str | None = None) -> str:
    """The hash identifying one query; ``reference_sha`` (the reference image's sha256) only for a
    reference-aware query, so reference-free keys are those of logs written before it existed."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
    parts = [str(pair_id), order, judge_id, prompt_hash, first_sha, second_sha]
    if reference_sha is not None:
        parts.append("reference:" + reference_sha)
    text = "\x1f".join(parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verdict_of(p_first: float) -> str:
    """'first' if p > 0.5, 'second' if p < 0.5, 'tie' only when p is exactly 0.5."""
    if not (isinstance(p_first, (int, float)) and math.isfinite(p_first) and 0.0 <= p_first <= 1.0):
        raise ValueError(f"p_first must be a finite probability in [0, 1], got {p_first!r}.")
    if p_first > 0.5:
        return "first"
    if p_first < 0.5:
        return "second"
    return "tie"


def row_key(row: dict[str, Any]) -> str:
    """The key recomputed from a row's own fields (verify uses it to catch edited rows)."""
    return query_key(row["pair_id"], row["order"], row["judge_id"], row["prompt_sha256"],
                     row["first_sha256"], row["second_sha256"], reference_sha=row.get("reference_sha256"))


def check_row(row: dict[str, Any], *, check_images: bool = False, root: str | Path = ".") -> list[str]:
    """Problems with one log row (empty list if none): missing fields, a key or verdict that does
    not follow from the row's own fields, and with ``check_images`` an image whose sha256 changed."""
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        return [f"missing fields {missing}"]
    problems = []
    if row["order"] not in ORDERS:
        problems.append(f"order {row['order']!r} is not one of {ORDERS}")
    else:
        key = row_key(row)
        if key != row["key"]:
            problems.append(f"key {row['key'][:12]}... does not match its fields (recomputed {key[:12]}...)")
    try:
        expected = verdict_of(row["p_first"])
        if row["verdict"] != expected:
            problems.append(f"verdict {row['verdict']!r} does not follow from p_first={row['p_first']!r} ({expected!r})")
    except ValueError as exc:
        problems.append(str(exc))
    if ("reference" in row) != ("reference_sha256" in row):
        problems.append("reference and reference_sha256 must appear together (a reference-aware row has both)")
    if check_images:
        has_reference = "reference" in row and "reference_sha256" in row
        for side in ("first", "second", "reference") if has_reference else ("first", "second"):
            path = Path(root) / row[side]
            if not path.is_file():
                problems.append(f"{side} image {row[side]} is missing (dvc pull)")
            elif file_sha256(path) != row[f"{side}_sha256"]:
                problems.append(f"{side} image {row[side]} changed since it was judged (sha256 differs)")
    return problems


def latest_by_key(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """key -> row, the last row of each key winning (a re-stamped row supersedes an older one)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.pop(row["key"], None)  # re-insert so dict order follows the latest write
        out[row["key"]] = row
    return out


def read_log(path: str | Path, *, judge_id: str | None = None, prompt_hash: str | None = None) -> list[dict[str, Any]]:
    """Rows of a verdict log, one per key (latest wins), optionally only one judge / prompt.

    A truncated last line (a killed writer) is ignored; it is re-asked on resume.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verdict log {path} not found: run the judging stage (dvc repro) or dvc pull.")
    rows = latest_by_key(iter_jsonl(path)).values()
    return [r for r in rows
            if (judge_id is None or r["judge_id"] == judge_id)
            and (prompt_hash is None or r["prompt_sha256"] == prompt_hash)]
