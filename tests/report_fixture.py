"""A crafted mini repo for the report / verify / HTML tests: real protocol log rows (run_pairs with a
scripted backend), manifests, train metrics and calibration logs; no model, no pipeline run.

The scripted backend answers from a per-image quality table plus an optional position bias: it is a
test double that makes known verdicts, not a judge.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from judge3d.adapt.arms import arm_names, arm_specs
from judge3d.core.io import write_json, write_jsonl
from judge3d.judges.protocol import Pair, run_pairs
from judge3d.report.judge_metrics import calibration_metrics_from_dir, labels_metrics_from_logs

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Which normal-map montage shows the better 3D shape? Answer A or B."
N_OBJECTS = 6


class ScriptedBackend:
    """p_first = sigmoid(scale * (q_first - q_second) + bias); q from a path -> quality table."""

    def __init__(self, judge_id: str, quality: dict[str, float], scale: float = 6.0, bias: float = 0.0):
        self.judge_id = judge_id
        self.quality = quality
        self.scale = scale
        self.bias = bias

    def p_first(self, pairs, prompt):
        return np.array([1.0 / (1.0 + math.exp(-(self.scale * (self.quality[a] - self.quality[b]) + self.bias)))
                         for a, b in pairs])


def _png(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    level = int(round(40 + 200 * max(0.0, min(1.0, value))))
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = level
    rgb[8:24, 8:24, 2] = 255 - level
    Image.fromarray(rgb).save(path)


def _params(tmp: Path, n_boot: int, extra_arms: dict | None) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["arms"].update(extra_arms or {})
    params["report"]["n_boot"] = n_boot
    params["report"]["gallery_size"] = 3
    params["calibrate"]["bootstrap"]["n"] = n_boot
    params["labels"]["bootstrap"]["n"] = n_boot
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return params


def _mesh_row(oid: str, regime: str, who: str, score: float, montage: str, image: str, oracle: bool = True) -> dict:
    row = {"object_id": oid, "regime": regime, "seed": 0, "candidate": f"{who}:{oid}:{regime}",
           "mesh_path": f"data/meshes/{who}/{regime}/{oid}.ply", "montage_path": montage, "image_path": image,
           "empty": False, "oracle_score": round(score, 6), "iou": round(score * 0.9, 6),
           "fscore": round(score, 6), "watertight": who == "base" or score > 0.5, "n_components": 1 if score > 0.4 else 2,
           "n_degenerate_faces": 0}
    if not oracle:  # a user's image (world.images_dir): the generate stage writes null oracle fields
        row.update({"oracle_score": None, "iou": None, "fscore": None, "oracle": False})
    return row


def _score(q: float, oracle: bool) -> float | None:
    return round(q, 6) if oracle else None


def build_repo(tmp: Path, *, arm_gain: dict[str, float] | None = None, diverged: tuple[str, ...] = (),
               calibration_ok: bool = True, n_boot: int = 200, extra_arms: dict | None = None,
               oracle: bool = True) -> dict:
    """Write the crafted repo under ``tmp``; return its params. ``arm_gain[arm]`` is added to the
    arm meshes' quality over the base's (judge and oracle see the same quality); ``extra_arms`` are
    added to params' arms block. ``oracle=False``: inputs are a user's images, so every manifest row
    and judged pair has null oracle values (the judge still sees the quality)."""
    tmp.mkdir(parents=True, exist_ok=True)
    params = _params(tmp, n_boot, extra_arms)
    arm_gain = arm_gain or {}
    quality: dict[str, float] = {}
    regimes = sorted({spec.regime for spec in arm_specs(params)} | {"clean"})
    base_q: dict[tuple[str, str], float] = {}
    for regime in regimes:
        rows = []
        for i in range(N_OBJECTS):
            oid = f"obj{i:02d}"
            q = 0.55 + 0.05 * i - (0.0 if regime == "clean" else 0.1)
            base_q[(oid, regime)] = q
            montage = f"data/montages/heldout_{regime}/{oid}_s0.png"
            image = f"data/world/images/{regime}/{oid}.png"
            _png(tmp / montage, q)
            _png(tmp / image, 0.5)
            quality[montage] = q
            rows.append(_mesh_row(oid, regime, "base", q, montage, image, oracle))
        write_jsonl(tmp / f"data/generated/heldout_{regime}/manifest.jsonl", rows)
        write_jsonl(tmp / f"data/montages/heldout_{regime}/manifest.jsonl", rows)

    eval_judge = ScriptedBackend("eval-judge@test", quality)
    for spec in arm_specs(params):
        arm, regime = spec.arm, spec.regime
        gain = arm_gain.get(arm, 0.0)
        rows, pairs = [], []
        for i in range(N_OBJECTS):
            oid = f"obj{i:02d}"
            # alternate small +/- offsets so an arm with no gain gets a mix of wins, losses and flips
            q = base_q[(oid, regime)] + gain + (0.02 if i % 3 == 0 else (-0.3 if i % 3 == 1 else 0.0))
            montage = f"data/evals/{arm}/montages/{oid}_s0.png"
            _png(tmp / montage, q)
            quality[montage] = q
            rows.append(_mesh_row(oid, regime, arm, q, montage, f"data/world/images/{regime}/{oid}.png", oracle))
            base_montage = f"data/montages/heldout_{regime}/{oid}_s0.png"
            pairs.append(Pair(f"{arm}:{oid}:s0", oid, montage, base_montage, rows[-1]["candidate"],
                              f"base:{oid}:{regime}", _score(q, oracle), _score(base_q[(oid, regime)], oracle)))
        write_jsonl(tmp / f"data/evals/{arm}/manifest.jsonl", rows)
        # position bias 0.3: pairs with a small gap flip, as real judges do
        backend = ScriptedBackend("eval-judge@test", quality, bias=0.3)
        _run(tmp, backend, pairs, f"data/evals/{arm}/verdicts.jsonl")
        train = {"arm": arm, "diverged": arm in diverged, "severity": None if regime == "clean" else regime,
                 "settings": {"beta": spec.settings["beta"]} if "beta" in spec.settings else {}}
        if spec.family == "repair":
            train.update({"feat_mse_before": 0.3, "feat_mse_after": 0.2})
        else:
            train.update({"fm_mse_before": 0.09, "fm_mse_after": 4.9 if arm in diverged else 0.08,
                          "implicit_accuracy": 0.6})
        write_json(tmp / f"data/arms/{arm}/train_metrics.json", train)

    _calibration(tmp, params, quality, calibration_ok, eval_judge, oracle)
    return params


def _run(tmp: Path, backend, pairs, log_rel: str) -> None:
    # run_pairs hashes images by the paths it is given: run from the repo root so paths stay relative
    cwd = Path.cwd()
    import os
    os.chdir(tmp)
    try:
        run_pairs(backend, pairs, log_rel, PROMPT, batch_size=8, show_progress=False)
    finally:
        os.chdir(cwd)


def _calibration(tmp: Path, params: dict, quality: dict, ok: bool, eval_judge, oracle: bool = True) -> None:
    pairs = {"clear_gap": [], "base_vs_base": [], **{f"headroom_{s}": [] for s in ("mild", "medium", "severe")}}
    for i in range(N_OBJECTS + 4):
        oid = f"cal{i:02d}"
        paths = {k: f"data/montages/calibration/{oid}_{k}.png" for k in ("high", "low", "s0", "s1", "mild", "medium", "severe")}
        qs = {"high": 0.8, "low": 0.2, "s0": 0.6 + 0.01 * (i % 2), "s1": 0.6 + 0.01 * ((i + 1) % 2),
              "mild": 0.5, "medium": 0.4, "severe": 0.3}
        for k, p in paths.items():
            _png(tmp / p, qs[k])
            quality[p] = qs[k]
        sc = {k: qs[k] if oracle else None for k in qs}
        pairs["clear_gap"].append(Pair(f"cg:{oid}", oid, paths["high"], paths["low"], "high", "low", sc["high"], sc["low"]))
        pairs["base_vs_base"].append(Pair(f"bb:{oid}", oid, paths["s0"], paths["s1"], "s0", "s1", sc["s0"], sc["s1"]))
        for s in ("mild", "medium", "severe"):
            pairs[f"headroom_{s}"].append(Pair(f"hr:{s}:{oid}", oid, paths["s0"], paths[s], "clean", s, sc["s0"], sc[s]))
    # a blind evaluation judge (always answers "first") fails the clear-gap control
    judge = eval_judge if ok else ScriptedBackend("eval-judge@test", quality, scale=0.0, bias=1.0)
    for name, ps in pairs.items():
        _run(tmp, judge, ps, f"data/calibration/eval_{name}.jsonl")
    for name, ps in pairs.items():
        _run(tmp, ScriptedBackend("train-judge@test", quality), ps, f"data/calibration/train_{name}.jsonl")
    write_json(tmp / "metrics/calibration.json", calibration_metrics_from_dir(tmp / "data/calibration", params))
    from judge3d.pipeline.judging import write_calibration_plots
    write_calibration_plots(tmp / "metrics/plots", read_cal(tmp))

    label_pairs = [Pair(f"lab:{p.object_id}", p.object_id, p.x, p.y, "high", "low", p.x_oracle, p.y_oracle)
                   for p in pairs["clear_gap"]]
    iid_pairs = [Pair(f"iid:{p.object_id}", p.object_id, p.x, p.y, "s0", "s1", p.x_oracle, p.y_oracle)
                 for p in pairs["base_vs_base"]]
    train_judge = ScriptedBackend("train-judge@test", quality)
    _run(tmp, train_judge, label_pairs, "data/labels/verdicts.jsonl")
    _run(tmp, train_judge, iid_pairs, "data/labels/iid_verdicts.jsonl")
    write_json(tmp / "metrics/labels.json", labels_metrics_from_logs(tmp / "data/labels/verdicts.jsonl",
                                                                     tmp / "data/labels/iid_verdicts.jsonl", params))


def read_cal(tmp: Path) -> dict:
    from judge3d.core.io import read_json
    return read_json(tmp / "metrics/calibration.json")


def run_stages(tmp: Path, params: dict) -> None:
    """What dvc repro would run after judge-eval: arm-metrics@<arm> for every arm, then report."""
    from judge3d.report.arm_metrics import arm_metrics_from_files
    from judge3d.report.build import write_report

    for arm in arm_names(params):
        write_json(tmp / f"metrics/arms/{arm}.json", arm_metrics_from_files(tmp, arm, params))
    write_report(tmp, params)


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
