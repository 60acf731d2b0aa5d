"""TRELLIS sampling throughput on a GPU: the judge3d backend vs TRELLIS's own pipeline path, per stage
and budget, and what the backend's opt-in speed-ups give, all in one run.

Full-size TRELLIS-image-large models built from TRELLIS's own configs with random weights (no
weights needed): the sparse-structure flow (``configs/generation/ss_flow_img_dit_L_16l8_fp16.json``)
and its decoder, the structured-latent flow (``slat_flow_img_dit_L_64l8p2_fp16.json``) and the mesh
decoder (``configs/vae/slat_vae_dec_mesh_swin8_B_64l8_fp16.json``). TRELLIS zero-initializes the
flows' adaLN modulation and output layers (a flow that predicts 0 whatever its input); those get small
random values here, as trained weights have, so that the equality checks compare real outputs (the
kernels and shapes, so the timings, are the same). Conditioning is random (B, 1374, 1024) tokens, the
shape DINOv2-with-registers gives at 518 px (the conditioner itself is benchmarked apart).

Both paths run the same model and TRELLIS's own sampler class; they differ in how noise is made
(TRELLIS: one ``torch.randn`` batch from the global RNG on the GPU; the backend: one seeded draw per
sample on the CPU, so a candidate does not depend on its batch) and in the backend's bookkeeping. The
baseline is TRELLIS's path measured in the same run, at the same batch; the calls being compared
alternate, so that drift in the machine's speed falls on both alike.

The backend's opt-in speed-ups, measured after the baseline: ``TrellisGenerator.compile`` (the
sparse-structure flow's transformer blocks through ``torch.compile``), ``pair_guidance`` (a guided
step's conditional and unconditional evaluations as one forward of twice the batch, still through
TRELLIS's samplers), larger batches, and, for the sparse-structure flow, torch's cuDNN attention
kernel and bf16 autocast where they beat the default (flash) kernel.

The SLat stage runs on a chair-like structure on the 64^3 grid (seat, back, four legs), since a
random sparse-structure decoder gives no meaningful occupancy.

Sparse attention. TRELLIS's sparse attention takes xformers or flash_attn; neither is installed on
the measuring machine, so it runs through a stand-in for ``xformers.ops.memory_efficient_attention``:
first the test suite's (``tests/trellis_stand_ins.py``: one sdpa call per sequence, as in earlier
results), then a varlen one (one flash-attention call over all sequences of the batch, what
xformers' block-diagonal kernel and flash_attn's varlen function do for real users). The report gives
the stand-ins' own share of a SLat forward.

Also: one LoRA (r 64) flow-matching step on the SLat flow's ``SparseLinear`` layers and one Flow-DPO
step; and the FLOP limit of the sparse-structure stage (FLOPs of one forward counted by
``torch.utils.flop_counter``, at the GPU's measured bf16 peak).

Needs: a CUDA GPU, TRELLIS source (``JUDGE3D_TRELLIS_SRC``), spconv's CUDA build, easydict, plyfile.

    python benchmarks/trellis_sampling.py [--quick] [--out benchmarks/results/trellis_sampling_h200.txt]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

PEAK_BF16_TFLOPS = 790.0   # H200 dense bf16, measured on the device machine (8192^3 matmul)
# Meshes decoded per call in a whole sample: spconv's implicit GEMM in the mesh decoder asserts that a
# feature map stays under 2^31 bytes, which 32 chairs at once (upsampled to 256^3) exceed.
DECODE_BATCH = 4
CONFIGS = {
    "sparse_structure_flow_model": ("generation/ss_flow_img_dit_L_16l8_fp16.json", "denoiser"),
    "sparse_structure_decoder": ("vae/ss_vae_conv3d_16l8_fp16.json", "decoder"),
    "slat_flow_model": ("generation/slat_flow_img_dit_L_64l8p2_fp16.json", "denoiser"),
    "slat_decoder_mesh": ("vae/slat_vae_dec_mesh_swin8_B_64l8_fp16.json", "decoder"),
}
FLOWS = ("sparse_structure_flow_model", "slat_flow_model")
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
    """TRELLIS-image-large's models from TRELLIS's configs (or the backend's tiny configs), random weights;
    the flows' zero-initialized layers drawn small and random (see the module docstring)."""
    import torch

    from judge3d.generators.trellis import tiny_model_configs

    tiny_specs = tiny_model_configs()
    models, configs = {}, {}
    for key, (rel, section) in CONFIGS.items():
        spec = tiny_specs[key] if tiny else json.loads((src / "configs" / rel).read_text())["models"][section]
        torch.manual_seed(0)
        models[key] = getattr(trellis.models, spec["name"])(**spec["args"])
        configs[key] = {"name": spec["name"], "args": spec["args"]}
        if key in FLOWS:
            with torch.no_grad():
                for p in models[key].parameters():
                    if p.numel() and not p.any():
                        p.normal_(0.0, 0.02)
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


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns, repeats: int, warmups=None) -> list[float]:
    """Seconds per call of each of ``fns``: one warm-up each (``warmups``, default the call itself),
    then ``repeats`` rounds in which the calls alternate."""
    for fn, warm in zip(fns, warmups or fns):
        warm()
    sync()
    totals = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            totals[i] += time.perf_counter() - t0
    return [t / repeats for t in totals]


def forwards_per_sample(settings) -> int:
    """Model evaluations of one sample: two inside the CFG interval (cond + uncond), else one."""
    from judge3d.generators.sampler import guidance_active, timestep_schedule

    ts = timestep_schedule(settings.steps, settings.rescale_t)[:-1]
    return sum(2 if guidance_active(float(t), settings.cfg_strength, settings.cfg_interval) else 1 for t in ts)


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| (b the reference)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


class AttentionStandIn:
    """What TRELLIS's sparse attention calls as ``xformers.ops.memory_efficient_attention``: the test
    suite's stand-in (``loop``: one sdpa call per sequence) or ``varlen`` (one flash-attention call over
    all sequences of the block-diagonal mask, on fp16/bf16 CUDA tensors without autograd; elsewhere the
    loop). While ``account`` is a list, each call's host seconds and CUDA events are added to it."""

    def __init__(self, ops, loop):
        self.ops, self.loop, self.mode, self.account, self.cu = ops, loop, "loop", None, {}
        ops.memory_efficient_attention = self

    def __call__(self, q, k, v, attn_bias=None):
        import torch

        if self.account is None or not q.is_cuda:
            return self.run(q, k, v, attn_bias)
        t0 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.run(q, k, v, attn_bias)
        end.record()
        self.account.append((time.perf_counter() - t0, start, end))
        return out

    def offsets(self, seqlens, device):
        import torch

        key = (tuple(seqlens), device)
        if key not in self.cu:
            self.cu[key] = torch.tensor([0] + list(seqlens), dtype=torch.int64).cumsum(0).to(device, torch.int32)
        return self.cu[key]

    def run(self, q, k, v, attn_bias):
        import torch

        if (self.mode == "loop" or attn_bias is None or not q.is_cuda or torch.is_grad_enabled()
                or q.dtype not in (torch.float16, torch.bfloat16)):
            return self.loop(q, k, v, attn_bias)
        q_, k_, v_ = (x[0] if x.stride(-1) == 1 else x[0].contiguous() for x in (q, k, v))
        out = torch.ops.aten._flash_attention_forward(
            q_, k_, v_, self.offsets(attn_bias.q_seqlen, q.device), self.offsets(attn_bias.kv_seqlen, q.device),
            max(attn_bias.q_seqlen), max(attn_bias.kv_seqlen), 0.0, False, False)[0]
        return out[None]


def kernel_shares(fn, top: int = 0) -> str:
    """GPU kernel time of one ``fn()`` by kind (torch.profiler), and the ``top`` longest kernels, or why
    it could not be read."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
        longest = []
        for e in prof.key_averages():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
            name = e.key.lower()
            kind = ("attention" if any(w in name for w in ("flash", "fmha", "attention", "cudnn")) else
                    "gemm" if any(w in name for w in ("gemm", "cutlass", "sm90", "cublas", "nvjet", "matmul", "xmma")) else
                    "other")
            kinds[kind] += us / 1e3
            longest.append((us / 1e3, e.key[:70]))
        total = sum(kinds.values())
        if total <= 0:
            return "no kernels recorded"
        return (f"kernels {total:.1f} ms: " + ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in kinds.items())
                + "".join(f"; {v:.1f} ms {k}" for v, k in sorted(longest, reverse=True)[:top]))
    except Exception as exc:        # the profiler depends on CUPTI on the machine; timings do not
        return f"profile unavailable ({type(exc).__name__}: {exc})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and batches")
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: checks the script, times nothing real")
    ap.add_argument("--out", default=None, help="also write the report here (line by line, as it is measured)")
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
    cuda = device == "cuda"
    lines: list[str] = []
    out_file = Path(args.out) if args.out else None
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        if out_file:
            out_file.write_text("\n".join(lines) + "\n")

    torch.backends.cuda.matmul.allow_tf32 = True
    src = Path(os.environ["JUDGE3D_TRELLIS_SRC"])
    trellis = import_trellis()
    if args.tiny:
        trellis_stand_ins.mesh_extractor_on_cpu(trellis)
    ops = sys.modules.get("xformers.ops")
    attn = (AttentionStandIn(ops, trellis_stand_ins.memory_efficient_attention)
            if ops is not None and ops.memory_efficient_attention is trellis_stand_ins.memory_efficient_attention else None)
    t0 = time.perf_counter()
    models, configs = build_models(trellis, src, args.tiny)
    gen = TrellisGenerator(trellis, models, configs, PIPELINE_ARGS, device=device)
    n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}
    say(f"# TRELLIS-image-large{' (TINY configs, CPU check only)' if args.tiny else ''}, random weights from its "
        f"configs, {torch.cuda.get_device_name() if cuda else 'CPU'}, "
        f"torch {torch.__version__}; built in {time.perf_counter() - t0:.1f} s")
    say("# params (M): " + ", ".join(f"{k} {v:.0f}" for k, v in n_params.items()))
    if attn is None:
        say("# sparse attention: a real xformers is installed; the stand-in rows are skipped")

    budgets = {"high": (25, True), "default": (12, True), "low": (2, False)}
    ss, slat = gen.stage(SS_STAGE), gen.stage(SLAT_STAGE)
    ss_params, slat_params = PIPELINE_ARGS["sparse_structure_sampler"]["params"], PIPELINE_ARGS["slat_sampler"]["params"]
    samplers = trellis.samplers
    repeats = 1 if args.quick else 2
    big = 8 if args.quick else 32           # the large batch of each table
    tokens = 16 if args.tiny else 1374

    def settings(params, steps, cfg):
        return StageSampler(steps=steps, cfg_strength=params["cfg_strength"] if cfg else 0.0,
                            cfg_interval=tuple(params["cfg_interval"]), rescale_t=params["rescale_t"])

    def cond_tokens(b):
        g = torch.Generator().manual_seed(b)
        return torch.randn(b, tokens, gen.cond_channels, generator=g).to(device)

    def reps(b):     # one call of a large batch takes seconds: once is enough
        return 1 if b >= 8 else repeats

    # FLOP limit of the sparse-structure stage.
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *ss.shape, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            ss.velocity(x, torch.full((1,), 0.5, device=device), cond_tokens(1))
    flops_fwd = counter.get_total_flops()
    say(f"# sparse-structure flow: {flops_fwd / 1e12:.3f} TFLOP per forward (batch 1)")

    def ss_limit(s):
        return PEAK_BF16_TFLOPS * 1e12 / (flops_fwd * forwards_per_sample(s))

    def ss_own(b, s):
        cond = cond_tokens(b)
        neg = torch.zeros_like(cond)

        def run():
            noise = torch.randn(b, *ss.shape, device=device)
            kw = {} if not s.cfg_strength else {"neg_cond": neg, "cfg_strength": s.cfg_strength, "cfg_interval": s.cfg_interval}
            sampler = (samplers.FlowEulerGuidanceIntervalSampler if s.cfg_strength else samplers.FlowEulerSampler)(1e-5)
            z = sampler.sample(ss.flow_model, noise, cond, steps=s.steps, rescale_t=s.rescale_t, verbose=False, **kw).samples
            torch.argwhere(gen.models["sparse_structure_decoder"](z) > 0)
        return run

    def ss_backend(b, s, context=contextlib.nullcontext):
        cond = cond_tokens(b)
        neg = torch.zeros_like(cond)

        def run():
            with context():
                noise = ss.noise(list(range(b))).to(device)
                z = ss.sample(noise, cond, neg, s)
                gen.structure_coords(z)
        return run

    def warm(s, steps):
        """The same settings with fewer steps: a warm-up that meets every batch size the real call
        meets (guided and unguided steps alike)."""
        return StageSampler(steps=min(s.steps, steps), cfg_strength=s.cfg_strength, cfg_interval=s.cfg_interval,
                            rescale_t=s.rescale_t)

    # == 1. sparse-structure stage, TRELLIS's path vs the backend as loaded =============================
    say("\n## sparse-structure stage (flow + decoder to coords), samples/s")
    say("| budget | batch | TRELLIS's own path | judge3d backend | backend / own | FLOP limit | backend / limit |")
    say("|---|---|---|---|---|---|---|")
    ss_base = {}
    for name, (steps, cfg) in budgets.items():
        s = settings(ss_params, steps, cfg)
        for b in (1, big):
            with torch.no_grad():
                t_own, t_backend = timed([ss_own(b, s), ss_backend(b, s)], reps(b),
                                         [ss_own(b, warm(s, 2)), ss_backend(b, warm(s, 2))])
            ss_base[name, b] = b / t_backend
            say(f"| {name} ({steps} steps{', CFG' if cfg else ', no CFG'}) | {b} | {b / t_own:.2f} | {b / t_backend:.2f} | "
                f"{t_own / t_backend:.2f} | {ss_limit(s):.2f} | {b / t_backend / ss_limit(s):.0%} |")

    # == 2. SLat stage, TRELLIS's path vs the backend as loaded (test-suite attention stand-in) ========
    def slat_own(b, s):
        coords = chair_coords(b, slat.resolution).to(device)
        cond = cond_tokens(b)
        neg = torch.zeros_like(cond)

        def run():
            noise = trellis.sparse.SparseTensor(feats=torch.randn(coords.shape[0], 8, device=device), coords=coords)
            kw = {} if not s.cfg_strength else {"neg_cond": neg, "cfg_strength": s.cfg_strength, "cfg_interval": s.cfg_interval}
            sampler = (samplers.FlowEulerGuidanceIntervalSampler if s.cfg_strength else samplers.FlowEulerSampler)(1e-5)
            sampler.sample(slat.flow_model, noise, cond, steps=s.steps, rescale_t=s.rescale_t, verbose=False, **kw)
        return run

    def slat_backend(b, s):
        coords = chair_coords(b, slat.resolution)
        cond = cond_tokens(b)
        neg = torch.zeros_like(cond)

        def run():
            noise = slat.noise(list(range(b)), coords).to(device)
            slat.sample(noise, cond, neg, s)
        return run

    def slat_rows(title, batches, budget_names):
        say(f"\n## {title}")
        say("| budget | batch | voxels/sample | TRELLIS's own path | judge3d backend | backend / own |")
        say("|---|---|---|---|---|---|")
        for name in budget_names:
            steps, cfg = budgets[name]
            s = settings(slat_params, steps, cfg)
            for b in batches:
                with torch.no_grad():
                    t_own, t_backend = timed([slat_own(b, s), slat_backend(b, s)], repeats,
                                             [slat_own(b, warm(s, 2)), slat_backend(b, warm(s, 2))])
                say(f"| {name} ({steps} steps{', CFG' if cfg else ', no CFG'}) | {b} | "
                    f"{chair_coords(1, slat.resolution).shape[0]} | {b / t_own:.2f} | {b / t_backend:.2f} | "
                    f"{t_own / t_backend:.2f} |")

    slat_rows("structured-latent stage on a chair-like structure, samples/s (sparse attention: one sdpa call "
              "per sequence, the test suite's stand-in)", (1, 4) if not args.quick else (1,), ["high", "low"])
    for b in (1, 4, big):
        coords = chair_coords(b, slat.resolution)
        noise_s, = timed([lambda: slat.noise(list(range(b)), coords).to(device)], repeats)
        say(f"backend's SLat noise (one seeded {slat.channels} x {slat.resolution}^3 draw per sample, on the CPU), "
            f"batch {b}: {noise_s:.3f} s")
    for b in ((1, 4) if not args.tiny else (1,)):
        coords = chair_coords(b, slat.resolution).to(device)
        latents = slat.noise(list(range(b)), coords.cpu()).to(device)
        with torch.no_grad():
            t_dec, = timed([lambda: gen.decode({SS_STAGE: None, SLAT_STAGE: latents})], 1)
        say(f"mesh decode, batch {b}: {t_dec:.3f} s")

    # == 3. a whole sample at the high budget, as loaded =================================================
    # The structure stage, then the SLat stage and the mesh on the chair-like structure (a random
    # structure decoder's occupancy is no shape to time), one batch.
    high_ss, high_slat = settings(ss_params, 25, True), settings(slat_params, 25, True)

    def whole(b, context=contextlib.nullcontext):
        cond, coords = cond_tokens(b), chair_coords(b, slat.resolution)
        neg = torch.zeros_like(cond)

        def run(s_ss=high_ss, s_slat=high_slat):
            with context():
                gen.structure_coords(ss.sample(ss.noise(list(range(b))).to(device), cond, neg, s_ss))
            latents = slat.sample(slat.noise(list(range(b)), coords).to(device), cond, neg, s_slat)
            for i in range(0, b, DECODE_BATCH):
                gen.decode({SS_STAGE: None, SLAT_STAGE: latents.select(range(i, min(b, i + DECODE_BATCH)))})
        return run, lambda: run(warm(high_ss, 8), warm(high_slat, 8))

    def whole_rate(b, context=contextlib.nullcontext):
        run, warm_run = whole(b, context)
        with torch.no_grad():
            t, = timed([run], 1, [warm_run])
        return b / t

    rate = whole_rate(4)
    say(f"\nwhole sample, high budget (structure stage, SLat stage on the chair structure, mesh), batch 4, "
        f"as loaded: {rate:.2f} samples/s")
    best_whole = {("as loaded", 4): rate}

    # == 4. sparse-structure flow: one forward at the large batch, where its time goes =================
    b = big
    xb, tb, cb = torch.randn(b, *ss.shape, device=device), torch.full((b,), 500.0, device=device), cond_tokens(b)
    x2, t2, c2 = xb[:2], torch.tensor([300.0, 800.0], device=device), cb[:2]

    def forward():
        with torch.no_grad():
            ss.flow_model(xb, tb, cb)

    def per_forward(context=contextlib.nullcontext) -> float | str:
        try:
            with context():
                return timed([forward], 3 if cuda else 1)[0]
        except Exception as exc:      # a kernel that does not take these inputs
            return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"

    def cudnn_attention():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

    def bf16_autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def ms(v):
        tflops = big * flops_fwd / v / 1e12 if isinstance(v, float) else 0.0
        return f"{v * 1e3:.1f} ms ({tflops:.0f} TFLOP/s, {tflops / PEAK_BF16_TFLOPS:.0%} of peak)" if tflops else v

    say(f"\n## sparse-structure flow, one forward at batch {big} ({big * flops_fwd / 1e12:.0f} TFLOP)")
    eager = per_forward()
    say(f"eager, sdpa's default kernel (flash): {ms(eager)}; {kernel_shares(forward) if cuda else ''}")
    cudnn = per_forward(cudnn_attention) if cuda else "needs CUDA"
    say(f"eager, sdpa's cuDNN kernel: {ms(cudnn)}")
    say(f"eager, bf16 autocast: {ms(per_forward(bf16_autocast) if cuda else 'needs CUDA')}")
    with torch.no_grad():
        ref_velocity = ss.flow_model(x2, t2, c2)

    # == 5. the backend's opt-in speed-ups on the sparse-structure stage (high budget) ==================
    s_high = settings(ss_params, 25, True)
    ss_best, ss_rows = {}, []      # the table follows the compiled forward's lines

    def option_row(label, b, context=contextlib.nullcontext, warm_steps=8):
        try:
            with torch.no_grad():
                t, = timed([ss_backend(b, s_high, context)], reps(b), [ss_backend(b, warm(s_high, warm_steps), context)])
        except Exception as exc:
            traceback.print_exc()
            ss_rows.append(f"| {label} | {b} | fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | |")
            return
        base = ss_base.get(("high", b))
        ss_best[label, b] = b / t
        ss_rows.append(f"| {label} | {b} | {b / t:.2f} | {f'{b / t / base:.2f}' if base else '-'} | "
                       f"{ss_limit(s_high):.2f} | {b / t / ss_limit(s_high):.0%} |")
        print(ss_rows[-1], flush=True)

    gen.pair_guidance(True, stages=(SS_STAGE,))
    for b in (1, 4):
        option_row("paired guidance", b, warm_steps=2)
    with torch.no_grad():
        s2 = ss.noise([0, 1]).to(device)
        paired_z = ss.sample(s2, c2, torch.zeros_like(c2), s_high)
        gen.pair_guidance(False, stages=(SS_STAGE,))
        plain_z = ss.sample(s2, c2, torch.zeros_like(c2), s_high)
    checks = [f"paired vs unpaired structure latents after 25 guided steps (batch 2): {rel_diff(paired_z, plain_z):.1e}"]

    t0 = time.perf_counter()
    gen.compile(**({"backend": "eager"} if args.tiny else {}))
    with torch.no_grad():
        compiled_velocity = ss.flow_model(x2, t2, c2)
    checks.append(f"compiled vs eager structure-flow velocity (batch 2): {rel_diff(compiled_velocity, ref_velocity):.1e}")
    compiled = per_forward()
    say(f"compiled blocks (TrellisGenerator.compile): {ms(compiled)}; first calls compiled in {time.perf_counter() - t0:.0f} s; "
        f"{kernel_shares(forward, top=4) if cuda else ''}")
    ss_context, best, kernel_note = contextlib.nullcontext, compiled, ""
    if cuda:
        import torch._dynamo
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for kernel, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            torch._dynamo.reset()         # a compiled graph picks its attention kernel when traced
            context = lambda backend=backend: sdpa_kernel([backend])      # noqa: E731
            v = per_forward(context)
            say(f"compiled blocks traced with sdpa's {kernel} kernel only: {ms(v)}")
            if isinstance(v, float) and isinstance(best, float) and v < 0.98 * best:
                ss_context, best, kernel_note = context, v, f" ({kernel} attention)"
        torch._dynamo.reset()
    option_row("compiled" + kernel_note, big, ss_context)
    gen.pair_guidance(True, stages=(SS_STAGE,))
    for b in (4, big):
        option_row("compiled + paired guidance" + kernel_note, b, ss_context)
    say("\n## sparse-structure stage with the backend's opt-in speed-ups, high budget (25 steps, CFG), samples/s")
    say("| options | batch | samples/s | vs backend as loaded, same batch | FLOP limit | fraction of limit |")
    say("|---|---|---|---|---|---|")
    for row in ss_rows:
        say(row)

    # == 6. SLat stage: a one-call (varlen) attention stand-in, paired guidance, larger batches ========
    if attn is not None:
        attn.mode = "varlen"
        slat_rows("structured-latent stage, sparse attention as one varlen flash-attention call per layer "
                  "(what xformers/flash_attn do), samples/s", (4,) if not args.quick else (1,), ["high"])
        say("\n## structured-latent stage with the backend's opt-in speed-ups, high budget (25 steps, CFG), varlen attention")
        say("| options | batch | samples/s |")
        say("|---|---|---|")
        for paired, batches in ((False, (big,)), (True, (4, big))):
            gen.pair_guidance(paired, stages=(SLAT_STAGE,))
            for b in batches:
                with torch.no_grad():
                    t, = timed([slat_backend(b, high_slat)], reps(b), [slat_backend(b, warm(high_slat, 8))])
                say(f"| {'paired guidance' if paired else 'as loaded'} | {b} | {b / t:.2f} |")
        gen.pair_guidance(False, stages=(SLAT_STAGE,))
        coords2, cond2 = chair_coords(2, slat.resolution), cond_tokens(2)
        noise2 = slat.noise([0, 1], coords2).to(device)
        with torch.no_grad():
            plain_slat = slat.sample(noise2, cond2, torch.zeros_like(cond2), high_slat)
            gen.pair_guidance(True, stages=(SLAT_STAGE,))
            paired_slat = slat.sample(noise2, cond2, torch.zeros_like(cond2), high_slat)
            attn.mode = "loop"
            loop_slat = slat.sample(noise2, cond2, torch.zeros_like(cond2), high_slat)
            attn.mode = "varlen"
        checks.append(f"paired vs unpaired SLat feats after 25 guided steps (batch 2): "
                      f"{rel_diff(paired_slat.feats, plain_slat.feats):.1e}")
        checks.append(f"varlen vs per-sequence attention stand-in, SLat feats (batch 2): "
                      f"{rel_diff(paired_slat.feats, loop_slat.feats):.1e}")

        # Where a SLat forward's time goes, and the stand-ins' own share of it.
        b = 4
        coords = chair_coords(b, slat.resolution).to(device)
        xs = trellis.sparse.SparseTensor(feats=torch.randn(coords.shape[0], 8, device=device), coords=coords)
        ts, cs = torch.full((b,), 500.0, device=device), cond_tokens(b)

        def slat_forward():
            with torch.no_grad():
                slat.flow_model(xs, ts, cs)

        say(f"\nSLat flow, one forward at batch {b} ({coords.shape[0]} voxels):")
        for mode in ("loop", "varlen"):
            attn.mode = mode
            wall, = timed([slat_forward], 3 if cuda else 1)
            attn.account = []
            slat_forward()
            sync()
            calls, attn.account = attn.account, None
            host = sum(c[0] for c in calls)
            gpu = sum(c[1].elapsed_time(c[2]) for c in calls) / 1e3 if calls else 0.0
            say(f"- attention stand-in {mode}: {wall * 1e3:.1f} ms a forward; {len(calls)} attention calls take "
                f"{host * 1e3:.1f} ms of host time ({host / wall:.0%}) and {gpu * 1e3:.1f} ms between their GPU events "
                f"({gpu / wall:.0%}); {kernel_shares(slat_forward) if cuda else ''}")
        attn.mode = "varlen"
        if cuda:
            with torch.no_grad():
                t_dec, = timed([lambda: gen.decode({SS_STAGE: None, SLAT_STAGE: slat.noise(list(range(4)), coords.cpu()).to(device)})], 1)
            say(f"mesh decode, batch 4, varlen attention: {t_dec:.3f} s")

    # == 7. a whole sample at the high budget with the speed-ups =========================================
    label = ("compiled structure flow" + kernel_note + ", paired guidance in both stages"
             + (", varlen sparse attention" if attn is not None else "") + f", meshes decoded {DECODE_BATCH} a call")
    gen.pair_guidance(True)
    say(f"\nwhole sample, high budget, {label}:")
    for b in (4, big):
        rate = whole_rate(b, ss_context)
        best_whole[label, b] = rate
        say(f"- batch {b}: {rate:.2f} samples/s")

    say("\nchecks (max |difference| / max |reference|):")
    for c in checks:
        say(f"- {c}")

    # == 8. LoRA steps (per-sequence attention stand-in: the varlen one has no backward here) ===========
    # One LoRA (r 64, alpha 128) step on the SLat flow's SparseLinear layers: SFT (flow matching on
    # the winners) and Flow-DPO (winner/loser pairs, the disabled adapter as reference), batch 4 pairs.
    if attn is not None:
        attn.mode = "loop"
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
    t_sft, t_dpo = timed([sft_step, dpo_step], repeats)
    say(f"\nLoRA r 64 on the SLat flow's SparseLinear layers ({n_lora:.1f} M trainable), batch {b} "
        f"({coords.shape[0] // (2 * b)} voxels/sample): SFT step {t_sft:.3f} s, DPO step {t_dpo:.3f} s")
    if cuda:
        say(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    # == summary against the goals ======================================================================
    limit = ss_limit(s_high)
    (label_ss, b_ss), rate_ss = max(ss_best.items(), key=lambda kv: kv[1]) if ss_best else (("-", 0), 0.0)
    (label_w, b_w), rate_w = max(best_whole.items(), key=lambda kv: kv[1])
    say("\n## summary")
    say(f"- sparse-structure stage, high budget: as loaded {ss_base['high', big]:.2f}/s at batch {big} "
        f"({ss_base['high', big] / limit:.0%} of the FLOP limit {limit:.2f}/s); best {rate_ss:.2f}/s "
        f"({label_ss}, batch {b_ss}; {rate_ss / limit:.0%} of the limit); goal 2.0/s")
    say(f"- whole sample, high budget: as loaded {best_whole['as loaded', 4]:.2f}/s at batch 4; best {rate_w:.2f}/s "
        f"({label_w}, batch {b_w}); goal 1.0/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
