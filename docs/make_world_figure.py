"""Make docs/world_categories.png: per category, the input image and the normal-map montage of the ground truth.

Usage (from the repo root, after `dvc repro data`): python docs/make_world_figure.py
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from judge3d.core.config import load_params
from judge3d.core.io import read_jsonl
from judge3d.render import MontageRenderer
from judge3d.world.geometry import load_mesh


def main() -> None:
    params = load_params()
    rows = read_jsonl("data/world/manifest.jsonl")
    first_per_category: dict[str, dict] = {}
    for row in rows:
        if row["split"] == "heldout":
            first_per_category.setdefault(row["category"], row)
    tiles = []
    with MontageRenderer.from_params(params) if hasattr(MontageRenderer, "from_params") else MontageRenderer(**{
        k: params["render"][k] for k in ("views", "elevation_deg", "size", "background", "camera_distance", "yfov_deg")
    }) as renderer:
        for category in params["world"]["categories"]:
            row = first_per_category[category]
            mesh, _flags = load_mesh(row["mesh_path"])
            montage, _info = renderer.render(mesh)
            image = np.asarray(Image.open(row["image_path"]).convert("RGB").resize(montage.shape[:2][::-1]))
            tiles.append(np.concatenate([image, montage], axis=0))
    grid = np.concatenate(tiles, axis=1)
    Image.fromarray(grid).save("docs/world_categories.png", optimize=True)
    print("wrote docs/world_categories.png", grid.shape)


if __name__ == "__main__":
    main()
