"""Oracle metrics, validity proxies and safe mesh loading."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from judge3d.core.config import ParamsError, load_params
from judge3d.world.geometry import (CHAMFER_CAP, load_mesh, oracle_metrics, prepare_ground_truth,
                                    surface_samples, validity)
from judge3d.world.shapes import build_shape
from judge3d.world.voxel import occupancy_to_mesh, voxelize

PARAMS = load_params()
R = PARAMS["world"]["voxel_resolution"]
WORST = {"iou": 0.0, "fscore": 0.0, "chamfer_l1": CHAMFER_CAP, "normal_consistency": 0.0, "oracle_score": 0.0}


@pytest.fixture(scope="module")
def chair():
    mesh = build_shape("chair", 3)
    return mesh, prepare_ground_truth(mesh, voxelize(mesh, R), params=PARAMS)


def test_mesh_against_itself_is_perfect(chair):
    mesh, ref = chair
    m = oracle_metrics(mesh, ref, params=PARAMS)
    assert m["iou"] == pytest.approx(1.0) and m["fscore"] == pytest.approx(1.0)
    assert m["chamfer_l1"] == pytest.approx(0.0, abs=1e-9)
    assert m["normal_consistency"] == pytest.approx(1.0)
    assert m["oracle_score"] == m["fscore"] and not m["empty"] and not m["nan"]


def test_shifted_copy_is_strictly_worse_and_more_shift_is_worse(chair):
    mesh, ref = chair
    scores = []
    for dx in (0.0, 0.03, 0.08):
        moved = mesh.copy()
        moved.apply_translation([dx, 0.0, 0.0])
        scores.append(oracle_metrics(moved, ref, params=PARAMS))
    for better, worse in zip(scores, scores[1:]):
        assert worse["iou"] < better["iou"] and worse["fscore"] < better["fscore"]
        assert worse["chamfer_l1"] > better["chamfer_l1"]
        assert worse["normal_consistency"] < better["normal_consistency"]


def test_oracle_prefers_a_reconstruction_to_another_object(chair):
    mesh, ref = chair
    recon = oracle_metrics(occupancy_to_mesh(voxelize(mesh, R)), ref, params=PARAMS)
    other = oracle_metrics(build_shape("chair", 4), ref, params=PARAMS)
    assert recon["oracle_score"] > other["oracle_score"] and recon["iou"] > other["iou"]
    again = oracle_metrics(occupancy_to_mesh(voxelize(mesh, R)), ref, params=PARAMS)
    assert again == recon, "metrics must be deterministic"


def test_reference_or_mesh_give_the_same_numbers(chair):
    mesh, ref = chair
    other = build_shape("chair", 4)
    assert oracle_metrics(other, mesh, params=PARAMS) == oracle_metrics(other, ref, params=PARAMS)


def test_buried_faces_of_overlapping_bodies_are_not_surface():
    # Two overlapping boxes whose union is one box: the union must score as that box.
    a = trimesh.creation.box(extents=[0.4, 0.3, 0.3])
    a.apply_translation([-0.1, 0, 0])
    b = trimesh.creation.box(extents=[0.4, 0.3, 0.3])
    b.apply_translation([0.1, 0, 0])
    union_box = trimesh.creation.box(extents=[0.6, 0.3, 0.3])
    two_bodies = trimesh.util.concatenate([a, b])
    pts, _ = surface_samples(two_bodies, 2000, seed=0)
    interior = (np.abs(pts[:, 0]) < 0.299) & (np.abs(pts[:, 1]) < 0.149) & (np.abs(pts[:, 2]) < 0.149)
    assert not interior.any()
    m = oracle_metrics(two_bodies, union_box, params=PARAMS)
    assert m["fscore"] == pytest.approx(1.0) and m["iou"] == pytest.approx(1.0)
    assert m["chamfer_l1"] < 0.005


def _nan_mesh():
    mesh = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    vertices = mesh.vertices.copy()
    vertices[0] = np.nan
    return trimesh.Trimesh(vertices, mesh.faces, process=False)


@pytest.mark.parametrize("make, flag", [
    (lambda: None, "empty"),
    (lambda: trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)), "empty"),
    (_nan_mesh, "nan"),
    (lambda: occupancy_to_mesh(np.zeros((R, R, R))), "empty"),
])
def test_bad_predictions_get_worst_scores_and_a_flag(chair, make, flag):
    _, ref = chair
    m = oracle_metrics(make(), ref, params=PARAMS)
    assert m[flag] is True
    for key, value in WORST.items():
        assert m[key] == value


def test_bad_files_give_flags_never_exceptions(tmp_path, chair):
    mesh, ref = chair
    missing = load_mesh(tmp_path / "nope.ply")
    assert missing[0] is None and missing[1]["missing"]
    junk = tmp_path / "junk.ply"
    junk.write_text("this is not a mesh\n")
    assert load_mesh(junk)[0] is None and load_mesh(junk)[1]["corrupt"]
    empty = tmp_path / "empty.ply"
    trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)).export(empty)
    assert load_mesh(empty)[0] is None and load_mesh(empty)[1]["empty"]
    nan = tmp_path / "nan.ply"
    _nan_mesh().export(nan)
    loaded, flags = load_mesh(nan)
    assert loaded is None and flags["nan"]
    good = tmp_path / "good.ply"
    mesh.export(good)
    loaded, flags = load_mesh(good)
    assert not any(flags.values()) and len(loaded.faces) == len(mesh.faces)
    # flags from loading flow into the metrics
    m = oracle_metrics(None, ref, params=PARAMS, pred_flags=load_mesh(junk)[1])
    assert m["corrupt"] and m["empty"] and m["fscore"] == 0.0


def test_bad_ground_truth_and_params_are_errors():
    with pytest.raises(ValueError, match="ground-truth mesh is unusable"):
        oracle_metrics(build_shape("stool", 0), None, params=PARAMS)
    bad = {**PARAMS, "geometry": {**PARAMS["geometry"], "fscore_tau": -1}}
    with pytest.raises(ParamsError, match="geometry.fscore_tau"):
        oracle_metrics(build_shape("stool", 0), build_shape("stool", 0), params=bad)


def test_validity_proxies():
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    v = validity(box)
    assert v["watertight"] and v["winding_consistent"] and v["n_components"] == 1
    assert v["euler_number"] == 2 and v["n_degenerate_faces"] == 0
    open_box = trimesh.Trimesh(box.vertices, box.faces[:-1], process=False)
    assert not validity(open_box)["watertight"]
    flipped = box.copy()
    flipped.faces[0] = flipped.faces[0][::-1]
    assert not validity(flipped)["winding_consistent"]
    far = box.copy()
    far.apply_translation([2, 0, 0])
    assert validity(trimesh.util.concatenate([box, far]))["n_components"] == 2
    degenerate = trimesh.Trimesh(np.vstack([box.vertices, [[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0]]]),
                                 np.vstack([box.faces, [[8, 9, 10]]]), process=False)
    assert validity(degenerate)["n_degenerate_faces"] == 1
    torus_like = occupancy_to_mesh(_ring_grid())
    assert validity(torus_like)["euler_number"] == 0  # genus 1
    empty = validity(None)
    assert empty["empty"] and not empty["watertight"] and empty["n_components"] == 0
    assert validity(_nan_mesh())["nan"] and not validity(_nan_mesh())["watertight"]


def _ring_grid():
    grid = np.zeros((R, R, R), np.float32)
    grid[8:24, 12:20, 8:24] = 1.0
    grid[13:19, 12:20, 13:19] = 0.0
    return grid


def _topology_cases():
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    f = box.faces
    far = box.copy()
    far.apply_translation([2, 0, 0])
    noisy = np.clip(_ring_grid() + np.random.default_rng(0).normal(0, 0.3, (R, R, R)), 0, 1)
    return {
        "box": box,
        "open": trimesh.Trimesh(box.vertices, f[:-2], process=False),
        "flipped": trimesh.Trimesh(box.vertices, np.vstack([f[:-1], f[-1:, ::-1]]), process=False),
        "duplicate face": trimesh.Trimesh(box.vertices, np.vstack([f, f[:1]]), process=False),
        "non-manifold edge": trimesh.Trimesh(box.vertices, np.vstack([f, [[f[0, 0], f[0, 1], 7]]]), process=False),
        "repeated vertex": trimesh.Trimesh(box.vertices, np.vstack([f, [[0, 0, 1]]]), process=False),
        "two bodies": trimesh.util.concatenate([box, far]),
        "multi-body chair": build_shape("chair", 3),
        "ring": occupancy_to_mesh(_ring_grid()),
        "noisy decode": occupancy_to_mesh(noisy.astype(np.float32)),
    }


@pytest.mark.parametrize("name", list(_topology_cases()))
def test_edge_topology_matches_trimesh(name):
    from judge3d.world.topology import edge_topology

    mesh = _topology_cases()[name]
    ref = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    topo = edge_topology(mesh.faces, len(mesh.vertices))
    assert topo.watertight == ref.is_watertight
    assert topo.winding_consistent == ref.is_winding_consistent
    assert topo.n_components == len(trimesh.graph.connected_components(
        ref.face_adjacency, nodes=np.arange(len(ref.faces)), min_len=1))
    assert topo.n_edges == len(ref.edges_unique)


def test_separable_upsample_equals_scipy_trilinear_interpolation():
    from scipy import ndimage

    from judge3d.world.voxel import upsample_trilinear

    grid = np.random.default_rng(1).random((6, 7, 5))
    for factor in (1, 2, 3):
        axes = [np.arange((n - 1) * factor + 1) / factor for n in grid.shape]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"))
        expected = ndimage.map_coordinates(grid, coords, order=1, mode="nearest")
        assert np.allclose(upsample_trilinear(grid, factor), expected, rtol=0, atol=1e-15)


def test_validity_flags_face_indices_outside_the_vertex_array():
    box = trimesh.creation.box(extents=[0.3, 0.3, 0.3])
    for bad in (-1, len(box.vertices)):
        faces = box.faces.copy()
        faces[0, 0] = bad
        v = validity(trimesh.Trimesh(box.vertices, faces, process=False, validate=False))
        assert v["corrupt"] and not v["watertight"] and v["n_components"] == 0
