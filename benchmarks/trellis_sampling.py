"""TRELLIS sampling throughput on a GPU: the judge3d backend vs TRELLIS's own pipeline path, per stage and budget.

Full-size TRELLIS-image-large models built from TRELLIS's own configs with random weights (no
weights needed): the sparse-structure flow (``configs/generation/ss_flow_img_dit_L_16l8_fp16.json``)
and its decoder, the structured-latent flow (``slat_flow_img_dit_L_64l8p2_fp16.json``) and the mesh
decoder (``configs/vae/slat_vae_dec_mesh_swin8_B_64l8_fp16.json``). Conditioning is random
(B, 1374, 1024) tokens, the shape DINOv2-with-registers gives at 518 px (the conditioner itself is
benchmarked apart).

Both paths run the same model and TRELLIS's own sampler class; they differ in how noise is made
(TRELLIS: one ``torch.randn`` batch from the global RNG; the backend: one seeded draw per sample, so
a candidate does not depend on its batch) and in the backend's bookkeeping. The baseline is
TRELLIS's path measured in the same run, at the same batch.

The SLat stage runs on a chair-like structure on the 64^3 grid (seat, back, four legs), since a
random sparse-structure decoder gives no meaningful occupancy.

Also: one LoRA (r 64) flow-matching step on the SLat flow's ``SparseLinear`` layers and one Flow-DPO
step, when judge3d's TRELLIS LoRA is available; and the FLOP limit of the sparse-structure stage
(FLOPs of one forward counted by ``torch.utils.flop_counter``, at the GPU's measured bf16 peak).

Needs: a CUDA GPU, TRELLIS source (``JUDGE3D_TRELLIS_SRC``), spconv's CUDA build, easydict, plyfile.
Sparse attention runs through the test suite's sdpa stand-in for ``xformers`` (``tests/trellis_stand_ins.py``)
where xformers/flash_attn are not installed, as in the measurements in ``benchmarks/results/``.

    python benchmarks/trellis_sampling.py [--quick] [--out benchmarks/results/trellis_sampling_h200.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

PEAK_BF16_TFLOPS = 790.0   # H200 dense bf16, measured on the device machine (8192^3 matmul)
CONFIGS = {
    "sparse_structure_flow_model": ("generation/ss_flow_img_dit_L_16l8_fp16.json", "denoiser"),
    "sparse_structure_decoder": ("vae/ss_vae_conv3d_16l8_fp16.json", "decoder"),
    "slat_flow_model": ("generation/slat_flow_img_dit_L_64l8p2_fp16.json", "denoiser"),
    "slat_decoder_mesh": ("vae/slat_vae_dec_mesh_swin8_B_64l8_fp16.json", "decoder"),
}
# TRELLIS-image-large's pipeline.json sampler settings (its `run` defaults); SLat normalization is
# identity here (random weights).
PIPELINE_ARGS = {
    "models": {k: f"ckpts/{k}" for k in CONFIGS},
    "sparse_structure_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                                 "params": {"steps": 25, "cfg_strength": 7.5, "cfg_interval": [0.5, 1.0],
                                            "rescale_t": 3.0}},
    "slat_sampler": {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                     "params": {"steps": 25, "cfg_strength": 3.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}},
    "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8},
}


def build_models(trellis, src: Path, tiny: bool):
    """TRELLIS-image-large's models from TRELLIS's configs (or the backend's tiny configs), random weights."""
    import torch

    from judge3d.generators.trellis import tiny_model_configs

    tiny_specs = tiny_model_configs()
    models, configs = {}, {}
    for key, (rel, section) in CONFIGS.items():
        spec = tiny_specs[key] if tiny else json.loads((src / "configs" / rel).read_text())["models"][section]
        torch.manual_seed(0)
        models[key] = getattr(trellis.models, spec["name"])(**spec["args"])
        configs[key] = {"name": spec["name"], "args": spec["args"]}
    return models, configs


def chair_coords(batch: int, res: int = 64):
    """(N, 4) voxels of a chair-like structure (seat slab, back, four legs) per sample, TRELLIS's axes (z up)."""
    import torch

    grid = torch.zeros(res, res, res, dtype=torch.bool)
    lo, hi = res // 4, 3 * res // 4
    grid[lo:hi, lo:hi, res // 2 - 2:res // 2 + 1] = True                  # seat
    grid[lo:hi, hi - 3:hi, res // 2:hi + res // 8] = True                 # back
    for x in (lo, hi - 3):
        for y in (lo, hi - 3):
            grid[x:x + 3, y:y + 3, res // 8:res // 2 - 2] = True          # legs
    xyz = torch.argwhere(grid)
    return torch.cat([torch.cat([torch.full((len(xyz), 1), b), xyz], 1) for b in range(batch)]).int()


def timed(fn, repeats: int) -> float:
    """Seconds per call: one warm-up, then the mean of ``repeats`` synchronized calls."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def forwards_per_sample(settings) -> int:
    """Model evaluations of one sample: two inside the CFG interval (cond + uncond), else one."""
    from judge3d.generators.sampler import guidance_active, timestep_schedule

    ts = timestep_schedule(settings.steps, settings.rescale_t)[:-1]
    return sum(2 if guidance_active(float(t), settings.cfg_strength, settings.cfg_interval) else 1 for t in ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and batches")
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: checks the script, times nothing real")
    ap.add_argument("--out", default=None, help="also write the report here")
    args = ap.parse_args()

    import trellis_stand_ins

    trellis_stand_ins.install()
    import torch

    if args.tiny:
        trellis_stand_ins.spconv_bias_on_cpu()
        trellis_stand_ins.spconv_backward_on_cpu()

    from judge3d.generators.stages import StageSampler
    from judge3d.generators.trellis import SLAT_STAGE, SS_STAGE, TrellisGenerator
    from judge3d.generators.trellis_import import import_trellis

    if not torch.cuda.is_available() and not args.tiny:
        print("trellis_sampling: needs a CUDA GPU (or --tiny, a CPU check of the script)")
        return 2
    device = "cpu" if args.tiny else "cuda"
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    torch.backends.cuda.matmul.allow_tf32 = True
    src = Path(os.environ["JUDGE3D_TRELLIS_SRC"])
    trellis = import_trellis()
    if args.tiny:
        trellis_stand_ins.mesh_extractor_on_cpu(trellis)
    t0 = time.perf_counter()
    models, configs = build_models(trellis, src, args.tiny)
    gen = TrellisGenerator(trellis, models, configs, PIPELINE_ARGS, device=device)
    n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}
    say(f"# TRELLIS-image-large{' (TINY configs, CPU check only)' if args.tiny else ''}, random weights from its "
        f"configs, {torch.cuda.get_device_name() if not args.tiny else 'CPU'}, "
        f"torch {torch.__version__}; built in {time.perf_counter() - t0:.1f} s")
    say("# params (M): " + ", ".join(f"{k} {v:.0f}" for k, v in n_params.items()))

    budgets = {"high": (25, True), "default": (12, True), "low": (2, False)}
    ss, slat = gen.stage(SS_STAGE), gen.stage(SLAT_STAGE)
    ss_params, slat_params = PIPELINE_ARGS["sparse_structure_sampler"]["params"], PIPELINE_ARGS["slat_sampler"]["params"]
    samplers = trellis.samplers
    repeats = 1 if args.quick else 2

    def settings(params, steps, cfg):
        return StageSampler(steps=steps, cfg_strength=params["cfg_strength"] if cfg else 0.0,
                            cfg_interval=tuple(params["cfg_interval"]), rescale_t=params["rescale_t"])

    def cond_tokens(b):
        g = torch.Generator().manual_seed(b)
        return torch.randn(b, 16 if args.tiny else 1374, gen.cond_channels, generator=g).to(device)

    # FLOP limit of the sparse-structure stage.
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *ss.shape, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            ss.velocity(x, torch.full((1,), 0.5, device=device), cond_tokens(1))
    flops_fwd = counter.get_total_flops()
    say(f"# sparse-structure flow: {flops_fwd / 1e12:.3f} TFLOP per forward (batch 1)")

    say("\n## sparse-structure stage (flow + decoder to coords), samples/s")
    say("| budget | batch | TRELLIS's own path | judge3d backend | backend / own | FLOP limit | backend / limit |")
    say("|---|---|---|---|---|---|---|")
    for name, (steps, cfg) in budgets.items():
        s = settings(ss_params, steps, cfg)
        limit = PEAK_BF16_TFLOPS * 1e12 / (flops_fwd * forwards_per_sample(s))
        for b in ((1, 32) if not args.quick else (1, 8)):
            cond = cond_tokens(b)
            neg = torch.zeros_like(cond)

            def own():
                noise = torch.randn(b, *ss.shape, device=device)
                kw = {} if not cfg else {"neg_cond": neg, "cfg_strength": s.cfg_strength, "cfg_interval": s.cfg_interval}
                sampler = (samplers.FlowEulerGuidanceIntervalSampler if cfg else samplers.FlowEulerSampler)(1e-5)
                z = sampler.sample(ss.flow_model, noise, cond, steps=steps, rescale_t=s.rescale_t, verbose=False, **kw).samples
                torch.argwhere(gen.models["sparse_structure_decoder"](z) > 0)

            def backend():
                noise = ss.noise(list(range(b))).to(device)
                z = ss.sample(noise, cond, neg, s)
                gen.structure_coords(z)

            with torch.no_grad():
                t_own, t_backend = timed(own, repeats), timed(backend, repeats)
            say(f"| {name} ({steps} steps{', CFG' if cfg else ', no CFG'}) | {b} | {b / t_own:.2f} | {b / t_backend:.2f} | "
                f"{t_own / t_backend:.2f} | {limit:.2f} | {b / t_backend / limit:.0%} |")

    say("\n## structured-latent stage on a chair-like structure, samples/s; mesh decode, s")
    say("| budget | batch | voxels/sample | TRELLIS's own path | judge3d backend | backend / own |")
    say("|---|---|---|---|---|---|")
    for name, (steps, cfg) in budgets.items():
        s = settings(slat_params, steps, cfg)
        for b in ((1, 4) if not args.quick else (1,)):
            coords = chair_coords(b, slat.resolution).to(device)
            cond = cond_tokens(b)
            neg = torch.zeros_like(cond)

            def own():
                noise = trellis.sparse.SparseTensor(feats=torch.randn(coords.shape[0], 8, device=device), coords=coords)
                kw = {} if not cfg else {"neg_cond": neg, "cfg_strength": s.cfg_strength, "cfg_interval": s.cfg_interval}
                sampler = (samplers.FlowEulerGuidanceIntervalSampler if cfg else samplers.FlowEulerSampler)(1e-5)
                sampler.sample(slat.flow_model, noise, cond, steps=steps, rescale_t=s.rescale_t, verbose=False, **kw)

            def backend():
                noise = slat.noise(list(range(b)), coords.cpu()).to(device)
                slat.sample(noise, cond, neg, s)

            with torch.no_grad():
                t_own, t_backend = timed(own, repeats), timed(backend, repeats)
            say(f"| {name} ({steps} steps{', CFG' if cfg else ', no CFG'}) | {b} | {coords.shape[0] // b} | "
                f"{b / t_own:.2f} | {b / t_backend:.2f} | {t_own / t_backend:.2f} |")
    for b in ((1, 4) if not args.tiny else (1,)):
        coords = chair_coords(b, slat.resolution).to(device)
        latents = slat.noise(list(range(b)), coords.cpu()).to(device)
        with torch.no_grad():
            t_dec = timed(lambda: gen.decode({SS_STAGE: None, SLAT_STAGE: latents}), 1)
        say(f"mesh decode, batch {b}: {t_dec:.3f} s")

    # A whole sample at the high budget: the structure stage, then the SLat stage and the mesh on the
    # chair-like structure (a random structure decoder's occupancy is no shape to time), one batch.
    b = 4
    cond, coords = cond_tokens(b), chair_coords(b, slat.resolution)
    neg = torch.zeros_like(cond)
    high_ss, high_slat = settings(ss_params, 25, True), settings(slat_params, 25, True)

    def whole():
        gen.structure_coords(ss.sample(ss.noise(list(range(b))).to(device), cond, neg, high_ss))
        latents = slat.sample(slat.noise(list(range(b)), coords).to(device), cond, neg, high_slat)
        gen.decode({SS_STAGE: None, SLAT_STAGE: latents})

    with torch.no_grad():
        t_whole = timed(whole, 1)
    say(f"\nwhole sample, high budget (structure stage, SLat stage on the chair structure, mesh), batch {b}: "
        f"{b / t_whole:.2f} samples/s")
    # One LoRA (r 64, alpha 128) step on the SLat flow's SparseLinear layers: SFT (flow matching on
    # the winners) and Flow-DPO (winner/loser pairs, the disabled adapter as reference), batch 4 pairs.
    from judge3d.adapt.lora import add_lora, reference, trainable_parameters
    from judge3d.adapt.losses import dpo_loss, sft_loss

    b = 4
    targets = ["mlp.0", "mlp.2", "input_layer", "out_layer"]
    slat.flow_model = add_lora(slat.flow_model, rank=64, alpha=128, dropout=0.0, targets=targets)
    opt = torch.optim.AdamW(trainable_parameters(slat.flow_model), lr=1e-5)
    coords = chair_coords(2 * b, slat.resolution)
    x0 = slat.noise(list(range(100, 100 + 2 * b)), coords).to(device)
    cond = cond_tokens(b)
    winners, losers = slat.split(x0, [b, b])
    t = torch.rand(b, device=device)
    noise_w, noise_l = slat.noise_like(winners, list(range(b))).to(device), slat.noise_like(losers, list(range(b))).to(device)

    def sft_step():
        opt.zero_grad()
        loss = sft_loss(slat.flow_errors(winners, cond, t=t, noise=noise_w))
        loss.backward()
        opt.step()

    def dpo_step():
        opt.zero_grad()
        e = slat.flow_errors(slat.cat([winners, losers]), torch.cat([cond, cond]), t=torch.cat([t, t]),
                             noise=slat.cat([noise_w, noise_l]))
        with torch.no_grad(), reference(slat.flow_model):
            e_ref = slat.flow_errors(slat.cat([winners, losers]), torch.cat([cond, cond]), t=torch.cat([t, t]),
                                     noise=slat.cat([noise_w, noise_l]))
        terms = dpo_loss(e[:b], e[b:], e_ref[:b], e_ref[b:], beta=500.0)
        terms.loss.backward()
        opt.step()

    n_lora = sum(p.numel() for p in trainable_parameters(slat.flow_model)) / 1e6
    say(f"\nLoRA r 64 on the SLat flow's SparseLinear layers ({n_lora:.1f} M trainable), batch {b} "
        f"({coords.shape[0] // (2 * b)} voxels/sample): SFT step {timed(sft_step, repeats):.3f} s, "
        f"DPO step {timed(dpo_step, repeats):.3f} s")
    if torch.cuda.is_available():
        say(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
