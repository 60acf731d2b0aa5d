"""Make docs/generator_heldout.png: rows of held-out objects, columns
input image | ground truth | high budget (25 steps, CFG) | low budget (2 steps, no CFG).

Usage (from the repo root, after `dvc repro render@heldout_clean`): python docs/make_generator_figure.py
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from judge3d.core.config import load_params
from judge3d.core.io import read_jsonl
from judge3d.render import MontageRenderer
from judge3d.world.geometry import load_mesh

N_OBJECTS = 8


def main() -> None:
    params = load_params()
    world = {r["object_id"]: r for r in read_jsonl("data/world/manifest.jsonl")}
    montages = read_jsonl("data/montages/heldout_clean/manifest.jsonl")
    by_key = {(r["object_id"], r["budget"], r["seed_index"]): r for r in montages}
    objects, seen = [], set()
    for r in sorted(montages, key=lambda r: r["object_id"]):
        if r["category"] not in seen:
            seen.add(r["category"])
            objects.append(r["object_id"])
    rows = []
    with MontageRenderer.from_params(params) as renderer:
        for oid in objects[:N_OBJECTS]:
            gt_mesh, _ = load_mesh(world[oid]["mesh_path"])
            gt, _ = renderer.render(gt_mesh)
            size = gt.shape[:2][::-1]
            image = np.asarray(Image.open(world[oid]["image_path"]).convert("RGB").resize(size))
            high = np.asarray(Image.open(by_key[(oid, "high", 0)]["montage_path"]).convert("RGB"))
            low = np.asarray(Image.open(by_key[(oid, "low", 0)]["montage_path"]).convert("RGB"))
            rows.append(np.concatenate([image, gt, high, low], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save("docs/generator_heldout.png", optimize=True)
    print(f"wrote docs/generator_heldout.png ({len(rows)} objects: input | GT | high | low)")


if __name__ == "__main__":
    main()
