"""Render a montage for every row of a mesh-set manifest (the ``render`` stage's logic)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from tqdm import tqdm

from judge3d.core.io import JsonlAppender, iter_jsonl, read_jsonl, write_jsonl
from judge3d.core.parallel import ordered_map
from judge3d.render.egl import context_started
from judge3d.render.montage import MontageRenderer

PROGRESS_FILE = ".render_progress.jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def montage_name(row: Mapping[str, Any], index: int) -> str:
    """File stem for a row: its ``candidate`` id, else its ``object_id``."""
    key = row.get("candidate") or row.get("object_id")
    if key in (None, ""):
        raise ValueError(f"manifest row {index}: needs a 'candidate' or 'object_id' to name its montage.")
    return _UNSAFE.sub("_", str(key))


def _rel(path: Path) -> str:
    """POSIX path relative to the cwd (the repo root) when it lies under it, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def render_manifest(manifest: str | Path, out_dir: str | Path, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write ``out_dir/<name>.png`` per row and ``out_dir/manifest.jsonl`` (input rows + montage_path + flags).

    Flags per row: ``render_empty`` (the montage is only background: no renderable mesh, for any
    reason, including a mesh that covers no pixel), ``render_nan`` / ``render_corrupt`` /
    ``render_degenerate`` (why: only zero-area faces), ``render_load_flags`` (load_mesh's flags),
    ``render_clipped`` (part of the mesh lies outside a view), ``render_coverage`` (foreground share
    of the montage), ``render_n_faces``. Resumable: a row whose PNG and progress record both exist
    is not rendered again.
    """
    rows = read_jsonl(manifest)
    names = [montage_name(row, i) for i, row in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{manifest}: rows {seen[name]} and {i} both name montage '{name}'; "
                             "candidate (or object_id) must be unique per row.")
        seen[name] = i
        if "mesh_path" not in rows[i]:
            raise ValueError(f"{manifest}: row {i} ('{name}') has no 'mesh_path'.")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / PROGRESS_FILE
    done: dict[str, dict[str, Any]] = {}
    if progress_path.exists():
        done = {rec["name"]: rec["flags"] for rec in iter_jsonl(progress_path)}

    todo = [(i, n) for i, n in enumerate(names) if not (n in done and (out_dir / f"{n}.png").is_file())]
    task = _RenderTask(params, out_dir)
    # Workers fork from this process; one that already holds an EGL context renders inline instead.
    workers = 1 if context_started() else None
    try:
        with JsonlAppender(progress_path) as progress:
            results = ordered_map(task, [(name, rows[i]["mesh_path"]) for i, name in todo], workers)
            for name, flags in tqdm(results, desc="render montages", unit="mesh", initial=len(names) - len(todo),
                                    total=len(names)):
                progress.append({"flags": flags, "name": name})
                done[name] = flags
    finally:
        task.close()

    out_rows = []
    for row, name in zip(rows, names):
        out = dict(row)
        out.update(done[name])
        out["montage_path"] = _rel(out_dir / f"{name}.png")
        out_rows.append(out)
    write_jsonl(out_dir / "manifest.jsonl", out_rows)
    progress_path.unlink()  # complete: the manifest now holds every row's flags
    return out_rows


class _RenderTask:
    """Render one mesh file to ``<out_dir>/<name>.png`` and return its flags. The renderer (an EGL
    context) is opened on first use, so each worker process gets its own."""

    def __init__(self, params: Mapping[str, Any], out_dir: Path):
        self.params, self.out_dir = params, out_dir
        self.renderer: MontageRenderer | None = None

    def __call__(self, item: tuple[str, str]) -> tuple[str, dict[str, Any]]:
        from judge3d.world.geometry import load_mesh

        name, mesh_path = item
        if self.renderer is None:
            self.renderer = MontageRenderer.from_params(self.params)
        mesh, load_flags = load_mesh(mesh_path)
        image, info = self.renderer.render(mesh)
        load_flags = {k for k, v in (load_flags or {}).items() if v}
        blank = mesh is None or info["empty"] or info["nan"] or info["corrupt"]
        flags = {
            "render_empty": bool(blank),  # the montage shows only background
            "render_degenerate": bool(info.get("degenerate", False)),  # why: only zero-area faces
            "render_nan": bool(info["nan"] or "nan" in load_flags),
            "render_corrupt": bool(info["corrupt"] or "corrupt" in load_flags),
            "render_clipped": bool(info["clipped"]),
            "render_coverage": round(float(info["coverage"]), 6),
            "render_n_faces": int(info["n_faces"]),
            "render_load_flags": sorted(load_flags),
        }
        target = self.out_dir / f"{name}.png"
        tmp = target.with_suffix(".png.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, target)
        return name, flags

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
