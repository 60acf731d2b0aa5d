"""Build the procedural world: objects for every split, their meshes, voxels, clean input images,
a manifest; and the degraded copies of the input images per severity.

With ``world.images_dir`` set, the train and heldout splits are a user's images instead (no
ground-truth shape, so no oracle: their rows carry ``mesh_path``/``voxel_path`` null and
``oracle: false``); judge_train and judge_eval stay procedural, since the mini judges learn from
ground truth."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from judge3d.core.config import ParamsError, require
from judge3d.core.io import JsonlAppender, bytes_sha256, dumps, file_sha256, iter_jsonl, read_jsonl, write_jsonl
from judge3d.core.seeding import derive_seed
from judge3d.world.degrade import SEVERITIES, degrade, mse, severity_spec
from judge3d.world.shapes import CATEGORIES, build_shape
from judge3d.world.voxel import voxelize

SPLITS = ("train", "judge_train", "judge_eval", "heldout")
# world.images_dir: the splits a user's images replace, and the image files read there.
USER_SPLITS = ("train", "heldout")
USER_CATEGORY = "user"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Bump when shapes, voxelization or rendering change in a way that changes the files, so a
# resumed build does not keep objects made by older code.
BUILD_VERSION = 1


@dataclass(frozen=True)
class WorldConfig:
    seed: int
    categories: tuple[str, ...]
    split_sizes: dict[str, int]
    voxel_resolution: int
    voxel_supersample: int
    image_size: int
    azimuth_deg: float
    elevation_deg: float
    background: tuple[int, int, int]
    alpha: bool  # RGBA input images (the object's cut-out in alpha) instead of RGB
    images_dir: str | None = None  # a user's train/ and heldout/ images replace those splits' objects

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "WorldConfig":
        categories = require(params, "world.categories", list, check=lambda v: len(v) > 0)
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or len(set(categories)) != len(categories):
            raise ParamsError(f"params.yaml: 'world.categories' has unknown or repeated entries {unknown or categories}; "
                              f"choose from {list(CATEGORIES)}")
        background = require(params, "world.image.background", list,
                              check=lambda v: len(v) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in v),
                              hint="three ints in 0..255")
        return cls(
            seed=require(params, "seed", int),
            categories=tuple(categories),
            split_sizes={s: require(params, f"world.n_{s}", int, check=lambda v: v >= 0) for s in SPLITS},
            voxel_resolution=require(params, "world.voxel_resolution", int, check=lambda v: 4 <= v <= 256),
            voxel_supersample=require(params, "world.voxel_supersample", int, check=lambda v: 1 <= v <= 8),
            image_size=require(params, "world.image.size", int, check=lambda v: 16 <= v <= 2048),
            azimuth_deg=require(params, "world.image.azimuth_deg", float),
            elevation_deg=require(params, "world.image.elevation_deg", float, check=lambda v: -89 <= v <= 89),
            background=tuple(background),
            alpha=require(params, "world.image.alpha", bool,
                          hint="true writes RGBA cut-outs (TRELLIS), false RGB (the mini generator)."),
            images_dir=images_dir_param(params),
        )


def images_dir_param(params: Mapping[str, Any]) -> str | None:
    """``world.images_dir``: None (the procedural world) or a non-empty folder path. A params file
    from before the key existed reads as None."""
    world = params.get("world")
    value = world.get("images_dir") if isinstance(world, Mapping) else None
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ParamsError(f"params.yaml: 'world.images_dir' must be null or a folder path, got {value!r}")
    return value


def plan_objects(cfg: WorldConfig) -> list[dict[str, Any]]:
    """One row per object: categories round-robin within each split, seeds derived per (split, index).

    Splits are disjoint by object: no two objects share a (category, seed), hence a shape.
    """
    rows, taken = [], set()
    for split in SPLITS:
        for index in range(cfg.split_sizes[split]):
            category = cfg.categories[index % len(cfg.categories)]
            seed = derive_seed(cfg.seed, "shape", split, index)
            retry = 0
            while (category, seed) in taken:  # a 31-bit seed collision: rare, resolved deterministically
                retry += 1
                seed = derive_seed(cfg.seed, "shape", split, index, "retry", retry)
            taken.add((category, seed))
            object_id = f"{split}-{index:04d}-{category}"
            rows.append({"object_id": object_id, "split": split, "index": index, "category": category, "seed": seed})
    return rows


def _build_key(row: Mapping[str, Any], cfg: WorldConfig) -> str:
    return bytes_sha256(dumps({"v": BUILD_VERSION, "category": row["category"], "seed": row["seed"],
                               "res": cfg.voxel_resolution, "ss": cfg.voxel_supersample, "size": cfg.image_size,
                               "az": cfg.azimuth_deg, "el": cfg.elevation_deg, "bg": list(cfg.background),
                               "alpha": cfg.alpha}).encode())


def build_world(params: Mapping[str, Any], out_dir: str | Path = "data/world", *,
                render_fn: Callable[..., np.ndarray], workers: int | None = 1, root: str | Path = ".",
                progress: bool = True) -> list[dict[str, Any]]:
    """Write meshes (.ply), voxels (.npy), clean images (.png) and ``manifest.jsonl`` under ``out_dir``.

    ``render_fn(mesh, size, azimuth_deg, elevation_deg, background, alpha=...) -> (H, W, 3|4) uint8``
    draws the input image, RGBA (alpha = the object's coverage) when ``world.image.alpha``; the
    world layer takes it as an argument because rendering sits above it (``judge3d.pipeline.world``
    passes ``judge3d.render.render_input_image``). ``workers`` processes
    build objects in parallel (``judge3d.core.parallel``; None = one per CPU); a ``render_fn`` that
    keeps state in this process needs ``workers=1``.

    Resumable: finished objects are logged (flushed) to ``manifest.partial.jsonl`` with their
    files' hashes; a rerun skips those whose build key and files still match. Paths in the
    manifest are relative to ``root`` (the repo root).
    """
    cfg = WorldConfig.from_params(params)
    render = render_fn
    root, out_dir = Path(root), Path(out_dir)
    for sub in ("meshes", "voxels", "images"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    partial = out_dir / "manifest.partial.jsonl"
    done = _finished_objects(partial, root)

    planned = plan_objects(cfg)
    user_rows: dict[str, list[dict[str, Any]]] = {}
    if cfg.images_dir is not None:
        # Read first: a bad folder fails before minutes of procedural building. The judge splits are
        # planned with every split as before, so their objects match the procedural world's.
        user_rows = user_image_rows(cfg, out_dir, root)
        planned = [p for p in planned if p["split"] not in USER_SPLITS]

    def reusable(plan) -> bool:
        previous = done.get(plan["object_id"])
        return previous is not None and previous["build_key"] == _build_key(plan, cfg)

    from judge3d.core.parallel import ordered_map

    built = ordered_map(lambda plan: _build_object(plan, cfg, out_dir, root, render),
                        [plan for plan in planned if not reusable(plan)], workers)
    rows = []
    with JsonlAppender(partial) as log:
        for plan in tqdm(planned, desc="world", unit="obj", disable=not progress):
            if reusable(plan):
                rows.append(done[plan["object_id"]])
                continue
            row = next(built)
            row["build_key"] = _build_key(plan, cfg)
            log.append(row)
            rows.append(row)
    if user_rows:
        rows = [r for split in SPLITS
                for r in (user_rows[split] if split in user_rows else [x for x in rows if x["split"] == split])]
    manifest = [{k: v for k, v in r.items() if k not in ("build_key", "sha256")} for r in rows]
    write_jsonl(out_dir / "manifest.jsonl", manifest)
    partial.unlink()
    return manifest


def _safe_stem(stem: str) -> str:
    """A file stem as an object-id part: letters, digits, '_' and '-' (ids name files and DVC paths)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:64] or "image"


def user_image_files(images_dir: str | Path, root: str | Path = ".") -> dict[str, list[Path]]:
    """The image files of ``<images_dir>/train`` and ``<images_dir>/heldout``, sorted by name; a
    relative ``images_dir`` is taken from ``root``. Hidden files and other suffixes are skipped."""
    folder = Path(images_dir).expanduser()
    folder = folder if folder.is_absolute() else Path(root) / folder
    layout = (f"it must hold subfolders {' and '.join(f'{s}/' for s in USER_SPLITS)} of images "
              f"({', '.join(IMAGE_SUFFIXES)}; RGBA cut-outs suit TRELLIS best)")
    if not folder.is_dir():
        raise FileNotFoundError(f"world.images_dir = {str(images_dir)!r}: no folder {folder}; {layout}, "
                                "or set world.images_dir to null for the procedural world.")
    out = {}
    for split in USER_SPLITS:
        sub = folder / split
        if not sub.is_dir():
            raise FileNotFoundError(f"world.images_dir: {sub} not found; {layout}.")
        files = sorted(p for p in sub.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"world.images_dir: {sub} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             f"add at least one, since the study needs both {' and '.join(USER_SPLITS)} inputs.")
        out[split] = files
    return out


def normalize_user_image(path: Path, cfg: WorldConfig) -> np.ndarray:
    """A user's image in the world's input format: centred on a square canvas (aspect kept), resized
    to ``world.image.size``; RGBA when ``world.image.alpha`` (an opaque image keeps alpha 255), else
    RGB composited over ``world.image.background``."""
    try:
        with Image.open(path) as im:
            im.load()
            rgba = Image.fromarray(image_pixels(im)).convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"world.images_dir: {path} is not a readable image ({exc}); replace or remove "
                         "the file.") from exc
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (*cfg.background, 0))
    canvas.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    canvas = canvas.resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)
    if cfg.alpha:
        return np.asarray(canvas, dtype=np.uint8)
    flat = Image.new("RGBA", canvas.size, (*cfg.background, 255))
    flat.alpha_composite(canvas)
    return np.asarray(flat.convert("RGB"), dtype=np.uint8)


def user_image_rows(cfg: WorldConfig, out_dir: Path, root: Path) -> dict[str, list[dict[str, Any]]]:
    """Manifest rows of the user's images per split, each image normalized into ``<out_dir>/images``
    (so DVC tracks the inputs the study used). object_id = ``<split>-<file stem made safe>``, with
    ``-2``, ``-3``... where two stems collide. No ground truth: mesh_path, voxel_path null."""
    files = user_image_files(cfg.images_dir, root)
    out: dict[str, list[dict[str, Any]]] = {}
    taken: set[str] = set()
    for split in USER_SPLITS:
        rows = []
        for index, path in enumerate(files[split]):
            base = f"{split}-{_safe_stem(path.stem)}"
            object_id, k = base, 1
            while object_id in taken:
                k += 1
                object_id = f"{base}-{k}"
            taken.add(object_id)
            image_path = out_dir / "images" / f"{object_id}.png"
            Image.fromarray(normalize_user_image(path, cfg)).save(image_path)
            rows.append({"object_id": object_id, "split": split, "index": index, "category": USER_CATEGORY,
                         "source": f"{split}/{path.name}", "mesh_path": None, "voxel_path": None,
                         "image_path": _rel(image_path, root), "oracle": False})
        out[split] = rows
    return out


def has_ground_truth(row: Mapping[str, Any]) -> bool:
    """False for a world row from ``world.images_dir`` (a user's image: no mesh, no voxels)."""
    return row.get("oracle") is not False and row.get("mesh_path") is not None


def _finished_objects(partial: Path, root: Path) -> dict[str, dict[str, Any]]:
    if not partial.exists():
        return {}
    done = {}
    for row in iter_jsonl(partial):
        paths = [root / row[k] for k in ("mesh_path", "voxel_path", "image_path")]
        if all(p.is_file() for p in paths) and [file_sha256(p) for p in paths] == row.get("sha256"):
            done[row["object_id"]] = row
    return done


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is outside the repository root {root.resolve()}: manifests hold "
                         "repo-relative paths, so write outputs inside the repo (e.g. data/...)") from None


def _build_object(plan: Mapping[str, Any], cfg: WorldConfig, out_dir: Path, root: Path,
                  render: Callable[..., np.ndarray]) -> dict[str, Any]:
    mesh = build_shape(plan["category"], plan["seed"])
    voxels = voxelize(mesh, cfg.voxel_resolution, cfg.voxel_supersample)
    image = np.asarray(render(mesh, cfg.image_size, cfg.azimuth_deg, cfg.elevation_deg, cfg.background,
                              alpha=cfg.alpha))
    channels = 4 if cfg.alpha else 3
    if image.dtype != np.uint8 or image.shape != (cfg.image_size, cfg.image_size, channels):
        raise ValueError(f"the input-image renderer returned {image.dtype} {image.shape} for {plan['object_id']}; "
                         f"world.image (size {cfg.image_size}, alpha {cfg.alpha}) needs uint8 "
                         f"{(cfg.image_size, cfg.image_size, channels)}")
    oid = plan["object_id"]
    mesh_path = out_dir / "meshes" / f"{oid}.ply"
    voxel_path = out_dir / "voxels" / f"{oid}.npy"
    image_path = out_dir / "images" / f"{oid}.png"
    mesh.export(mesh_path, file_type="ply")
    np.save(voxel_path, voxels)
    Image.fromarray(image).save(image_path)  # an (H, W, 4) array saves as an RGBA PNG
    paths = (mesh_path, voxel_path, image_path)
    return {**plan, "mesh_path": _rel(mesh_path, root), "voxel_path": _rel(voxel_path, root),
            "image_path": _rel(image_path, root), "n_faces": int(len(mesh.faces)),
            "occupancy": float(voxels.mean()), "sha256": [file_sha256(p) for p in paths]}


def degrade_world(params: Mapping[str, Any], severity: str, world_manifest: str | Path = "data/world/manifest.jsonl",
                  out_dir: str | Path | None = None, *, root: str | Path = ".",
                  splits: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Degrade the clean input images of ``world.degraded_splits`` (or ``splits``) at ``severity``.

    An RGBA clean image gives an RGBA degraded one (:func:`judge3d.world.degrade.degrade` says how the
    alpha channel is carried); ``mse_vs_clean`` is then over all four channels.
    """
    if severity not in SEVERITIES:
        raise ParamsError(f"unknown severity {severity!r}; choose from {list(SEVERITIES)}")
    spec = severity_spec(params, severity)
    base_seed = require(params, "seed", int)
    if splits is None:
        splits = require(params, "world.degraded_splits", list,
                         check=lambda v: len(v) > 0 and all(s in SPLITS for s in v),
                         hint=f"a non-empty list from {list(SPLITS)}")
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else Path("data/degraded") / severity
    out_dir.mkdir(parents=True, exist_ok=True)
    world = [r for r in read_jsonl(world_manifest) if r["split"] in set(splits)]
    if not world:
        raise ValueError(f"{world_manifest} has no objects in splits {list(splits)}: rebuild the world (dvc repro data)")
    rows = []
    for row in tqdm(world, desc=f"degrade {severity}", unit="img", disable=not progress):
        clean_path = root / row["image_path"]
        if not clean_path.is_file():
            raise FileNotFoundError(f"clean input image {clean_path} is missing: rebuild the world (dvc repro data)")
        try:
            with Image.open(clean_path) as im:
                clean = image_pixels(im)
        except OSError as exc:  # truncated / not an image: PIL's message names neither the file nor the fix
            raise ValueError(f"clean input image {clean_path} is unreadable ({exc}): the file is damaged; "
                             "rebuild the world (dvc repro -s data) or restore it (dvc checkout data/world).") from exc
        seed = derive_seed(base_seed, "degrade", row["object_id"], severity)
        out = degrade(clean, spec, seed, where=f"degradations.{severity}")
        path = out_dir / f"{row['object_id']}.png"
        Image.fromarray(out).save(path)
        rows.append({"object_id": row["object_id"], "split": row["split"], "category": row["category"],
                     "severity": severity, "image_path": _rel(path, root), "clean_image_path": row["image_path"],
                     "mse_vs_clean": mse(out, clean)})
    write_jsonl(out_dir / "manifest.jsonl", rows)
    return rows


def image_pixels(im: Image.Image) -> np.ndarray:
    """(H, W, 4) uint8 RGBA when the image carries transparency (an alpha channel, or a palette or
    colour key marked transparent), else (H, W, 3) uint8 RGB."""
    # Pillow's Image.has_transparency_data, spelled out: it needs Pillow 10.1 and we allow 10.0.
    transparent = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    return np.asarray(im.convert("RGBA" if transparent else "RGB"), dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """An input image as :func:`image_pixels` gives it: RGBA for a cut-out (``world.image.alpha``), else RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} not found: run the data (or degrade) stage.")
    try:
        with Image.open(path) as im:
            return image_pixels(im)
    except OSError as exc:
        raise ValueError(f"input image {path} is not a readable image ({exc}); rerun the data stage.") from exc


def load_voxels(path: str | Path, resolution: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"voxel grid {path} not found: run the data stage.")
    grid = np.load(path, allow_pickle=False)
    if grid.shape != (resolution,) * 3 or not np.isfinite(grid).all():
        raise ValueError(f"voxel grid {path}: expected finite ({resolution},)*3, got {grid.shape}; rerun data.")
    return grid.astype(np.float32)
