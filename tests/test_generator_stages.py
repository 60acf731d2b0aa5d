"""Flow stages on a toy sparse layout: pairs, per-sample errors, noise, a two-stage generator, and
model folders that list their weight files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from judge3d.generators import sampler as rf
from judge3d.generators.base import Generator, check_model_dir
from judge3d.generators.stages import (DenseFlowStage, SparseFlowStage, SparseLatent, StageSampler, cat_latents,
                                       pack_outputs, split_latents, unpack_outputs)

R, C = 4, 3     # toy grid side and channels per voxel
SIGMA = 1e-5


def toy_sparse(seed: int, counts: list[int]) -> SparseLatent:
    """Samples with ``counts[i]`` distinct random voxels each, in random order."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for i, n in enumerate(counts):
        cells = torch.randperm(R ** 3, generator=g)[:n]
        xyz = torch.stack([cells // (R * R), (cells // R) % R, cells % R], 1)
        coords.append(torch.cat([torch.full((n, 1), i), xyz], 1))
    coords = torch.cat(coords).to(torch.int32)
    return SparseLatent(coords, torch.randn(coords.shape[0], C, generator=g), len(counts))


def assert_same(a: SparseLatent, b: SparseLatent) -> None:
    assert a.batch_size == b.batch_size
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)


class PointwiseFlow(nn.Module):
    """A velocity that acts on each voxel alone: ``v = x W + t b + mean(cond)``, so a sparse call and
    a dense call on the same voxels must agree exactly where both are defined."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(C, C, generator=g) * 0.5)
        self.b = nn.Parameter(torch.randn(C, generator=g))

    def channels_last(self, feats: torch.Tensor, t: torch.Tensor, cond_mean: torch.Tensor) -> torch.Tensor:
        return feats @ self.w + t[:, None] * self.b + cond_mean[:, None]

    def forward(self, x, t, cond):
        cond_mean = cond.mean(dim=(1, 2))
        if isinstance(x, SparseLatent):
            owner = x.sample_index
            return x.with_feats(self.channels_last(x.feats, t[owner], cond_mean[owner]))
        b = x.shape[0]                      # dense (B, C, R, R, R)
        flat = x.reshape(b, C, -1).transpose(1, 2)
        out = self.channels_last(flat.reshape(-1, C), t.repeat_interleave(flat.shape[1]),
                                 cond_mean.repeat_interleave(flat.shape[1]))
        return out.reshape(b, -1, C).transpose(1, 2).reshape(x.shape)


def sparse_stage(flow=None) -> SparseFlowStage:
    return SparseFlowStage("slat", flow or PointwiseFlow(), C, R, SIGMA, coords_from=occupied_coords)


def occupied_coords(structure: torch.Tensor) -> torch.Tensor:
    """The toy's sparse-structure decoder: voxels whose dense value is positive."""
    return torch.nonzero(structure[:, 0] > 0).to(torch.int32)


# --- pairs ----------------------------------------------------------------------------------------
def test_sparse_pairs_concatenate_and_split_back_exactly(tmp_path):
    w, l = toy_sparse(1, [5, 2, 7]), toy_sparse(2, [3, 6, 1])
    pair = cat_latents([w, l])
    assert pair.batch_size == 6 and pair.coords.shape[0] == 24
    assert pair.voxel_counts().tolist() == [5, 2, 7, 3, 6, 1]
    back_w, back_l = split_latents(pair, [3, 3])
    assert_same(back_w, w)
    assert_same(back_l, l)
    # Selecting samples renumbers them and keeps each one's voxels in order.
    picked = w.select([2, 0])
    assert_same(picked.select([1]), w.select([0]))
    assert picked.voxel_counts().tolist() == [7, 5]
    with pytest.raises(ValueError, match="add up"):
        split_latents(pair, [3, 2])
    # Every stage's output of one candidate survives its latents file.
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    outputs = {"ss": torch.randn(3, 1, R, R, R), "slat": w}
    save_file(pack_outputs(outputs, 2), str(tmp_path / "c.safetensors"))
    loaded = unpack_outputs(load_file(str(tmp_path / "c.safetensors")))
    assert torch.equal(loaded["ss"], outputs["ss"][2:3])
    assert_same(loaded["slat"], w.select([2]))


# --- per-sample errors ------------------------------------------------------------------------------
def dense_embedding(x: SparseLatent) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse feats written into a dense (B, C, R, R, R) grid, and the occupancy mask."""
    grid = torch.zeros(x.batch_size, C, R, R, R)
    mask = torch.zeros(x.batch_size, 1, R, R, R)
    i, a, b, c = (x.coords[:, k].long() for k in range(4))
    grid[i, :, a, b, c] = x.feats
    mask[i, 0, a, b, c] = 1.0
    return grid, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sparse_errors_equal_the_dense_computation_on_the_same_voxels(reduction):
    stage = sparse_stage()
    x0, noise = toy_sparse(3, [4, 9, 1]), toy_sparse(3, [4, 9, 1]).with_feats(torch.randn(14, C))
    t, cond = torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 2, 5)
    sparse = stage.flow_errors(x0, cond, t=t, noise=noise, reduction=reduction)

    x0_d, mask = dense_embedding(x0)
    noise_d, _ = dense_embedding(noise)
    sq = (stage.flow_model(rf.noisy_latents(x0_d, t, noise_d, SIGMA), t, cond)
          - rf.velocity_target(x0_d, noise_d, SIGMA)) ** 2
    summed = (sq * mask).sum(dim=(1, 2, 3, 4))
    dense = summed if reduction == "sum" else summed / (mask.sum(dim=(1, 2, 3, 4)) * C)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    # Each sample's error is its own: alone it is the same.
    alone = stage.flow_errors(x0.select([1]), cond[1:2], t=t[1:2], noise=noise.select([1]), reduction=reduction)
    torch.testing.assert_close(alone[0], sparse[1], rtol=1e-6, atol=1e-7)
    empty = SparseLatent(x0.coords[:4], x0.feats[:4], 2)       # sample 1 owns no voxel
    with pytest.raises(ValueError, match="no voxel"):
        stage.flow_errors(empty, cond[:2], t=t[:2], noise=empty.feats, reduction="mean")


# --- noise ----------------------------------------------------------------------------------------
def test_sparse_noise_depends_only_on_the_seed_and_own_coords():
    stage = sparse_stage()
    batch = toy_sparse(4, [6, 3])
    noise = stage.noise([11, 22], batch.coords)
    again = stage.noise([11, 22], batch.coords)
    assert_same(noise, again)
    # Sample 1 alone, in another batch, or with its voxels listed in another order: the same values.
    alone = stage.noise([22], batch.select([1]).coords)
    assert torch.equal(alone.feats, noise.select([1]).feats)
    other_batch = stage.noise([99, 22], cat_latents([toy_sparse(5, [2]), batch.select([1])]).coords)
    assert torch.equal(other_batch.select([1]).feats, noise.select([1]).feats)
    one = batch.select([1])
    order = torch.tensor([2, 0, 1])
    shuffled = stage.noise([22], one.coords[order])
    assert torch.equal(shuffled.feats, alone.feats[order])
    assert not torch.allclose(stage.noise([23], one.coords).feats, alone.feats)
    # noise_like of a winner/loser pair with one seed per pair: the same field under both.
    w, l = batch.select([0]), toy_sparse(6, [6])
    pair_noise = stage.noise_like(cat_latents([w, l]), [7, 7])
    field = rf.noise_from_seeds([7], (C, R, R, R))[0]
    for part, latent in zip(split_latents(pair_noise, [1, 1]), (w, l)):
        xyz = latent.coords[:, 1:].long()
        assert torch.equal(part.feats, field[:, xyz[:, 0], xyz[:, 1], xyz[:, 2]].T)


# --- a two-stage generator ---------------------------------------------------------------------------
class Recording(nn.Module):
    """Wraps a flow model and records (batch, t) of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, cond):
        self.calls.append((cond.shape[0], float(t[0])))
        return self.inner(x, t, cond)


class ToyTwoStage(Generator):
    """Dense structure stage ``ss`` (B, 1, R, R, R), then ``slat`` on the structure's positive voxels."""

    sigma_min = SIGMA

    def __init__(self):
        self.device = torch.device("cpu")
        ss_flow = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            ss_flow.weight.fill_(0.5)
            ss_flow.bias.fill_(-0.3)
        self.ss = Recording(_IgnoreCond(ss_flow))
        self.slat = Recording(PointwiseFlow())
        self.stages = [DenseFlowStage("ss", self.ss, (1, R, R, R), SIGMA), sparse_stage(self.slat)]

    def encode_images(self, images):
        return torch.as_tensor(images, dtype=torch.float32)

    def encode_shapes(self, voxels):
        raise NotImplementedError

    def decode(self, outputs):
        return [len(s.coords) for s in split_latents(self.stage_outputs(outputs)["slat"],
                                                     [1] * self.stage_outputs(outputs)["slat"].batch_size)]

    def save(self, path):
        raise NotImplementedError

    @classmethod
    def load(cls, path, device="auto"):
        raise NotImplementedError


class _IgnoreCond(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, cond):
        return self.inner(x)


def test_two_stage_toy_generator_samples_end_to_end_with_per_stage_settings():
    gen = ToyTwoStage()
    cond = torch.randn(3, 2, 5)
    settings = {"ss": StageSampler(steps=3, cfg_strength=0.0, rescale_t=1.0),
                "slat": StageSampler(steps=2, cfg_strength=2.0, cfg_interval=(0.0, 1.0), rescale_t=3.0)}
    out = gen.sample(cond, settings, seed=[5, 6, 7])
    assert list(out) == ["ss", "slat"]
    ss, slat = out["ss"], out["slat"]
    assert ss.shape == (3, 1, R, R, R) and isinstance(slat, SparseLatent) and slat.batch_size == 3
    # Stage 2 is laid out on stage 1's output; each stage ran its own schedule and guidance.
    assert torch.equal(slat.coords, occupied_coords(ss))
    assert slat.coords.shape[0] > 0 and torch.isfinite(slat.feats).all()
    assert [b for b, _ in gen.ss.calls] == [3] * 3
    assert [t for _, t in gen.ss.calls] == pytest.approx(rf.timestep_schedule(3, 1.0)[:-1])
    assert [b for b, _ in gen.slat.calls] == [6] * 2                                # CFG doubles the batch
    assert [t for _, t in gen.slat.calls] == pytest.approx(rf.timestep_schedule(2, 3.0)[:-1])
    assert gen.decode(out) == slat.voxel_counts().tolist()
    # Each sample depends on its own seed only, in both stages.
    alone = gen.sample(cond[1:2], settings, seed=[6])
    torch.testing.assert_close(alone["ss"][0], ss[1], rtol=0, atol=1e-6)
    assert torch.equal(alone["slat"].coords[:, 1:], slat.select([1]).coords[:, 1:])
    torch.testing.assert_close(alone["slat"].feats, slat.select([1]).feats, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="slat"):
        gen.sample(cond, {"ss": settings["ss"]}, seed=0)
    with pytest.raises(TypeError, match="per stage"):
        gen.sample(cond, settings["ss"], seed=0)
    with pytest.raises(KeyError, match="stages"):
        gen.stage("flow")


# --- model folders ----------------------------------------------------------------------------------
def test_model_folder_lists_its_weight_files(tmp_path):
    from safetensors.torch import save_file

    from judge3d.core.io import ModelFileError

    folder = tmp_path / "trellis"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"backend": "toy", "weights": ["ss.safetensors",
                                                                                   "slat.safetensors"]}))
    save_file({"w": torch.zeros(2)}, str(folder / "ss.safetensors"))
    with pytest.raises(FileNotFoundError, match="slat.safetensors"):
        check_model_dir(folder)
    save_file({"w": torch.zeros(4)}, str(folder / "slat.safetensors"))
    assert check_model_dir(folder) == folder
    data = (folder / "slat.safetensors").read_bytes()
    (folder / "slat.safetensors").write_bytes(data[:-3])
    with pytest.raises(ModelFileError, match="slat.safetensors.*truncated"):
        check_model_dir(folder)
    (folder / "config.json").write_text(json.dumps({"weights": ["../elsewhere.safetensors"]}))
    with pytest.raises(ModelFileError, match="weights"):
        check_model_dir(folder)
    assert not Path(tmp_path / "elsewhere.safetensors").exists()
