"""Feed the bad inputs of issue 12 ("Bad input, measured") to the public entry points of one source
tree and classify each outcome:

- ``clear error``: an exception whose message names the file / key and says what to do;
- ``flag``: no exception, and the result carries a flag for the bad input;
- ``silent``: no exception and no flag (the bad input passes as if it were fine);
- ``crash``: an exception whose message names neither the file / key nor a fix.

Usage (prints a markdown table):
    .venv/bin/python benchmarks/bad_input_audit.py                      # this checkout's src
    .venv/bin/python benchmarks/bad_input_audit.py --src /tmp/old_tree/src
The cases use only tmp files; params come from params.yaml at --src's parent (else this repo's).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Words that tell the reader what to do next (a rerun, a fix of a key, a rebuild...).
FIX_WORDS = re.compile(r"rerun|re-run|rebuild|repro|restore|retrain|did you mean|lower |raise |delete|merge|"
                       r"normalize|download|checkout|fix the|pretrain", re.I)
CASES = []


def case(name):
    def deco(fn):
        CASES.append((name, fn))
        return fn
    return deco


class Flag(Exception):
    """Raised by a case body for 'no error, but the result is flagged'."""


class Uncaught(Exception):
    """An exception the stage CLI does not catch: it escapes as a bare traceback (a crash)."""


def _quiet(fn, *a, **kw):
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


# --------------------------------------------------------------------------------------------- helpers
def _params():
    from judge3d.core.config import load_params

    return load_params(PARAMS_PATH)


def _params_text():
    return Path(PARAMS_PATH).read_text()


def _box(offset=(0.0, 0.0, 0.0), extent=0.5):
    import trimesh

    mesh = trimesh.creation.box(extents=[extent] * 3)
    mesh.apply_translation(offset)
    return mesh


_JUDGE = {}


def _judge_dir(tmp: Path, name: str) -> Path:
    from judge3d.judges.tiny import TinyLMSize, TinySizes, TinyVisionSize, build_tiny_qwen25vl

    if "base" not in _JUDGE:
        sizes = TinySizes(lm=TinyLMSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                          vision=TinyVisionSize(hidden=32, depth=2, heads=2, intermediate=64, patch=14), image_size=56)
        _quiet(build_tiny_qwen25vl, tmp / "judge_base", sizes, seed=1)
        _JUDGE["base"] = tmp / "judge_base"
    dst = tmp / name
    shutil.copytree(_JUDGE["base"], dst)
    return dst


def _generator_dir(tmp: Path, name: str) -> Path:
    import torch

    from judge3d.generators.mini import ConditionerConfig, FlowConfig, MiniConfig, MiniGenerator

    torch.manual_seed(0)
    cfg = MiniConfig(conditioner=ConditionerConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2),
                     flow=FlowConfig(resolution=8, patch_size=4, width=16, depth=1, heads=2, time_embed_dim=16))
    MiniGenerator(cfg, device="cpu").save(tmp / name)
    return tmp / name


def _load_judge(folder):
    from judge3d.judges.hf import HFJudge

    return _quiet(HFJudge.load, folder)


def _load_generator(folder):
    from judge3d.generators import load_generator

    return load_generator(folder, device="cpu")


# --------------------------------------------------------------------------------------------- cases
@case("degenerate mesh (one zero-area face) renders blank, unflagged")
def _(tmp):
    import numpy as np
    import trimesh

    from judge3d.render.montage import MontageRenderer

    mesh = trimesh.Trimesh(np.array([[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0]], float), np.array([[0, 1, 2]]), process=False)
    with MontageRenderer.from_params(_params()) as r:
        _, info = r.render(mesh)
    if info.get("empty") or info.get("degenerate"):
        raise Flag(f"empty={info.get('empty')} degenerate={info.get('degenerate')}")
    return tmp, "info.empty false, coverage %s" % info.get("coverage")


@case("render flags (render_empty) not read: calibrate judges a blank montage")
def _(tmp):
    from PIL import Image

    from judge3d.core.io import write_jsonl
    from judge3d.pipeline.judging import run_calibrate

    class Fake:
        judge_id = "fake@000000000000"

        def __init__(self):
            self.seen = set()

        def p_first(self, pairs, prompt):
            self.seen |= {str(p) for pair in pairs for p in pair}
            return [0.6] * len(pairs)

    root = tmp / "montages"
    rows = {"heldout_clean": [], "heldout_mild": []}
    for j in range(3):
        def row(set_name, budget, seed, seed_index, q, **extra):
            cand = f"h{j}_{budget}_s{seed_index}"
            png = root / set_name / f"{cand}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (int(q * 255),) * 3).save(png)
            rows[set_name].append({"object_id": f"h{j}", "budget": budget, "seed": seed, "seed_index": seed_index,
                                   "candidate": cand, "montage_path": str(png), "oracle_score": q,
                                   "regime": set_name.split("_")[1], "render_empty": False, "render_clipped": False,
                                   **extra})
        row("heldout_clean", "default", 10 + j, 0, 0.6, **({"render_empty": True} if j == 0 else {}))
        row("heldout_clean", "default", 20 + j, 1, 0.5)
        row("heldout_clean", "high", 30 + j, 0, 0.9)
        row("heldout_clean", "low", 40 + j, 0, 0.1)
        row("heldout_mild", "default", 10 + j, 0, 0.55)
    for name, r in rows.items():
        write_jsonl(root / name / "manifest.jsonl", r)
    params = _params()
    params["calibrate"]["severities"] = ["mild"]
    params["calibrate"]["bootstrap"]["n"] = 100
    ev, tr = Fake(), Fake()
    m = _quiet(run_calibrate, ev, tr, root, tmp / "cal", tmp / "cal.json", tmp / "fvg.csv", params, "A <image1> B <image2>",
               show_progress=False)
    blank = str(root / "heldout_clean" / "h0_default_s0.png")
    if m.get("n_flagged") and blank not in ev.seen:
        raise Flag(f"n_flagged={m['n_flagged']}, blank montage not judged")
    return tmp, f"blank montage judged: {blank in ev.seen}; n_flagged={m.get('n_flagged')}"


@case("ground truth far outside the canonical cube: candidates score F-score 0")
def _(tmp):
    import numpy as np

    from judge3d.pipeline.mesh_sets import _CandidateScorer
    from judge3d.world.geometry import oracle_metrics

    gt_path = tmp / "gt_far.ply"
    _box(offset=(3.0, 0, 0)).export(gt_path)
    vox = tmp / "gt_far.npy"
    np.save(vox, np.zeros((32, 32, 32), np.float32))

    class J:
        object_id, mesh_path_gt, voxel_path_gt = "o0", str(gt_path), str(vox)

    params = _params()
    scorer = _CandidateScorer(tmp / "out", params, "s", {})
    ref = scorer.reference(J())
    m = oracle_metrics(_box(), ref, params=params)
    if any(m.get(k) for k in ("gt_outside", "empty", "corrupt", "nan", "missing")):
        raise Flag("flagged")
    return tmp, f"fscore {m['fscore']} with no flag"


@case("stages/degrade.py on a truncated PNG")
def _(tmp):
    from PIL import Image

    from judge3d.core.io import write_jsonl
    from judge3d.world.dataset import degrade_world

    png = tmp / "img.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    write_jsonl(tmp / "world.jsonl", [{"object_id": "o0", "split": "train", "category": "chair",
                                       "image_path": "img.png"}])
    params = _params()
    params["world"]["degraded_splits"] = ["train"]
    try:
        degrade_world(params, "mild", tmp / "world.jsonl", tmp / "out", root=tmp, progress=False)
    except Exception as exc:
        from judge3d.core.config import ParamsError

        # stages/degrade.py prints these as one line; anything else escapes as a bare traceback
        if not isinstance(exc, (ParamsError, FileNotFoundError, ValueError)):
            raise Uncaught(f"uncaught by the stage: {type(exc).__name__}: {exc}") from exc
        raise
    return tmp, "degraded without complaint"


def _truncate_weights(folder: Path) -> None:
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _empty_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _bad_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _no_tokenizer(folder: Path) -> None:
    for f in list(folder.iterdir()):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()


def _model_folder_case(label: str, kind: str, damage) -> None:
    """A model folder (a judge or the generator) damaged one way, then loaded."""
    make, load = {"judge": (_judge_dir, _load_judge), "generator": (_generator_dir, _load_generator)}[kind]

    def body(tmp):
        folder = make(tmp, f"{kind}_{damage.__name__.strip('_')}")
        damage(folder)
        load(folder)
        return folder, "loaded"

    case(label)(body)


for _kind in ("judge", "generator"):
    _model_folder_case(f"{_kind}: truncated model.safetensors", _kind, _truncate_weights)
    _model_folder_case(f"{_kind}: 0-byte weights file", _kind, _empty_weights)
    _model_folder_case(f"{_kind}: non-JSON config.json", _kind, _bad_config)
_model_folder_case("judge folder without tokenizer files", "judge", _no_tokenizer)


@case("manifest row that is a JSON list")
def _(tmp):
    from judge3d.core.io import read_jsonl
    from judge3d.judges.pairing import clear_gap_pairs

    path = tmp / "manifest.jsonl"
    path.write_text(json.dumps({"object_id": "o0", "budget": "high", "candidate": "a", "montage_path": "a.png"})
                    + "\n" + json.dumps(["o0", "low", "b", "b.png"]) + "\n")
    clear_gap_pairs(read_jsonl(path), source=str(path))
    return path, "built pairs"


@case("params: unknown key beside a known one (render.szie)")
def _(tmp):
    from judge3d.core.config import load_params
    from judge3d.render.montage import MontageRenderer

    path = tmp / "params.yaml"
    path.write_text(_params_text().replace("render:\n", "render:\n  szie: 256\n", 1))
    with MontageRenderer.from_params(load_params(path)):
        pass
    return "render.szie", "ignored"


@case("params: duplicated top-level block")
def _(tmp):
    from judge3d.core.config import load_params

    path = tmp / "params.yaml"
    path.write_text(_params_text() + "\nrender:\n  views: 9\n")
    params = load_params(path)
    return "render", f"second block replaced the first (render keys now {sorted(params['render'])})"


@case("params: render.views: 100 (12-pixel tiles)")
def _(tmp):
    from judge3d.core.config import load_params
    from judge3d.render.montage import MontageRenderer

    path = tmp / "params.yaml"
    path.write_text(_params_text().replace("  views: 4\n", "  views: 100\n", 1))
    with MontageRenderer.from_params(load_params(path)) as r:
        tile = r.tile
    return "render.views", f"{tile}-px tiles"


# --------------------------------------------------------------------------------------------- runner
def classify(name, fn, tmp: Path) -> tuple[str, str]:
    try:
        thing, detail = fn(tmp)
        return "silent", detail
    except Flag as flag:
        return "flag", str(flag)
    except Exception as exc:  # the point: any exception is classified by what its message says
        msg = f"{type(exc).__name__}: {exc}"
        names_it = bool(re.search(r"(/|\.json|\.safetensors|\.png|\.ply|\.jsonl|\.yaml|render\.|'render')", str(exc)))
        clear = names_it and bool(FIX_WORDS.search(str(exc))) and not isinstance(exc, Uncaught)
        return ("clear error" if clear else "crash"), msg


def main(argv=None) -> int:
    global PARAMS_PATH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(REPO / "src"), help="the source tree to audit (its judge3d package)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of crashes")
    args = parser.parse_args(argv)
    src = Path(args.src).resolve()
    sys.path.insert(0, str(src))
    import judge3d

    if Path(judge3d.__file__).resolve().parents[1] != src:
        raise SystemExit(f"imported judge3d from {judge3d.__file__}, not from --src {src}")
    PARAMS_PATH = str(src.parent / "params.yaml") if (src.parent / "params.yaml").is_file() else str(REPO / "params.yaml")
    import warnings

    warnings.filterwarnings("ignore")
    print(f"source tree: {src}\n")
    print("| case | outcome | message / detail |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_root:
        for i, (name, fn) in enumerate(CASES):
            tmp = Path(tmp_root) / f"case{i}"
            tmp.mkdir()
            outcome, detail = classify(name, fn, tmp)
            detail = detail.replace("|", "/").replace("\n", " ")
            detail = detail.replace(tmp_root, "<tmp>")
            print(f"| {name} | {outcome} | {detail[:160]} |", flush=True)
    return 0


PARAMS_PATH = str(REPO / "params.yaml")

if __name__ == "__main__":
    sys.exit(main())
