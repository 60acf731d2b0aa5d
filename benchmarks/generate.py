"""Generator sampling throughput: samples/s at 25 and 2 steps, batched vs one at a time (the baseline).

Uses models/base when present, else a randomly initialised generator of the params.yaml size
(throughput does not depend on the weights). Also times one pretraining step. CPU with
generate.threads threads, then CUDA when available.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from judge3d.core.config import load_params, require  # noqa: E402
from judge3d.generators import load_generator  # noqa: E402
from judge3d.pipeline.mesh_sets import load_budgets  # noqa: E402
from judge3d.generators.pretrain import TrainSettings, build_generator, fit  # noqa: E402


def make_generator(params, device):
    if (Path("models/base") / "model.safetensors").is_file():
        return load_generator("models/base", device=device), "models/base"
    torch.manual_seed(0)
    return build_generator(params, device=device), "random init (models/base not built)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampling(gen, cond, budget, batch, repeats=1):
    n = cond.shape[0]
    sync(gen.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, n, batch):
            gen.sample(cond[i:i + batch], budget.stages, seed=list(range(i, min(n, i + batch))))
    sync(gen.device)
    return n * repeats / (time.perf_counter() - t0)


def time_train_step(params, device, steps=5):
    gen = build_generator(params, device=device)
    s = TrainSettings.from_params(params)
    s.steps, s.warmup_steps = steps + 1, 1
    n = s.batch_size
    img = torch.rand(n, 3, gen.config.conditioner.image_size, gen.config.conditioner.image_size)
    x0 = gen.encode_shapes(np.random.default_rng(0).random((n,) + gen.latent_shape[1:]) > 0.9).cpu()
    s1 = TrainSettings(**{**s.__dict__, "steps": 1})
    fit(gen, img, x0, s1, 0, progress=False)  # warm-up
    sync(gen.device)
    t0 = time.perf_counter()
    fit(gen, img, x0, s, 0, progress=False)
    sync(gen.device)
    return (time.perf_counter() - t0) / s.steps


def main():
    params = load_params()
    threads = require(params, "generate.threads", int)
    torch.set_num_threads(threads)
    budgets = load_budgets(params)
    batch = require(params, "generate.batch_size", int)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        gen, source = make_generator(params, device)
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {threads} threads"
        print(f"== {name}; generator: {source}; batch {batch}")
        imgs = np.random.default_rng(0).integers(0, 256, size=(batch, 128, 128, 3), dtype=np.uint8)
        cond = gen.encode_images(imgs)
        for bname in ("high", "low"):
            b = budgets[bname]
            reps = 1 if device.type == "cpu" else 3
            base = time_sampling(gen, cond[:8], b, 1, reps)
            batched = time_sampling(gen, cond, b, batch, reps)
            flow = b.stages["flow"]
            print(f"{bname:5s} ({flow.steps:2d} steps, cfg {flow.cfg_strength}): batch 1 {base:8.1f} samples/s | "
                  f"batch {batch} {batched:8.1f} samples/s | ratio {batched / base:5.2f}x")
        t_mc = time.perf_counter()
        lat = gen.sample(cond[:8], budgets["default"].stages, seed=list(range(8)))
        try:
            meshes = gen.decode(lat)
            print(f"default 12 steps + decode of 8: {8 / (time.perf_counter() - t_mc):.1f} samples/s "
                  f"({sum(len(m.faces) > 0 for m in meshes)} non-empty)")
        except ImportError as exc:  # a bare GPU box without the mesh stack: sampling figures still stand
            print(f"decode skipped ({exc})")
        step = time_train_step(params, device)
        steps = require(params, "base.train.steps", int)
        print(f"pretrain step (batch {params['base']['train']['batch_size']}): {step:.3f} s -> "
              f"{steps} steps ~ {steps * step / 60:.1f} min")


if __name__ == "__main__":
    main()
