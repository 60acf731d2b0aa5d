"""Normal-map montage throughput (4 views) on this machine, against a naive renderer.

Baseline, measured in the same run: a new OffscreenRenderer (EGL context, shaders, framebuffers)
per montage with the design note's face-colour method, i.e. what a loop calling a one-shot render
function would do. Then one MontageRenderer reused (one scene, the mesh node swapped) with each
exact method: ``face_colours`` (per-view CPU colours, mesh re-uploaded per view) and ``shader``
(the default: mesh uploaded once, normals from a GLSL pass).

Two mesh sets: the world's ground-truth furniture (primitive unions) and generator-like meshes
(marching cubes of the same shapes' 32^3 occupancy, what the flow model decodes).

    PYTHONPATH=src python benchmarks/render.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import trimesh

from judge3d.render import MontageRenderer


def furniture_meshes(n: int) -> list[trimesh.Trimesh]:
    try:
        from judge3d.world.shapes import CATEGORIES, build_shape
    except ImportError:  # world module absent: seeded unions of boxes, same canonical frame
        return [_box_union(seed) for seed in range(n)]
    return [build_shape(CATEGORIES[i % len(CATEGORIES)], i // len(CATEGORIES)) for i in range(n)]


def _box_union(seed: int) -> trimesh.Trimesh:
    rng = np.random.default_rng(seed)
    parts = [trimesh.creation.box(rng.uniform(0.05, 0.6, 3),
                                  transform=trimesh.transformations.translation_matrix(rng.uniform(-0.2, 0.2, 3)))
             for _ in range(int(rng.integers(4, 12)))]
    return trimesh.util.concatenate(parts)


def marching_cubes_mesh(mesh: trimesh.Trimesh, resolution: int = 32) -> trimesh.Trimesh:
    """The shape as the generator would decode it: occupancy on the 32^3 grid, then marching cubes."""
    try:
        from judge3d.world.voxel import occupancy_to_mesh, voxelize
    except ImportError:  # world module absent: trimesh's surface voxels, filled
        voxels = mesh.voxelized(pitch=1.0 / resolution).fill()
        return voxels.marching_cubes.apply_transform(voxels.transform)
    return occupancy_to_mesh(voxelize(mesh, resolution))


class Rate:
    """Montages per wall-clock second, and per CPU-second of this process (llvmpipe's threads included),
    which stays meaningful when other jobs share the cores."""

    def __init__(self) -> None:
        self.count = 0
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall0

    def done(self) -> tuple[float, float]:
        wall, cpu = self.elapsed(), time.process_time() - self.cpu0
        return self.count / wall, self.count / cpu


def rate_reused(meshes, size: int, seconds: float, method: str) -> tuple[float, float]:
    with MontageRenderer(views=4, size=size, method=method) as r:
        for m in meshes[:2]:
            r.render(m)
        rate = Rate()
        while rate.elapsed() < seconds:
            for m in meshes:
                r.render(m)
            rate.count += len(meshes)
        return rate.done()


def rate_naive(meshes, size: int, seconds: float) -> tuple[float, float]:
    rate = Rate()
    while rate.elapsed() < seconds:
        for m in meshes:
            with MontageRenderer(views=4, size=size, method="face_colours") as r:
                r.render(m)
            rate.count += 1
            if rate.elapsed() >= seconds:
                break
    return rate.done()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--n-meshes", type=int, default=22)
    args = parser.parse_args()

    gt = furniture_meshes(args.n_meshes)
    mc = [marching_cubes_mesh(m) for m in gt]
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'default')}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    for name, meshes in (("furniture (primitive unions)", gt), ("generator-like (marching cubes 32^3)", mc)):
        faces = [len(m.faces) for m in meshes]
        print(f"\nmesh set: {name}: {len(meshes)} meshes, faces median {int(np.median(faces))}, max {max(faces)}")
        print(f"{'size':>5} {'clock':>6} | {'naive':>7} | {'reused':>7} {'x naive':>8} | {'reused':>7} {'x naive':>8}"
              f" {'x face':>7}")
        print(f"{'px':>5} {'':>6} | {'face_c.':>7} | {'face_c.':>7} {'':>8} | {'shader':>7}")
        for size in (128, 256):
            naive = rate_naive(meshes, size, args.seconds)
            face = rate_reused(meshes, size, args.seconds, "face_colours")
            shader = rate_reused(meshes, size, args.seconds, "shader")
            for i, clock in enumerate(("wall", "cpu")):
                print(f"{size:>5} {clock:>6} | {naive[i]:>7.1f} | {face[i]:>7.1f} {face[i] / naive[i]:>7.1f}x |"
                      f" {shader[i]:>7.1f} {shader[i] / naive[i]:>7.1f}x {shader[i] / face[i]:>6.2f}x")
    print(f"\nmontages/s (4 views each): 'wall' per elapsed second, 'cpu' per CPU-second of this process;\n"
          f"'x naive' = speed-up over a new renderer per montage; load average at end {os.getloadavg()[0]:.2f}")
    print("goal: >= 60 montages/s at 128 px on 2 cores (reused renderer)")


if __name__ == "__main__":
    main()
