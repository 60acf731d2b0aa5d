"""Per-arm metrics: the evaluation judge's verdicts on (arm output, base output) pairs, the oracle's
view of the same meshes, and the arm's training probes, in one JSON-ready dict.

Inputs are the raw files only (see :class:`judge3d.adapt.arms.ArmPaths`): the eval-judge log (x = arm, y = base), the
arm's held-out manifest, the base's held-out manifest of the same regime, and the arm's
``train_metrics.json``. The stage ``stages/arm_metrics.py`` and ``verify`` both call
:func:`arm_metrics_from_files`, so a recomputation is the same code path as the original.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from judge3d.adapt.arms import ArmSpec, arm_paths, arm_spec, arm_specs
from judge3d.core import stats
from judge3d.core.config import ParamsError, require
from judge3d.core.io import read_json, read_jsonl
from judge3d.judges.pairing import montage_flags
from judge3d.judges.protocol import summarize
from judge3d.judges.verdict_log import check_row, read_log

# Rows of the arm manifest are paired with base rows on these fields (same object, regime, seed).
PAIR_FIELDS = ("object_id", "regime", "seed", "budget")  # the base set also holds other budgets with the same seed


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportSettings:
    bar: float
    n_boot: int
    seed: int
    gallery_size: int
    thumb_px: int
    arms: dict[str, ArmSpec]         # the arm registry, in study-table order
    oracle_keys: dict[str, str]      # metric name -> manifest field (dotted path allowed)
    validity_keys: dict[str, str]    # watertight / components / degenerate_faces -> manifest field
    input_image_key: str
    train_keys: dict[str, str]       # train_metrics.json field names (dotted path allowed)


def report_settings(params: Mapping[str, Any]) -> ReportSettings:
    """The ``report`` block of params.yaml, checked; errors name the key."""
    bar = require(params, "report.bar", float, check=lambda v: 0.0 < v <= 1.0)
    n_boot = require(params, "report.n_boot", int, check=lambda v: v >= 100,
                     hint="Use >= 100 bootstrap replicates (2000 is the default).")
    seed = require(params, "report.seed", int)
    gallery = require(params, "report.gallery_size", int, check=lambda v: v >= 0)
    thumb = require(params, "report.thumb_px", int, check=lambda v: 16 <= v <= 1024)
    arms = {spec.arm: spec for spec in arm_specs(params)}
    keys = {}
    for block in ("oracle", "validity", "train"):
        node = require(params, f"report.keys.{block}", dict)
        keys[block] = {str(k): require(params, f"report.keys.{block}.{k}", str) for k in node}
    if "score" not in keys["oracle"]:
        raise ParamsError("params.yaml: missing key 'report.keys.oracle.score' (the manifest field of the scalar oracle score).")
    for k in ("diverged", "fm_mse_before", "fm_mse_after", "feat_mse_before", "feat_mse_after"):
        if k not in keys["train"]:
            raise ParamsError(f"params.yaml: missing key 'report.keys.train.{k}' (its train_metrics.json field).")
    return ReportSettings(bar=bar, n_boot=n_boot, seed=seed, gallery_size=gallery, thumb_px=thumb, arms=arms,
                          oracle_keys=keys["oracle"], validity_keys=keys["validity"],
                          input_image_key=require(params, "report.keys.input_image", str), train_keys=keys["train"])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def field(row: Mapping[str, Any], dotted: str) -> Any:
    """``row[a][b]`` for ``'a.b'``; None where any part is absent."""
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / NaN / non-numeric (bool counts as 0/1)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _ci(lo: float, hi: float) -> list[float | None]:
    return [stats.clean(lo), stats.clean(hi)]


def check_log_rows(rows: Sequence[Mapping[str, Any]], source: str) -> list[str]:
    """``verdict_log.check_row`` over a log: one line per bad row (tampered p_first/verdict/key)."""
    problems = []
    for i, row in enumerate(rows):
        for problem in check_row(dict(row)):
            problems.append(f"{source} row {i + 1} (pair {row.get('pair_id')}, order {row.get('order')}): {problem}")
    return problems


def pair_manifests(arm_rows: Sequence[Mapping[str, Any]], base_rows: Sequence[Mapping[str, Any]],
                   regime: str, arm: str) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(arm row, base row) per arm mesh, matched on object, regime and seed; sorted by object id."""
    if not arm_rows:
        raise ValueError(f"arm {arm}: its held-out manifest is empty; run judge-eval@{arm}.")
    for name, rows in (("arm", arm_rows), ("base", base_rows)):
        bad = sorted({str(r.get("regime")) for r in rows} - {regime})
        if bad:
            raise ValueError(f"arm {arm}: the {name} manifest holds regime(s) {bad}, expected only {regime!r}; "
                             f"check arms.{arm}.severity against the arm's params.")
    base_by_key: dict[tuple, Mapping[str, Any]] = {}
    for r in base_rows:
        key = tuple(r.get(k) for k in PAIR_FIELDS)
        if key in base_by_key:
            raise ValueError(f"base manifest ({regime}): two rows for (object, regime, seed, budget) = {key}.")
        base_by_key[key] = r
    pairs, seen = [], set()
    for r in arm_rows:
        key = tuple(r.get(k) for k in PAIR_FIELDS)
        if key in seen:
            raise ValueError(f"arm {arm}: two manifest rows for (object, regime, seed) = {key}.")
        seen.add(key)
        if key not in base_by_key:
            raise ValueError(f"arm {arm}: mesh for (object, regime, seed, budget) = {key} has no base output with the same "
                             f"object, regime and seed in the base held-out manifest; rerun generate / judge-eval@{arm}.")
        pairs.append((r, base_by_key[key]))
    return sorted(pairs, key=lambda ab: (str(ab[0].get("object_id")), str(ab[0].get("seed"))))


def _paired_delta(pairs, key: str, settings: ReportSettings, kind: str) -> dict[str, Any]:
    """Mean arm − base of one manifest field over paired meshes, with a bootstrap CI over objects.

    Pairs where either side lacks the value are left out and counted in ``n_missing`` (flagged in
    the table), never imputed.
    """
    a, b, groups = [], [], []
    missing = 0
    for arm_row, base_row in pairs:
        va, vb = _number(field(arm_row, key)), _number(field(base_row, key))
        if va is None or vb is None:
            missing += 1
            continue
        a.append(va)
        b.append(vb)
        groups.append(str(arm_row.get("object_id")))
    out: dict[str, Any] = {"field": key, "n": len(a), "n_missing": missing}
    if not a:
        out.update({"delta": None, "delta_ci": [None, None], "arm_mean": None, "base_mean": None})
        return out
    delta, lo, hi = stats.paired_diff_ci(a, b, groups, n_boot=settings.n_boot, seed=settings.seed)
    out.update({"delta": stats.clean(delta), "delta_ci": _ci(lo, hi),
                "arm_mean": stats.clean(float(np.mean(a))), "base_mean": stats.clean(float(np.mean(b)))})
    if kind == "share":
        out["unit"] = "share"
    return out


def oracle_win(pairs, score_key: str, settings: ReportSettings) -> dict[str, Any]:
    """How often the arm's mesh is truly better than the base's by the oracle score.

    ``rate`` = wins / n (ties count as not a win, like the judge's strict rate); ties and losses
    are reported next to it. Pairs missing a score on either side are counted in ``n_missing``.
    """
    outcomes, groups = [], []
    missing = 0
    for arm_row, base_row in pairs:
        va, vb = _number(field(arm_row, score_key)), _number(field(base_row, score_key))
        if va is None or vb is None:
            missing += 1
            continue
        outcomes.append(1 if va > vb else (-1 if va < vb else 0))
        groups.append(str(arm_row.get("object_id")))
    out: dict[str, Any] = {"n": len(outcomes), "n_missing": missing,
                           "wins": sum(o == 1 for o in outcomes), "losses": sum(o == -1 for o in outcomes),
                           "ties": sum(o == 0 for o in outcomes)}
    if not outcomes:
        out.update({"rate": None, "rate_ci": [None, None]})
        return out
    rate, lo, hi = stats.mean_ci([float(o == 1) for o in outcomes], groups, n_boot=settings.n_boot, seed=settings.seed)
    out.update({"rate": stats.clean(rate), "rate_ci": _ci(lo, hi)})
    return out


def _train_block(train: Mapping[str, Any], spec: ArmSpec, settings: ReportSettings) -> dict[str, Any]:
    keys = settings.train_keys
    src = f"data/arms/{spec.arm}/train_metrics.json"

    def get(name: str, required: bool) -> Any:
        value = field(train, keys[name]) if name in keys else None
        if required and value is None:
            raise ValueError(f"{src}: no {keys.get(name, name)!r} (report.keys.train.{name}); the train-adapter@"
                             f"{spec.arm} stage must record it.")
        return value

    severity = train.get("severity")
    if severity is not None and severity != spec.regime:
        raise ValueError(f"{src}: the arm was trained for severity {severity!r} but params say {spec.regime!r} "
                         f"(arms.{spec.arm}); rerun train-adapter@{spec.arm}.")
    diverged = get("diverged", True)
    if not isinstance(diverged, bool):
        raise ValueError(f"{src}: {keys['diverged']!r} must be true/false, got {diverged!r}.")
    trained = train.get("trained", True) is not False  # an arm with no training data is flagged untrained
    beta = field(train, keys["beta"]) if "beta" in keys else None
    if beta is not None and "beta" in spec.settings and beta != spec.settings["beta"]:
        raise ValueError(f"{src}: the arm was trained with β={beta} but params say β={spec.settings['beta']}; "
                         f"rerun train-adapter@{spec.arm}.")
    out: dict[str, Any] = {"diverged": diverged, "trained": trained}
    is_repair = spec.family == "repair"
    for name in ("fm_mse_before", "fm_mse_after", "feat_mse_before", "feat_mse_after"):
        required = trained and ((name.startswith("feat") and is_repair) or (name.startswith("fm") and not is_repair))
        # a diverged run may end with a non-finite probe, which JSON stores as null
        required = required and not (name == "fm_mse_after" and diverged)
        value = get(name, required)
        number = _number(value)
        if value is not None and number is None and not (name == "fm_mse_after" and diverged):
            raise ValueError(f"{src}: {keys[name]!r} = {value!r} is not a finite number.")
        out[name] = stats.clean(number) if number is not None else None
    for name in sorted(set(keys) - set(out) - {"diverged"}):
        value = field(train, keys[name])
        number = _number(value) if not isinstance(value, bool) else None
        out[name] = stats.clean(number) if number is not None else (value if isinstance(value, (bool, str)) else None)
    return out


# --------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------
def arm_metrics(verdict_rows: Sequence[Mapping[str, Any]], arm_manifest: Sequence[Mapping[str, Any]],
                base_manifest: Sequence[Mapping[str, Any]], train_metrics: Mapping[str, Any],
                params: Mapping[str, Any], arm: str, flagged: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Every number of one arm's study-table row (see module doc). Deterministic in its inputs.

    ``flagged``: judge-eval's records of pairs set aside unjudged for a blank or clipped montage
    (data/evals/<arm>/flagged.jsonl); an arm row whose own montage is flagged counts too. They are
    reported as ``n_flagged`` (+ ``flagged_objects``), never judged; the oracle columns keep them.
    """
    settings = report_settings(params)
    spec = arm_spec(params, arm)
    flagged_objects = {str(rec["object_id"]) for rec in flagged}
    flagged_objects |= {str(r.get("object_id")) for r in arm_manifest if montage_flags(dict(r))}
    # rows for a flagged pair can only come from an earlier run, before its montage was flagged
    verdict_rows = [r for r in verdict_rows if str(r["object_id"]) not in flagged_objects]
    if not verdict_rows and flagged_objects:
        raise ValueError(f"arm {arm}: every pair has a flagged montage (blank or clipped: "
                         f"{sorted(flagged_objects)[:5]}...), so the eval judge was asked nothing; see "
                         f"data/evals/{arm}/flagged.jsonl and the render flags in data/evals/{arm}/manifest.jsonl.")
    if not verdict_rows:
        raise ValueError(f"arm {arm}: the eval-judge log holds no rows; run judge-eval@{arm}.")
    bad = check_log_rows(verdict_rows, f"data/evals/{arm}/verdicts.jsonl")
    if bad:
        raise ValueError(f"arm {arm}: the verdict log fails its own checks (edited or corrupt rows):\n  "
                         + "\n  ".join(bad[:10]))
    pairs = pair_manifests(arm_manifest, base_manifest, spec.regime, arm)
    manifest_objects = {str(a.get("object_id")) for a, _ in pairs}
    judged_objects = {str(r["object_id"]) for r in verdict_rows}
    extra = sorted(judged_objects - manifest_objects)
    if extra:
        raise ValueError(f"arm {arm}: the verdict log judges objects not in the arm's manifest: {extra[:5]}; "
                         f"log and manifest come from different runs of judge-eval@{arm}.")

    judge = summarize([dict(r) for r in verdict_rows], n_boot=settings.n_boot, seed=settings.seed)
    train = _train_block(train_metrics, spec, settings)
    diverged = train["diverged"]
    strict = judge["strict"]

    out: dict[str, Any] = {
        "arm": arm, "display": spec.display, "adapts": spec.adapts_label, "regime": spec.regime,
        "family": spec.family, "judge_id": verdict_rows[0]["judge_id"],
        "n_manifest": len(pairs), "n_unjudged": len(manifest_objects - judged_objects - flagged_objects),
        # set aside for a blank or clipped montage: not in n, W, L, F (shown beside them in the report)
        "n_flagged": len(flagged_objects & manifest_objects), "flagged_objects": sorted(flagged_objects & manifest_objects),
        **judge,
        "bar": settings.bar,
        # A diverged arm never meets the bar, whatever the judge says (docs/protocol.md#probe-and-divergence).
        "meets_bar": bool(strict is not None and strict >= settings.bar and not diverged),
        "diverged": diverged,
        "geom": {name: _paired_delta(pairs, key, settings, "mean") for name, key in sorted(settings.oracle_keys.items())},
        "validity": {name: _paired_delta(pairs, key, settings, "share" if name == "watertight" else "mean")
                     for name, key in sorted(settings.validity_keys.items())},
        "oracle_win": oracle_win(pairs, settings.oracle_keys["score"], settings),
        "train": train,
    }
    # Pairs on a user's images (world.images_dir) have no ground truth: the report says so. Set only
    # then, so a procedural run's metrics file is unchanged.
    no_oracle = sum(1 for a, b in pairs if a.get("oracle") is False or b.get("oracle") is False)
    if no_oracle:
        out["n_no_oracle"] = no_oracle
    return out


def load_arm_inputs(root: str | Path, arm: str, params: Mapping[str, Any]):
    """(verdict rows, arm manifest, base manifest, train metrics) from the repo's raw files."""
    paths = arm_paths(arm, arm_spec(params, arm).regime, root)
    for path, fix in ((paths.manifest, f"run judge-eval@{arm} (or dvc pull)"),
                      (paths.base_manifest, "run the generate stage (or dvc pull)"),
                      (paths.train_metrics, f"run train-adapter@{arm} (or dvc pull)")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {fix}.")
    rows = read_log(paths.verdicts)
    return rows, read_jsonl(paths.manifest), read_jsonl(paths.base_manifest), read_json(paths.train_metrics)


def load_flagged(root: str | Path, arm: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """judge-eval's flagged.jsonl for ``arm`` ([] for a run from before montage flags were read)."""
    from judge3d.judges.pairing import FLAGGED_LOG

    path = arm_paths(arm, arm_spec(params, arm).regime, root).eval_dir / FLAGGED_LOG
    return read_jsonl(path) if path.is_file() else []


def arm_metrics_from_files(root: str | Path, arm: str, params: Mapping[str, Any]) -> dict[str, Any]:
    rows, manifest, base, train = load_arm_inputs(root, arm, params)
    return arm_metrics(rows, manifest, base, train, params, arm, flagged=load_flagged(root, arm, params))
