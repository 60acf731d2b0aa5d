"""Sweep tables from DVC experiments: the DPO β sweep, the spread over training seeds and the
reference-aware judge ablation.

``dvc exp show --json`` (DVC 3.x) prints a list of rows. The first is ``{"rev": "workspace", "name": null,
"data": {...}, "error": null, "experiments": null}``; each baseline commit follows as ``{"rev": <sha>, "name":
<branch or null>, "data": {...}, "error": ..., "experiments": [...] or null}``, and each of its experiments is
``{"name": <exp name>, "executor": {"state": "success|failed|queued|running", ...} or null, "revs": [<a row
like the commit's, whose "experiments" is null>]}``. A row's ``data`` holds ``"params": {<params file>:
{"data": {...nested...}}}`` and ``"metrics": {<metrics file>: {"data": {...nested...}}}`` (``{"error": ...}``
in place of ``data`` when the file could not be read).

Two traps, both handled here:
- ``dvc exp show`` keeps only the numbers, strings and booleans of a metrics file: lists (every CI) and nulls are
  dropped. :func:`fill_full_metrics` reads the files whole at each experiment's commit (a metrics file with
  ``cache: false`` is committed with the experiment) and checks them against what DVC showed.
- a failed experiment's row carries its baseline's metrics, and a queued one has none; only finished runs
  (``success``) and the workspace and commit rows make table rows. The others are named in the table's note.

Everything here but the two I/O helpers at the end is a pure function of its arguments.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from judge3d.report.tables import Table, fmt, fmt_ci, frame

PARAMS = "params"           # Column.source for a parameter (params.yaml, dotted key) rather than a metrics file
PARAMS_FILE = "params.yaml"
MISSING = "—"               # a cell whose key the experiment lacks (or holds null)
FINISHED = ("workspace", "commit", "success")


class ExperimentsError(ValueError):
    """Bad input to a sweep table: the message names the thing and what to do."""


# --------------------------------------------------------------------------------------------
# parsing `dvc exp show --json`
# --------------------------------------------------------------------------------------------
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": value}``; lists stay whole values (a CI is one key, ``[lo, hi]``)."""
    if not isinstance(node, Mapping):
        return {prefix: node} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@dataclass(frozen=True)
class Experiment:
    """One row of ``dvc exp show``: the workspace, a baseline commit, or an experiment run from one."""
    name: str
    rev: str
    state: str                              # workspace | commit | success | failed | queued | running
    params: Mapping[str, Any]               # params.yaml, flattened; another params file's keys as "<file>:<key>"
    metrics: Mapping[str, Mapping[str, Any]]  # metrics file -> its flattened keys
    baseline: str | None = None             # the commit an experiment (or the workspace) was run from
    error: str | None = None
    full: frozenset[str] = field(default_factory=frozenset)  # metrics files read whole, lists (CIs) included

    @property
    def finished(self) -> bool:
        """A run whose metrics are its own (a failed one shows its baseline's, a queued one none)."""
        return self.error is None and self.state in FINISHED and bool(self.metrics)

    def value(self, source: str, key: str) -> Any:
        return (self.params if source == PARAMS else self.metrics.get(source, {})).get(key)

    def has(self, source: str, key: str) -> bool:
        return key in (self.params if source == PARAMS else self.metrics.get(source, {}))


def _row_data(row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    data = row.get("data") or {}
    params: dict[str, Any] = {}
    for file, entry in (data.get("params") or {}).items():
        flat = flatten((entry or {}).get("data") or {})
        params.update(flat if file == PARAMS_FILE else {f"{file}:{k}": v for k, v in flat.items()})
    metrics = {file: flatten(entry["data"]) for file, entry in (data.get("metrics") or {}).items()
               if isinstance(entry, Mapping) and isinstance(entry.get("data"), Mapping)}
    return params, metrics


def _error_text(error: Any) -> str | None:
    if not error:
        return None
    return str(error.get("msg") or error) if isinstance(error, Mapping) else str(error)


def parse_exp_show(data: Any) -> list[Experiment]:
    """The rows of ``dvc exp show --json`` as experiments, in DVC's order (workspace first)."""
    if not isinstance(data, list) or not all(isinstance(r, Mapping) and "rev" in r for r in data):
        raise ExperimentsError("not the output of `dvc exp show --json` (a JSON list of rows with a 'rev' each); "
                               "make it with `dvc exp show --json > FILE`.")
    exps: list[Experiment] = []
    head = next((r["rev"] for r in data if r["rev"] != "workspace"), None)
    for row in data:
        params, metrics = _row_data(row)
        if row["rev"] == "workspace":
            exps.append(Experiment("workspace", "workspace", "workspace", params, metrics, baseline=head,
                                   error=_error_text(row.get("error"))))
            continue
        exps.append(Experiment(row.get("name") or row["rev"][:7], row["rev"], "commit", params, metrics,
                               error=_error_text(row.get("error"))))
        for exp in row.get("experiments") or []:
            executor = exp.get("executor") or {}
            for rev in exp.get("revs") or []:
                p, m = _row_data(rev)
                error = _error_text(rev.get("error"))
                # an experiment ref without executor info is a finished run (a failed one has no ref)
                state = executor.get("state") or ("failed" if error else "success")
                exps.append(Experiment(rev.get("name") or exp.get("name") or rev["rev"][:7], rev["rev"], state,
                                       p, m, baseline=row["rev"], error=error))
    return exps


def fill_full_metrics(exps: Sequence[Experiment], read: Callable[[str, str], Any],
                      paths: Iterable[str] | None = None) -> tuple[list[Experiment], list[str]]:
    """Each finished experiment's metrics files (``paths``, default all) read whole by ``read(rev, path)``
    (rev ``"workspace"``: the working tree), so lists such as CIs are there. Returns the experiments and one
    warning per file that could not be read (``read`` returned None); those keep what DVC showed.

    Every value DVC showed must be in the file unchanged: a difference means the file is not the one the
    experiment wrote (e.g. the workspace changed since ``dvc exp show`` ran), and is an error.
    """
    wanted = None if paths is None else set(paths)
    out, warnings = [], []
    for exp in exps:
        if not exp.finished:
            out.append(exp)
            continue
        metrics, full = dict(exp.metrics), set(exp.full)
        for path, shown in exp.metrics.items():
            if wanted is not None and path not in wanted:
                continue
            data = read(exp.rev, path)
            if data is None:
                warnings.append(f"could not read {path} at {exp.name} ({exp.rev[:7]}): its lists (CIs) are left out")
                continue
            whole = flatten(data)
            changed = [k for k, v in shown.items() if k not in whole or whole[k] != v]
            if changed:
                raise ExperimentsError(
                    f"{path} at {exp.name} ({exp.rev[:7]}) does not match `dvc exp show` for {changed[:5]}: "
                    "the file changed since (rerun the command), or the rev is not the experiment's commit.")
            metrics[path] = whole
            full.add(path)
        out.append(replace(exp, metrics=metrics, full=frozenset(full)))
    return out, warnings


# --------------------------------------------------------------------------------------------
# columns and criteria
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One number of a table: ``key`` (dotted) in ``source`` (a metrics file path, or PARAMS).

    ``ci``: the key of its ``[lo, hi]`` in the same file. ``then``: a second key shown as ``key → then`` (sweep
    tables). ``criterion``: what must hold in every experiment (spread tables): ``OP OPERAND`` with OP one of
    ``>= > <= < ==`` and OPERAND a number, or ``in [lo, hi]`` (inclusive); an operand may be ``{dotted.param}``,
    read from each experiment's params (so thresholds come from params.yaml, not from here).
    """
    header: str
    source: str
    key: str
    ci: str | None = None
    then: str | None = None
    criterion: str | None = None

    def keys(self) -> list[str]:
        return [k for k in (self.key, self.then, self.ci) if k]

    def csv_name(self, key: str) -> str:
        return key if self.source == PARAMS else f"{self.source}:{key}"


_CRITERION = re.compile(r"^\s*(>=|<=|==|>|<|in)\s*(\S.*?)\s*$")
_OPS: dict[str, Callable[[float, Any], bool]] = {
    ">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x, "<": lambda v, x: v < x,
    "==": lambda v, x: v == x, "in": lambda v, x: x[0] <= v <= x[1],
}


def _number(value: Any) -> float | None:
    """A finite float (booleans as 0/1), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def resolve_criterion(criterion: str, params: Mapping[str, Any]) -> tuple[str, Any]:
    """``(op, operand)`` with ``{param}`` references read from ``params``; operand a float, or (lo, hi) for ``in``."""
    match = _CRITERION.match(criterion)
    if not match:
        raise ExperimentsError(f"criterion {criterion!r}: write `>= 0.83`, `< 0`, `in [0.35, 0.65]` "
                               "or `>= {calibrate.thresholds.clear_gap_min_strict}` (a param).")
    op, text = match.groups()
    ref = re.fullmatch(r"\{([^{}]+)\}", text)
    if ref:
        if ref.group(1) not in params:
            raise ExperimentsError(f"criterion {criterion!r}: no param {ref.group(1)!r} in the experiment's params.")
        operand = params[ref.group(1)]
    else:
        try:
            operand = json.loads(text)
        except json.JSONDecodeError:
            raise ExperimentsError(f"criterion {criterion!r}: {text!r} is neither a number, [lo, hi] nor {{param}}.")
    if op == "in":
        if not (isinstance(operand, list) and len(operand) == 2 and all(_number(x) is not None for x in operand)):
            raise ExperimentsError(f"criterion {criterion!r}: `in` needs [lo, hi], got {operand!r}.")
        return op, (float(operand[0]), float(operand[1]))
    if _number(operand) is None:
        raise ExperimentsError(f"criterion {criterion!r}: {op} needs a number, got {operand!r}.")
    return op, float(operand)


def criterion_text(op: str, operand: Any) -> str:
    if op == "in":
        return f"in [{operand[0]:g}, {operand[1]:g}]"
    return f"{op} {operand:g}"


def criterion_holds(criterion: str, value: Any, params: Mapping[str, Any]) -> bool | None:
    """Whether ``value`` meets ``criterion`` (params resolve ``{param}``); None when value is not a number."""
    op, operand = resolve_criterion(criterion, params)
    number = _number(value)
    return None if number is None else bool(_OPS[op](number, operand))


# --------------------------------------------------------------------------------------------
# which experiments make the table
# --------------------------------------------------------------------------------------------
def _differs(a: Mapping[str, Any], b: Mapping[str, Any], param: str) -> list[str]:
    """Params keys (other than ``param`` and keys under it) whose values differ between a and b."""
    keys = set(a) | set(b)
    return sorted(k for k in keys if k != param and not k.startswith(param + ".") and a.get(k) != b.get(k))


@dataclass(frozen=True)
class Selection:
    rows: list[Experiment]          # finished runs, sorted by the sweep param
    left_out: list[Experiment]      # runs of the sweep that did not finish (failed, queued, running)
    other: list[Experiment]         # finished experiments that differ from their baseline in other params too


def _sort_key(param: str) -> Callable[[Experiment], tuple]:
    def key(exp: Experiment) -> tuple:
        value = exp.params.get(param)
        number = _number(value)
        return (value is None, number is None, number if number is not None else str(value), exp.name)
    return key


def select_sweep(exps: Sequence[Experiment], param: str) -> Selection:
    """The experiments of a sweep over ``param``: those whose params differ from their baseline commit's only in
    ``param``, with their baseline (the newest commit, and any other commit they were run from); the workspace
    only where it differs from the newest commit."""
    commits = {e.rev: e for e in exps if e.state == "commit"}
    head = next((e for e in exps if e.state == "commit"), None)
    members, left_out, other = [], [], []
    for exp in exps:
        if exp.state == "commit":
            continue
        base = commits.get(exp.baseline or "")
        if (exp.state == "workspace" and base is not None
                and exp.params == base.params and exp.metrics == base.metrics):
            continue        # the workspace is the newest commit: one row, the commit's
        if base is not None and _differs(exp.params, base.params, param):
            if exp.finished:
                other.append(exp)
            continue
        (members if exp.finished else left_out).append(exp)
    used = {e.baseline for e in members} | ({head.rev} if head is not None else set())
    # Baseline commits with the same params and metrics are one run, counted once (the newest: `dvc exp
    # show` lists commits newest first), or a seed would weigh as often as it has commits.
    kept: list[Experiment] = []
    for commit in commits.values():
        if commit.rev in used and commit.finished and not any(
                commit.params == k.params and commit.metrics == k.metrics for k in kept):
            kept.append(commit)
    members += kept
    if not any(param in e.params for e in members):
        sample = sorted({k for e in exps for k in e.params})
        raise ExperimentsError(f"sweep param {param!r} is in no experiment's params; "
                               f"{_near(param, sample)}params: {_listing(sample)}")
    return Selection(sorted(members, key=_sort_key(param)), left_out, other)


def _near(key: str, keys: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(map(repr, close))}? " if close else ""


def _listing(keys: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_columns(exps: Sequence[Experiment], columns: Sequence[Column]) -> None:
    """Every column key must be in at least one experiment: a key in none is a typo (or a renamed metric), and
    an error naming it and the keys that are there."""
    problems = []
    for col in columns:
        if col.source != PARAMS and not any(col.source in e.metrics for e in exps):
            files = sorted({f for e in exps for f in e.metrics})
            problems.append(f"column {col.header!r}: no experiment has metrics file {col.source!r}; "
                            f"{_near(col.source, files)}files: {_listing(files)}")
            continue
        for key in col.keys():
            if any(e.has(col.source, key) for e in exps):
                continue
            keys = sorted({k for e in exps
                           for k in (e.params if col.source == PARAMS else e.metrics.get(col.source, {}))})
            where = "params" if col.source == PARAMS else col.source
            hint = ""
            if col.source != PARAMS and not any(col.source in e.full for e in exps):
                hint = (" (`dvc exp show` leaves out lists such as CIs, and nulls, and this file was not read "
                        "whole at the experiments' commits: run in the repository the experiments belong to)")
            problems.append(f"column {col.header!r}: key {key!r} is in no experiment's {where}{hint}; "
                            f"{_near(key, keys)}keys there: {_listing(keys)}")
    if problems:
        raise ExperimentsError("\n".join(problems))


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------
def cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, list):
        return fmt_ci(value) if len(value) == 2 and all(_number(x) is not None for x in value) else str(value)
    return str(value)


def value_cell(exp: Experiment, col: Column) -> str:
    value = exp.value(col.source, col.key)
    # a param reads as written (β 0.1, 5, 500), a metric with 3 decimals
    text = f"{value:g}" if col.source == PARAMS and isinstance(value, float) else cell(value)
    if col.then:
        text += f" → {cell(exp.value(col.source, col.then))}"
    if col.ci and exp.has(col.source, col.key):
        ci = exp.value(col.source, col.ci)
        text += " " + (fmt_ci(ci) if isinstance(ci, list) else f"[{MISSING}]")
    return text


def _ci_bounds(exp: Experiment, col: Column) -> tuple[Any, Any]:
    ci = exp.value(col.source, col.ci) if col.ci else None
    return (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _note(selection: Selection) -> str:
    lines = []
    if selection.left_out:
        lines.append("Not in the table (not finished): "
                     + ", ".join(f"{e.name} ({e.state})" for e in selection.left_out) + ".")
    if selection.other:
        lines.append("Not in this sweep (other params differ from the baseline too): "
                     + ", ".join(e.name for e in selection.other) + ".")
    baselines = sorted({e.baseline or e.rev for e in selection.rows if e.state != "workspace"})
    if len(baselines) > 1:
        lines.append(f"Rows come from {len(baselines)} baseline commits ({', '.join(b[:7] for b in baselines)}): "
                     "code may differ between them.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------
def sweep_table(exps: Sequence[Experiment], param: str, columns: Sequence[Column], title: str = "") -> Table:
    """One row per finished experiment of the sweep over ``param``, sorted by its value."""
    selection = select_sweep(exps, param)
    check_columns(selection.rows, columns)
    display = frame(["experiment", *(c.header for c in columns)],
                    [[e.name, *(value_cell(e, c) for c in columns)] for e in selection.rows])
    header = ["experiment", "rev"]
    for c in columns:
        header += [c.csv_name(c.key)] + ([c.csv_name(c.then)] if c.then else [])
        header += [c.csv_name(c.ci) + ".lo", c.csv_name(c.ci) + ".hi"] if c.ci else []
    rows = []
    for e in selection.rows:
        row: list[Any] = [e.name, e.rev]
        for c in columns:
            row += [e.value(c.source, c.key)] + ([e.value(c.source, c.then)] if c.then else [])
            row += list(_ci_bounds(e, c)) if c.ci else []
        rows.append(row)
    status = f"{_runs(len(selection.rows))} of `dvc exp show` whose params differ from their baseline only in {param}."
    return Table(title or f"Sweep over {param}", status, display, note=_note(selection), data=frame(header, rows))


def _label(exp: Experiment, param: str, rows: Sequence[Experiment]) -> str:
    value = exp.params.get(param)
    label = f"{param}={value:g}" if isinstance(value, float) else f"{param}={cell(value)}"
    twins = [e for e in rows if e.params.get(param) == value]
    return f"{label} ({exp.name})" if len(twins) > 1 else label


def spread(values: Sequence[Any]) -> dict[str, Any]:
    """Mean, min and max of the numbers among ``values`` (None and non-numbers left out), and how many."""
    numbers = [n for n in map(_number, values) if n is not None]
    if not numbers:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(numbers), "mean": math.fsum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers)}


def holds_everywhere(col: Column, exps: Sequence[Experiment], labels: Sequence[str]) -> tuple[bool | None, str, str]:
    """``(holds, text, criterion as resolved)`` for ``col.criterion`` over the experiments: True when it holds in
    each, False when it fails in any (named with its value), None when no criterion or a value is missing."""
    if not col.criterion:
        return None, MISSING, MISSING
    resolved = {criterion_text(*resolve_criterion(col.criterion, e.params)) for e in exps}
    shown = resolved.pop() if len(resolved) == 1 else f"{col.criterion} (differs by experiment)"
    fails, missing = [], []
    for exp, label in zip(exps, labels):
        ok = criterion_holds(col.criterion, exp.value(col.source, col.key), exp.params)
        if ok is None:
            missing.append(label)
        elif not ok:
            fails.append(f"{label}: {cell(exp.value(col.source, col.key))}")
    if fails:
        return False, "no (" + "; ".join(fails) + ")", shown
    if missing:
        return None, "n/a (missing in " + ", ".join(missing) + ")", shown
    return True, "yes", shown


def spread_table(exps: Sequence[Experiment], param: str, columns: Sequence[Column], title: str = "") -> Table:
    """One row per headline number: its value (and CI) in each experiment of the sweep over ``param``, their mean
    and [min, max], and whether the row's criterion holds in every experiment."""
    selection = select_sweep(exps, param)
    rows_exp = selection.rows
    check_columns(rows_exp, columns)
    bad = [c.header for c in columns if c.then]
    if bad:
        raise ExperimentsError(f"columns {bad}: `then` is for sweep tables; give a spread table one key per row.")
    labels = [_label(e, param, rows_exp) for e in rows_exp]
    n = len(rows_exp)
    display_rows, data_rows = [], []
    for col in columns:
        values = [e.value(col.source, col.key) for e in rows_exp]
        stats = spread(values)
        holds, holds_text, shown = holds_everywhere(col, rows_exp, labels)
        mean = cell(stats["mean"]) + (f" (of {stats['n']})" if 0 < stats["n"] < n else "")
        display_rows.append([col.header, *(value_cell(e, col) for e in rows_exp), mean,
                             fmt_ci([stats["min"], stats["max"]]) if stats["n"] else MISSING, shown, holds_text])
        data_rows.append([col.header, col.source, col.key, *values,
                          *(b for e in rows_exp for b in _ci_bounds(e, col)),
                          stats["n"], stats["mean"], stats["min"], stats["max"],
                          None if shown == MISSING else shown, holds])
    display = frame(["number", *labels, "mean", "[min, max]", "criterion", f"holds in every {param}"], display_rows)
    data = frame(["number", "source", "key", *labels, *(f"{lab} {b}" for lab in labels for b in ("lo", "hi")),
                  "n", "mean", "min", "max", "criterion", "holds"], data_rows)
    status = (f"{_runs(n)} of `dvc exp show` whose params differ from their baseline only in {param}: "
              + ", ".join(f"{lab} ({e.name})" for lab, e in zip(labels, rows_exp)) + ".")
    return Table(title or f"Spread over {param}", status, display, note=_note(selection), data=data)


# --------------------------------------------------------------------------------------------
# the study's sweeps: their param and columns, in this one place
# --------------------------------------------------------------------------------------------
DPO = "metrics/arms/dpo.json"
CALIBRATION = "metrics/calibration.json"
LABELS = "metrics/labels.json"


def arm_metrics(arm: str) -> str:
    return f"metrics/arms/{arm}.json"


def beta_columns(params: Mapping[str, Any]) -> list[Column]:
    """The DPO arm against method.beta (the `dpo` arm reads it; `dpo_strong` pins its own β)."""
    return [
        Column("β", PARAMS, "method.beta"),
        Column("reduction", PARAMS, "method.reduction"),
        Column("probe FM-MSE before → after", DPO, "train.fm_mse_before", then="train.fm_mse_after"),
        Column("implicit accuracy", DPO, "train.implicit_accuracy"),
        Column("diverged", DPO, "diverged"),
        Column("judge strict win [CI]", DPO, "strict", ci="strict_wilson_ci"),
        Column("oracle win [CI]", DPO, "oracle_win.rate", ci="oracle_win.rate_ci"),
    ]


def _listed(params: Mapping[str, Any], block: str) -> list[str]:
    """The names under ``block`` in flattened params, in params.yaml order (``arms.dpo.kind`` -> dpo)."""
    names: list[str] = []
    for key in params:
        if key.startswith(block + "."):
            name = key[len(block) + 1:].split(".", 1)[0]
            if name not in names:
                names.append(name)
    return names


def seed_columns(params: Mapping[str, Any]) -> list[Column]:
    """The headline numbers whose spread over training seeds the study reports; the severities and arms are the
    baseline's (calibrate.severities, the arms block), so a profile with other ones gets its own rows."""
    severities = params.get("calibrate.severities") or []
    cols = [
        Column("clear-gap strict", CALIBRATION, "clear_gap.strict", ci="clear_gap.strict_wilson_ci",
               criterion=">= {calibrate.thresholds.clear_gap_min_strict}"),
        Column("base-vs-base decisive", CALIBRATION, "base_vs_base.decisive", ci="base_vs_base.decisive_ci",
               criterion="in {calibrate.thresholds.base_vs_base_decisive}"),
        *(Column(f"headroom {sev} strict", CALIBRATION, f"headroom.{sev}.strict", ci=f"headroom.{sev}.strict_wilson_ci")
          for sev in severities),
        Column("κ (train vs eval judge)", CALIBRATION, "agreement.kappa", ci="agreement.kappa_ci"),
        Column("judge–oracle agreement", CALIBRATION, "judge_oracle_agreement", ci="judge_oracle_agreement_ci"),
        Column("training signal: strict win high over low", LABELS, "strict_win_high_over_low", ci="strict_wilson_ci"),
    ]
    for arm in _listed(params, "arms"):
        # the study's decision rule: an arm "meets the bar" at strict >= report.bar; the row says
        # whether "it does not" holds in every seed
        cols += [Column(f"{arm} judge strict win", arm_metrics(arm), "strict", ci="strict_wilson_ci",
                        criterion="< {report.bar}" if "report.bar" in params else None),
                 Column(f"{arm} oracle win", arm_metrics(arm), "oracle_win.rate", ci="oracle_win.rate_ci")]
    return cols


def reference_columns(params: Mapping[str, Any]) -> list[Column]:
    """The reference-aware eval judge beside the reference-free one: the calibration controls, the
    judge's position answering, and every arm's judge win next to its oracle win."""
    severities = params.get("calibrate.severities") or []
    cols = [
        Column("eval judge sees the input image", PARAMS, "judges.eval.reference"),
        Column("clear-gap strict", CALIBRATION, "clear_gap.strict", ci="clear_gap.strict_wilson_ci"),
        Column("base-vs-base decisive", CALIBRATION, "base_vs_base.decisive", ci="base_vs_base.decisive_ci"),
        *(Column(f"headroom {sev} strict", CALIBRATION, f"headroom.{sev}.strict", ci=f"headroom.{sev}.strict_wilson_ci")
          for sev in severities),
        Column("judge–oracle agreement", CALIBRATION, "judge_oracle_agreement", ci="judge_oracle_agreement_ci"),
        # trap 1 of the study: position answering when shown many images
        Column("prefer-first rate", CALIBRATION, "eval_judge_all_pairs.prefer_first_rate",
               ci="eval_judge_all_pairs.prefer_first_rate_ci"),
        Column("flip rate", CALIBRATION, "eval_judge_all_pairs.flip_rate", ci="eval_judge_all_pairs.flip_rate_ci"),
    ]
    for arm in _listed(params, "arms"):
        cols += [Column(f"{arm} judge strict win", arm_metrics(arm), "strict", ci="strict_wilson_ci"),
                 Column(f"{arm} oracle win", arm_metrics(arm), "oracle_win.rate", ci="oracle_win.rate_ci")]
    return cols


@dataclass(frozen=True)
class Sweep:
    param: str
    columns: Callable[[Mapping[str, Any]], list[Column]]    # from the newest baseline commit's params
    table: Callable[..., Table]                              # sweep_table or spread_table
    title: str


SWEEPS: dict[str, Sweep] = {
    "beta": Sweep("method.beta", beta_columns, sweep_table, "DPO β sweep"),
    "seeds": Sweep("train_seed", seed_columns, spread_table, "Spread over training seeds"),
    "reference": Sweep("judges.eval.reference", reference_columns, sweep_table,
                       "Reference-aware eval judge (ablation) beside the reference-free one"),
}


def study_table(name: str, exps: Sequence[Experiment], param: str | None = None) -> Table:
    """The table of the study's sweep ``name`` (a key of SWEEPS) from parsed (and filled) experiments."""
    if name not in SWEEPS:
        raise ExperimentsError(f"no sweep {name!r}; sweeps: {', '.join(SWEEPS)}")
    sweep = SWEEPS[name]
    base = next((e for e in exps if e.state == "commit"), None) or next(iter(exps), None)
    if base is None:
        raise ExperimentsError("`dvc exp show` listed no rows: run it in the repository root.")
    return sweep.table(exps, param or sweep.param, sweep.columns(base.params), title=sweep.title)


def metric_files(name: str, exps: Sequence[Experiment]) -> set[str]:
    """The metrics files the sweep's columns read (the ones worth reading whole)."""
    base = next((e for e in exps if e.state == "commit"), None) or next(iter(exps), None)
    return {c.source for c in SWEEPS[name].columns(base.params if base else {}) if c.source != PARAMS}


# --------------------------------------------------------------------------------------------
# I/O for the CLI: run `dvc exp show`, read a metrics file at a rev
# --------------------------------------------------------------------------------------------
def run_exp_show(cwd: Path, all_commits: bool = False) -> Any:
    """``dvc exp show --json`` (this Python's DVC) in ``cwd``, parsed. ``all_commits``: experiments of every
    commit, not only of the newest (experiments run before the latest commit are not shown without it)."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExperimentsError(f"`dvc exp show --json` failed in {cwd} (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ExperimentsError(f"`dvc exp show --json` printed no JSON ({exc}): {proc.stdout[:500]!r}")


def git_reader(cwd: Path) -> Callable[[str, str], Any]:
    """``read(rev, path)`` for :func:`fill_full_metrics`: the working tree's file for ``workspace``, else
    ``git show rev:path``; None where it cannot be read or parsed."""
    def read(rev: str, path: str) -> Any:
        try:
            if rev == "workspace":
                text = (cwd / path).read_text()
            else:
                proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
                if proc.returncode != 0:
                    return None
                text = proc.stdout
            return json.loads(text)
        except (OSError, json.JSONDecodeError):
            return None
    return read


def table_from_dvc(name: str, cwd: Path, exp_show: Any | None = None, all_commits: bool = False,
                   param: str | None = None) -> tuple[Table, list[str]]:
    """The sweep's table from ``exp_show`` (parsed ``dvc exp show --json``; None: run it in ``cwd``), with its
    metrics files read whole from git in ``cwd``; and the warnings (files that could not be read)."""
    if name not in SWEEPS:
        raise ExperimentsError(f"no sweep {name!r}; sweeps: {', '.join(SWEEPS)}")
    exps = parse_exp_show(run_exp_show(cwd, all_commits) if exp_show is None else exp_show)
    exps, warnings = fill_full_metrics(exps, git_reader(cwd), metric_files(name, exps))
    try:
        return study_table(name, exps, param), warnings
    except ExperimentsError as exc:
        if not warnings:
            raise
        raise ExperimentsError("\n".join([str(exc), *warnings])) from exc
