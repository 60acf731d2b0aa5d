"""Drivers of the `judge-train-labels` and `calibrate` stages (the stage CLIs only load judges and call these).

Each driver takes ready backends (the hf judge, or a fake one in tests), judges its pairs through
:func:`judge3d.judges.protocol.run_pairs` (resumable: logged queries are not asked again) and
writes its raw logs, derived files and metrics. Metrics come from
:mod:`judge3d.report.judge_metrics`, the same functions ``verify`` runs on the cached logs.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from judge3d.core.config import require
from judge3d.core.io import read_jsonl, write_json, write_jsonl
from judge3d.world.degrade import require_severities
from judge3d.judges.pairing import (FLAGGED_LOG, base_vs_base_pairs, clear_gap_pairs, headroom_pairs, iid_pairs,
                                    kept_pairs, partition_flagged, train_label_pairs)
from judge3d.judges.protocol import Backend, pair_verdicts, run_pairs
from judge3d.judges.references import with_references
from judge3d.report.confidence import COVERAGE_CSV, RELIABILITY_CSV
from judge3d.report.judge_metrics import (calibration_metrics, confidence_csv_rows, flip_vs_gap_csv_rows,
                                          labels_metrics)

LABELS_LOG = "verdicts.jsonl"
IID_LOG = "iid_verdicts.jsonl"
TRAIN_PAIRS = "train_pairs.jsonl"
CLEAR_GAP_SET = "clear_gap"   # the clear-gap-meshes stage's set (data/generated/, data/montages/)
JUDGE_ROLES = ("eval", "train")
PLOT_COLUMNS = ("bin", "gap_lo", "gap_hi", "gap_mid", "mean_gap", "n", "flips", "flip_rate", "flip_rate_lo",
                "flip_rate_hi")


def batch_size(params: Mapping[str, Any], block: str) -> int:
    return require(params, f"{block}.batch_size", int, check=lambda v: v >= 1)


def run_judge_train_labels(backend: Backend, montage_manifest: str | Path, out_dir: str | Path,
                           metrics_path: str | Path, params: Mapping[str, Any], prompt: str,
                           show_progress: bool = True) -> dict[str, Any]:
    """Training judge on every (high, low) train pair and every i.i.d. pair, both orders.

    Writes <out_dir>/verdicts.jsonl, iid_verdicts.jsonl (raw logs), train_pairs.jsonl (the
    swap-consistent pairs as winner/loser rows) and ``metrics_path``; returns the metrics.
    """
    out_dir = Path(out_dir)
    rows = read_jsonl(montage_manifest)
    source = str(montage_manifest)
    bs = batch_size(params, "labels")
    # A pair with a blank or clipped montage is never judged: it is recorded in flagged.jsonl (written
    # first, so a kill keeps it) and counted in the metrics as n_flagged.
    label_pairs, flagged = partition_flagged(train_label_pairs(rows, source=source), rows, control="high_vs_low")
    same_pairs, iid_flagged = partition_flagged(iid_pairs(rows, source=source), rows, control="iid")
    write_jsonl(out_dir / FLAGGED_LOG, flagged + iid_flagged)
    if not label_pairs:
        raise ValueError(f"{montage_manifest}: every one of the {len(flagged)} (high, low) pairs has a blank or "
                         f"clipped montage (listed in {out_dir / FLAGGED_LOG}), so there is nothing to label. "
                         "The generator makes empty meshes: train it longer (base.train.steps) and rerun.")
    label_rows = run_pairs(backend, label_pairs, out_dir / LABELS_LOG, prompt, bs, show_progress=show_progress)
    iid_rows = run_pairs(backend, same_pairs, out_dir / IID_LOG, prompt, bs, show_progress=show_progress)
    write_jsonl(out_dir / TRAIN_PAIRS, kept_pairs(pair_verdicts(label_rows), rows))
    metrics = labels_metrics(label_rows, iid_rows, params, flagged=flagged + iid_flagged)
    write_json(metrics_path, metrics)
    return metrics


def calibration_pairs(montages_dir: str | Path, severities: Sequence[str],
                      flagged: list[dict[str, Any]] | None = None) -> dict[str, list]:
    """Control name -> pairs to judge, from <montages_dir>/heldout_clean, clear_gap (the clean outputs'
    degraded copies) and heldout_<severity> manifests.

    Pairs with a flagged montage (pairing.MONTAGE_FLAGS) are left out; pass ``flagged`` (a list) to
    receive one record per such pair, tagged with its control."""
    montages_dir = Path(montages_dir)
    clean_path = montages_dir / "heldout_clean" / "manifest.jsonl"
    corrupted_path = montages_dir / CLEAR_GAP_SET / "manifest.jsonl"
    clean, corrupted = read_jsonl(clean_path), read_jsonl(corrupted_path)
    pairs = {"clear_gap": clear_gap_pairs(clean, corrupted, clean_source=str(clean_path),
                                          corrupted_source=str(corrupted_path))}
    manifests = {"clear_gap": [clean, corrupted], "base_vs_base": [clean]}
    for severity in severities:
        sev_path = montages_dir / f"heldout_{severity}" / "manifest.jsonl"
        degraded = read_jsonl(sev_path)
        pairs[f"headroom_{severity}"] = headroom_pairs(clean, degraded, severity,
                                                       clean_source=str(clean_path), degraded_source=str(sev_path))
        manifests[f"headroom_{severity}"] = [clean, degraded]
    pairs["base_vs_base"] = base_vs_base_pairs(clean, source=str(clean_path))
    out = {}
    for name, control_pairs in pairs.items():
        out[name], set_aside = partition_flagged(control_pairs, *manifests[name], control=name)
        if flagged is not None:
            flagged.extend(set_aside)
    return out


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plot data as CSV text (None -> empty cell); verify compares these files byte for byte."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buf.getvalue()


def calibration_plot_texts(metrics: Mapping[str, Any]) -> dict[str, str]:
    """File name (under metrics/plots/) -> CSV text of every plot the calibrate stage writes: the flip
    rate against the oracle gap, and each judge's reliability and coverage curves."""
    texts = {"flip_vs_gap.csv": csv_text(flip_vs_gap_csv_rows(metrics), PLOT_COLUMNS)}
    for role in JUDGE_ROLES:
        texts[f"reliability_{role}.csv"] = csv_text(confidence_csv_rows(metrics, role, "reliability"), RELIABILITY_CSV)
        texts[f"coverage_{role}.csv"] = csv_text(confidence_csv_rows(metrics, role, "coverage"), COVERAGE_CSV)
    return texts


def write_calibration_plots(plots_dir: str | Path, metrics: Mapping[str, Any]) -> None:
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, text in calibration_plot_texts(metrics).items():
        (plots_dir / name).write_text(text)


def run_calibrate(eval_backend: Backend, train_backend: Backend, montages_dir: str | Path, out_dir: str | Path,
                  metrics_path: str | Path, plots_dir: str | Path, params: Mapping[str, Any], prompt: str,
                  show_progress: bool = True, *, eval_prompt: str | None = None,
                  eval_references: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Both judges on every control (clear-gap, headroom per severity, base-vs-base): the eval judge's
    verdicts are the controls; the training judge's give kappa between the two and its own
    reliability. Logs: <out_dir>/eval_<control>.jsonl and train_<control>.jsonl.

    ``prompt`` is both judges' unless ``eval_prompt`` is given: a reference-aware eval judge is asked
    with ``eval_prompt`` and each object's reference image (``eval_references``, object id -> image)."""
    out_dir = Path(out_dir)
    severities = require_severities(params, "calibrate.severities")
    bs = batch_size(params, "calibrate")
    flagged: list[dict[str, Any]] = []
    pairs = calibration_pairs(montages_dir, severities, flagged)
    # Written before judging: the metrics (and verify) count the set-aside pairs from this file.
    write_jsonl(out_dir / FLAGGED_LOG, flagged)
    eval_rows = {name: run_pairs(eval_backend, with_references(control_pairs, eval_references),
                                 out_dir / f"eval_{name}.jsonl", eval_prompt or prompt, bs, show_progress=show_progress)
                 for name, control_pairs in pairs.items()}
    train_rows = {name: run_pairs(train_backend, control_pairs, out_dir / f"train_{name}.jsonl", prompt, bs,
                                  show_progress=show_progress)
                  for name, control_pairs in pairs.items()}
    metrics = calibration_metrics(eval_rows, train_rows, params, flagged=flagged)
    write_json(metrics_path, metrics)
    write_calibration_plots(plots_dir, metrics)
    return metrics


def load_judge(params: Mapping[str, Any], role: str, model: str | None = None):
    """The judge of ``role`` ('train' | 'eval'): in-process (hf, with dtype/device/attention/batch from
    params ``judge.*``); with ``JUDGE3D_EXECUTOR=ray``, the same judge on Ray replicas, one per GPU
    (:class:`judge3d.pipeline.judge_replica.RayJudge`: same answers); or, where ``judge.servers.<role>`` names
    an OpenAI-compatible server, a client of the model it serves as ``judges.<role>.model``
    (concurrency and retries from ``judge.client``; the server does its own scaling, so the executor
    does not apply)."""
    server = require(params, f"judge.servers.{role}", (str, type(None)), check=lambda v: v is None or bool(v.strip()),
                     hint="the server's base URL, e.g. http://127.0.0.1:8000/v1, or null to load the judge in-process")
    if server is not None:
        from judge3d.judges.openai_client import OpenAIJudge

        get = lambda key, kind, check: require(params, f"judge.client.{key}", kind, check=check)  # noqa: E731
        return OpenAIJudge(server, model or require(params, f"judges.{role}.model", str),
                           workers=get("workers", int, lambda v: v >= 1),
                           max_retries=get("max_retries", int, lambda v: v >= 0),
                           timeout=get("timeout_s", float, lambda v: v > 0),
                           top_logprobs=get("top_logprobs", int, lambda v: v >= 2))
    from judge3d.core.ray_executor import use_ray
    from judge3d.pipeline.judge_replica import RayJudge, load_hf_judge

    if use_ray():
        return RayJudge.for_role(params, role, model)
    return load_hf_judge(params, role, model)
