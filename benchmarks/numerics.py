"""Do the pinned CPU numerics (judge3d.core.numerics) give byte-identical training on different CPUs, and
what do the pins cost in speed?

Each configuration runs in a fresh process (this script re-started as a child), because the
variables must be in the environment before torch, MKL and oneDNN initialise:

* ``native``          no pins (``JUDGE3D_NATIVE_NUMERICS=1``, pinned variables removed)
* ``pinned``          :func:`judge3d.core.numerics.pin_cpu_numerics`
* ``pinned_nomkldnn`` pinned, and ``torch.backends.mkldnn.enabled = False`` (no oneDNN conv/linear)

* ``pinned_fused``    pinned, and the optimizer is ``AdamW(fused=True)`` (ATen's own vectorised update,
  IEEE sqrt) instead of the default single-tensor AdamW, whose ``torch.sqrt`` goes through MKL VML
* ``pinned_cbwr_avx2`` pinned, with the earlier ``MKL_CBWR=AVX2,STRICT`` (differs across CPU vendors)

* ``pinned_cbwr_avx``, ``pinned_cbwr_avx_strict``, ``pinned_cbwr_sse42``: the other MKL branches
  (faster on AMD, but not the same bits on AMD and Intel: results/numerics_cpu_comparison.txt)

more for investigation (``--configs``): ``native_t1``/``pinned_t1`` (one thread), ``pinned_avx512``
(the pins, but ATen at AVX-512), ``native_avx2`` (only ``ATEN_CPU_CAPABILITY=avx2``),
``pinned_compat`` (``MKL_CBWR=COMPATIBLE``), any config + ``_fused`` (fused AdamW).

Every configuration uses the same intra-op thread count (``--threads``, default 2, as the stages'
params do), so the speed comparison isolates the ISA pins. Each child:

1. op probes: single ops (matmul, linear, conv2d/3d, layer norm, softmax, SDPA forward/backward,
   GELU, SiLU, exp/log/tanh/sin, reductions, an AdamW step, ...) on seeded inputs, each output hashed;
   they say which op differs when the training fingerprints differ;
2. ``mini``: trains the project's own generator networks (``judge3d.generators.mini``: the ViT
   conditioner with its conv patch embedding, and the DiT flow transformer with adaLN, self/cross
   attention through ``F.scaled_dot_product_attention``, GELU, LayerNorm) with the flow-matching loss,
   AdamW and gradient clipping, fp32, on seeded random data;
3. ``qwen``: a tiny Qwen2.5-VL built by ``judge3d.judges.tiny.build_tiny_judge`` (the judges' own
   builder), trained a few steps on seeded random token/pixel inputs with the two-letter loss;
4. with ``--judge-paths qwen2_5_vl,internvl``: each tiny judge trained through ``HFJudge.query_logits``
   (processor, chat template, padding: the path the training and judging stages use) on seeded random
   montages, and the hash of its ``p_first`` verdicts.

The op probes also cover numpy and scipy (SIMD loops, OpenBLAS, cKDTree), which build, render and score
the meshes.

It prints the sha256 of the final weights (and of the initial ones), steps/s, and a table.
All data come from torch's seeded CPU generator, so numpy's version plays no part.

    PYTHONPATH=src python benchmarks/numerics.py [--threads 2] [--configs pinned,native,pinned_nomkldnn]
        [--repeats 1] [--mini-steps 20] [--qwen-steps 20] [--judge-paths qwen2_5_vl,internvl]
        [--out benchmarks/results/numerics_cpu_x.txt]

Results (AMD EPYC vs Intel Xeon SPR, same torch 2.13.0+cpu): benchmarks/results/numerics_cpu_*.txt.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# this checkout's src/ after PYTHONPATH, so PYTHONPATH=<a frozen copy of src> can pin the code compared
if str(REPO / "src") not in sys.path:
    sys.path.append(str(REPO / "src"))

# The variables every configuration controls (numerics.PINNED_CPU_ENV's keys, read in the child).
EXTRA_KEYS = ["ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JUDGE3D_NATIVE_NUMERICS"]
DEFAULT_CONFIGS = "native,pinned,pinned_fused,pinned_cbwr_avx2,pinned_nomkldnn"
# pinned, with these variables changed (set after pin_cpu_numerics, before torch is imported)
PINNED_VARIANTS = {
    "pinned_avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "pinned_cbwr_avx2": {"MKL_CBWR": "AVX2,STRICT"},
    "pinned_cbwr_avx": {"MKL_CBWR": "AVX"},
    "pinned_cbwr_avx_strict": {"MKL_CBWR": "AVX,STRICT"},
    "pinned_cbwr_sse42": {"MKL_CBWR": "SSE4_2"},
    "pinned_compat": {"MKL_CBWR": "COMPATIBLE"},
    "pinned_compat_strict": {"MKL_CBWR": "COMPATIBLE,STRICT"},
}


# ---------------------------------------------------------------------------------------------
# Parent: one child process per configuration
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                        "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni"]
                return " ".join(f for f in keep if f in flags)
    except OSError:
        pass
    return "?"


def child_env(config: str, threads: int) -> dict[str, str]:
    from judge3d.core.numerics import PINNED_CPU_ENV  # plain module: imports no torch

    env = {k: v for k, v in os.environ.items() if k not in set(EXTRA_KEYS) | set(PINNED_CPU_ENV)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONHASHSEED"] = "0"
    if config.startswith("native"):
        env["JUDGE3D_NATIVE_NUMERICS"] = "1"
    if config.removesuffix("_fused") == "native_avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    return env


def run_child(config: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--threads", str(args.threads),
           "--mini-steps", str(args.mini_steps), "--qwen-steps", str(args.qwen_steps)]
    if args.no_qwen:
        cmd.append("--no-qwen")
    if args.judge_paths:
        cmd += ["--judge-paths", args.judge_paths]
    proc = subprocess.run(cmd, env=child_env(config, args.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {config} failed (rc {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"child {config} printed no RESULT line:\n{proc.stdout}\n{proc.stderr}")


def parent(args) -> None:
    configs = [c for c in args.configs.split(",") if c]
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"# judge3d CPU numerics benchmark: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(f"cpu: {cpu_model()} | flags: {cpu_flags()} | cores: {os.cpu_count()} | {platform.machine()}")
    say(f"python {platform.python_version()} | command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    import judge3d
    pkg = Path(judge3d.__file__).parent
    srcs = {f: hashlib.sha256((pkg / f).read_bytes()).hexdigest()[:12]
            for f in ("core/numerics.py", "generators/mini.py", "judges/tiny.py")}
    say(f"judge3d code: {pkg} " + " ".join(f"{k}={v}" for k, v in srcs.items()))
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for c in configs:
            r = run_child(c, args)
            results[c].append(r)
            print(f"  [{rep}] {c}: mini {r['mini']['final'][:16]} {r['mini']['steps_per_s']:.2f} it/s"
                  + (f" | qwen {r['qwen']['final'][:16]} {r['qwen']['steps_per_s']:.2f} it/s" if r.get("qwen") else ""),
                  flush=True)
    first = results[configs[0]][0]
    say(f"torch {first['torch']} | mkl {first['mkl']} | onednn {first['onednn']} | threads {args.threads}")
    say("")
    say("## environment per configuration")
    for c in configs:
        r = results[c][0]
        env = " ".join(f"{k}={v}" for k, v in r["env"].items() if v)
        say(f"{c:16s} capability={r['capability']} mkldnn={r['mkldnn']} threads={r['threads']} {env}")
    say("")
    # best steps/s over repeats (the machine is shared); fingerprints must agree across repeats
    base = {w: max(x[w]["steps_per_s"] for x in results["native"]) if "native" in results and results["native"]
            [0].get(w) else None for w in ("mini", "qwen")}
    say("## training fingerprints (sha256 of final fp32 weights) and speed; speed vs native in this run")
    say(f"{'config':16s} {'capability':10s} {'mini fingerprint':18s} {'mini it/s':>9s} {'vs nat':>7s}  "
        f"{'qwen fingerprint':18s} {'qwen it/s':>9s} {'vs nat':>7s}  stable")
    for c in configs:
        rs = results[c]
        cells = []
        for w in ("mini", "qwen"):
            if not rs[0].get(w):
                cells.append(f"{'-':18s} {'-':>9s} {'-':>7s}")
                continue
            sps = max(x[w]["steps_per_s"] for x in rs)
            rel = f"{sps / base[w]:.3f}" if base.get(w) else "-"
            cells.append(f"{rs[0][w]['final'][:16]:18s} {sps:9.3f} {rel:>7s}")
        stable = all(x["mini"]["final"] == rs[0]["mini"]["final"] and
                     (x.get("qwen") or {}).get("final") == (rs[0].get("qwen") or {}).get("final") for x in rs)
        say(f"{c:16s} {rs[0]['capability']:10s} {cells[0]}  {cells[1]}  {'yes' if stable else 'NO'} ({len(rs)} run(s))")
    judge_keys = [k for k in first if k.startswith("judge_")]
    if judge_keys:
        say("")
        say("## judge query path (HFJudge.query_logits, letter loss): final weights, p_first verdicts, it/s")
        for c in configs:
            for k in judge_keys:
                rs = results[c]
                stable = all(x[k]["final"] == rs[0][k]["final"] and x[k]["p_first"] == rs[0][k]["p_first"] for x in rs)
                say(f"{c:16s} {k:20s} {rs[0][k]['final'][:16]} p_first {rs[0][k]['p_first']} "
                    f"{max(x[k]['steps_per_s'] for x in rs):7.2f} it/s  {'stable' if stable else 'NOT STABLE'}")
    say("")
    say("## full fingerprints")
    for c in configs:
        r = results[c][0]
        for w in ("mini", "qwen"):
            if r.get(w):
                say(f"{c:16s} {w:4s} init {r[w]['init']} final {r[w]['final']} loss {r[w]['last_loss']!r}")
    say("")
    say("## op probes (sha256[:12] of each op's output; a differing column = that op's kernel differs)")
    names = list(first["probes"])
    say(f"{'op':22s} " + " ".join(f"{c[:16]:>16s}" for c in configs))
    for n in names:
        say(f"{n:22s} " + " ".join(f"{results[c][0]['probes'].get(n, '-'):>16s}" for c in configs))
    say("")
    say("## machine-readable")
    for c in configs:
        say("JSON " + json.dumps({"config": c, **{k: v for k, v in results[c][0].items()}}, sort_keys=True))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------
# Child: one configuration
# ---------------------------------------------------------------------------------------------
def sha(t) -> str:
    import numpy as np  # only for the bytes view; the values come from torch

    return hashlib.sha256(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes()).hexdigest()


def weights_sha(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(bytes.fromhex(sha(p)))
    return h.hexdigest()


def op_probes(torch) -> dict[str, str]:
    F = torch.nn.functional
    g = torch.Generator().manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    out: dict[str, str] = {}
    a, b = r(257, 129), r(129, 191)
    out["randn"] = sha(a)
    out["mm"] = sha(a @ b)
    x, w, bias = r(64, 65, 192), r(384, 192), r(384)
    out["linear"] = sha(F.linear(x, w, bias))
    out["bmm"] = sha(torch.bmm(r(8, 65, 48), r(8, 48, 65)))
    img, cw, cb = r(4, 3, 64, 64), r(128, 3, 8, 8), r(128)
    out["conv2d_patch"] = sha(F.conv2d(img, cw, cb, stride=8))
    out["conv2d_3x3"] = sha(F.conv2d(r(2, 16, 32, 32), r(32, 16, 3, 3), None, padding=1))
    out["conv3d_patch"] = sha(F.conv3d(r(16, 3, 2, 14, 14), r(128, 3, 2, 14, 14), None, stride=(2, 14, 14)))
    h = r(8, 65, 192)
    out["layer_norm"] = sha(F.layer_norm(h, (192,), r(192), r(192), 1e-6))
    out["rms_norm"] = sha(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    out["softmax"] = sha(torch.softmax(r(8, 4, 65, 65), -1))
    q, k, v = (r(4, 4, 65, 32).requires_grad_() for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v)
    out["sdpa_fwd"] = sha(o)
    o.backward(r(4, 4, 65, 32))
    out["sdpa_bwd"] = sha(torch.cat([q.grad, k.grad, v.grad]))
    z = r(100003)
    out["gelu_erf"] = sha(F.gelu(z))
    out["gelu_tanh"] = sha(F.gelu(z, approximate="tanh"))
    out["silu"] = sha(F.silu(z))
    out["exp"] = sha(torch.exp(z))
    out["log"] = sha(torch.log(z.abs() + 1e-3))
    out["tanh"] = sha(torch.tanh(z))
    out["sin_cos"] = sha(torch.cat([torch.sin(z * 7), torch.cos(z * 7)]))
    out["sigmoid"] = sha(torch.sigmoid(z))
    out["pow_sqrt"] = sha(torch.sqrt(z.abs()) + z.pow(3))
    out["sqrt"] = sha(torch.sqrt(z.abs()))
    out["pow_2_5"] = sha(z.abs().pow(2.5))
    out["div"] = sha(z / (z.abs() + 0.5))
    out["exp_small"] = sha(torch.exp(z[:40]))
    out["sdpa_math"] = sha(torch.softmax((q @ k.transpose(-1, -2)) * 32 ** -0.5, -1) @ v)
    out["sum"] = sha(z.sum())
    out["mean_dim"] = sha(h.mean(-1))
    out["norm"] = sha(torch.linalg.vector_norm(z))
    out["cross_entropy"] = sha(F.cross_entropy(r(64, 300), torch.randint(0, 300, (64,), generator=g)))
    lin = torch.nn.Linear(192, 384)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    loss = F.gelu(lin(x)).pow(2).mean()
    loss.backward()
    out["linear_bwd"] = sha(torch.cat([lin.weight.grad.flatten(), lin.bias.grad]))
    conv = torch.nn.Conv2d(3, 128, 8, stride=8)
    with torch.no_grad():
        conv.weight.copy_(cw)
        conv.bias.copy_(cb)
    conv(img).pow(2).mean().backward()
    out["conv2d_bwd"] = sha(torch.cat([conv.weight.grad.flatten(), conv.bias.grad]))
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, weight_decay=0.01)
    opt.step()
    opt.step()
    out["adamw"] = sha(torch.cat([lin.weight.flatten(), lin.bias]))
    # ops the project writes its log-space maths with, instead of the MKL vector-math ones above
    zn = -z.abs() - 1e-3                     # strictly negative, like log-probabilities
    out["log1p"] = sha(torch.log1p(z.abs()))
    out["expm1"] = sha(torch.expm1(zn))
    out["log2"] = sha(torch.log2(z.abs() + 1e-3))
    out["logaddexp"] = sha(torch.logaddexp(z, z.flip(0)))
    out["logsumexp"] = sha(torch.logsumexp(z[:100000].view(-1, 5), -1))
    out["log_softmax"] = sha(torch.log_softmax(r(64, 300), -1))
    out["logsigmoid"] = sha(F.logsigmoid(z))
    out["softplus"] = sha(F.softplus(z))
    out["bce_logits"] = sha(F.binary_cross_entropy_with_logits(z, torch.sigmoid(z.flip(0)), reduction="none"))
    out["xlogy"] = sha(torch.xlogy(z.abs(), z.abs() + 1e-3))
    pos = torch.arange(4096, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    out["rope_sin_cos"] = sha(torch.cat([(pos * inv).sin(), (pos * inv).cos()]))
    out["sin_cos_big"] = sha(torch.cat([torch.sin(z * 1000), torch.cos(z * 1000)]))
    out["pow_scalar_base"] = sha(torch.pow(10000.0, -z.abs()))
    # numpy and scipy, which build the world, render and score meshes: their SIMD loops and OpenBLAS
    import numpy as np
    from scipy.spatial import cKDTree

    zn64 = z.double().numpy()
    for dt in (np.float32, np.float64):
        v = zn64.astype(dt)
        tag = "np" + ("32" if dt == np.float32 else "64")
        out[f"{tag}_exp"] = sha(torch.from_numpy(np.exp(v)))
        out[f"{tag}_log"] = sha(torch.from_numpy(np.log(np.abs(v) + 1e-3)))
        out[f"{tag}_sin_cos"] = sha(torch.from_numpy(np.concatenate([np.sin(v * 7), np.cos(v * 7)])))
        out[f"{tag}_tanh"] = sha(torch.from_numpy(np.tanh(v)))
        out[f"{tag}_sqrt"] = sha(torch.from_numpy(np.sqrt(np.abs(v))))
        m = v[:257 * 129].reshape(257, 129)
        out[f"{tag}_matmul"] = sha(torch.from_numpy(m @ m.T))
        out[f"{tag}_small_matmul"] = sha(torch.from_numpy(v[:16].reshape(4, 4) @ v[16:16 + 4 * 999].reshape(4, 999)))
        out[f"{tag}_sum"] = sha(torch.from_numpy(np.asarray([v.sum(), np.linalg.norm(v), v.mean()])))
        out[f"{tag}_argsort"] = sha(torch.from_numpy(np.argsort(np.round(v, 1), kind="stable")))
    pts = zn64[:30000].reshape(10000, 3)
    dist, idx = cKDTree(pts).query(zn64[30000:36000].reshape(2000, 3) * 1.01)
    out["scipy_kdtree"] = sha(torch.from_numpy(np.concatenate([dist, idx.astype(np.float64)])))
    out["interp_bilinear_aa"] = sha(F.interpolate(img, size=(48, 48), mode="bilinear", antialias=True,
                                                  align_corners=False))
    return out


def mini_problem(torch, steps: int):
    """The project's mini generator (default sizes: 64 px ViT, 32^3 grid DiT) as one module, ``steps``
    seeded batches, and its flow-matching loss."""
    from judge3d.generators.mini import ConditionerConfig, FlowConfig, FlowDiT, ImageConditioner

    F = torch.nn.functional
    torch.manual_seed(0)
    ccfg = ConditionerConfig()
    fcfg = FlowConfig()
    cond_net = ImageConditioner(ccfg)
    flow = FlowDiT(fcfg, context_dim=ccfg.width)
    model = torch.nn.ModuleDict({"cond": cond_net, "flow": flow})
    g = torch.Generator().manual_seed(42)
    batch = 8
    data = []
    for _ in range(steps):
        images = torch.rand(batch, 3, ccfg.image_size, ccfg.image_size, generator=g) * 2 - 1
        grid = (batch, 1) + (fcfg.resolution,) * 3
        x0 = (torch.rand(*grid, generator=g) > 0.6).float() * 2 - 1
        t = torch.sigmoid(torch.randn(batch, generator=g))
        noise = torch.randn(*grid, generator=g)
        data.append((images, x0, t, noise))

    def loss_of(images, x0, t, noise):
        tt = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - (1 - flow.sigma_min) * tt) * x0 + tt * noise
        target = noise - (1 - flow.sigma_min) * x0
        return F.mse_loss(flow(x_t, t, cond_net(images)), target)

    return model, data, loss_of


def train_mini(torch, steps: int, fused: bool = False) -> dict:
    model, data, loss_of = mini_problem(torch, steps)
    init = weights_sha(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=fused or None)
    return timed_training(torch, model, opt, data, loss_of, init)


def qwen_problem(torch, steps: int):
    """The project's default tiny Qwen2.5-VL (112 px, 3+3 layers), ``steps`` seeded batches of token and
    pixel inputs (two images per query), and the two-letter loss."""
    from judge3d.judges.tiny import TinySizes, build_tiny_judge

    F = torch.nn.functional
    sizes = TinySizes()
    model, tok, _ = build_tiny_judge(None, "qwen2_5_vl", sizes, seed=0, save=False)
    ids = tok.convert_tokens_to_ids
    patch, merge, tp = sizes.vision.patch, 2, 2
    side = sizes.image_size // patch                      # patches per side
    n_img_tok = side * side // (merge * merge)
    g = torch.Generator().manual_seed(7)
    batch = 4

    def text(n):
        return torch.randint(1, 257, (n,), generator=g).tolist()

    def one_image():
        return [ids("<|vision_start|>")] + [ids("<|image_pad|>")] * n_img_tok + [ids("<|vision_end|>")]

    data = []
    for _ in range(steps):
        seqs = []
        for _ in range(batch):
            seqs.append([ids("<|im_start|>")] + text(6) + one_image() + one_image() + text(10)
                        + [ids("<|im_end|>"), ids("<|im_start|>")] + text(3))
        input_ids = torch.tensor(seqs)
        # two images per query, each (t*h*w, C*T*P*P) rows in Qwen2-VL's patch layout
        pixels = torch.randn(batch * 2 * side * side, 3 * tp * patch * patch, generator=g)
        grid = torch.tensor([[1, side, side]] * (batch * 2))
        labels = torch.randint(0, 2, (batch,), generator=g)
        data.append((input_ids, pixels, grid, labels))
    target = [ids("A"), ids("B")]

    def loss_of(input_ids, pixels, grid, labels):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                    image_grid_thw=grid)
        return F.cross_entropy(out.logits[:, -1, target].float(), labels)

    return model, data, loss_of


def train_qwen(torch, steps: int, fused: bool = False) -> dict:
    model, data, loss_of = qwen_problem(torch, steps)
    init = weights_sha(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=fused or None)
    return timed_training(torch, model, opt, data, loss_of, init)


def train_judge_path(torch, arch: str, steps: int, fused: bool = True) -> dict:
    """A tiny judge of ``arch`` trained through the judges' own query path (``HFJudge.query_logits``:
    the image processor, chat template, padding and forward the training and judging stages use), on
    seeded random montages, with the letter loss of judges/train.py."""
    from PIL import Image

    from judge3d.judges.hf import p_first_from_logits
    from judge3d.judges.tiny import TinySizes
    from judge3d.judges.train import new_tiny_judge

    F = torch.nn.functional
    sizes = TinySizes()
    judge, _, _ = new_tiny_judge(arch, sizes, seed=0, name=arch)
    model = judge.model
    init = weights_sha(model)
    g = torch.Generator().manual_seed(11)
    side = sizes.image_size
    images = [judge.arch.prepare(Image.fromarray(
        torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())) for _ in range(12)]
    target = [judge.answer_ids["A"][0], judge.answer_ids["B"][0]]
    prompt = "A: <image1> B: <image2> Better 3D shape: A or B?"
    data = []
    for _ in range(steps):
        idx = torch.randperm(12, generator=g)[:8].view(4, 2).tolist()
        data.append(([tuple(q) for q in idx], torch.randint(0, 2, (4,), generator=g)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=fused or None)

    def loss_of(queries, labels):
        logits = judge.query_logits(images, queries, prompt)
        return F.cross_entropy(logits[:, target].float(), labels)

    res = timed_training(torch, model, opt, data, loss_of, init)
    model.eval()
    with torch.no_grad():  # the verdict path too: p_first's log-sum-exp over each letter's tokens
        res["p_first"] = sha(p_first_from_logits(judge.query_logits(images, [(0, 1), (1, 0), (2, 3)], prompt),
                                                 judge.answer_ids))[:16]
    return res


def timed_training(torch, model, opt, data, loss_of, init: str) -> dict:
    """The shared step loop (clip 1.0), timed from step 1 on (step 0 is warm-up: allocations, oneDNN JIT)."""
    model.train()
    losses = []
    t_start = time.perf_counter()
    for step, batch in enumerate(data):
        if step == 1:
            t_start = time.perf_counter()
        loss = loss_of(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    dt = time.perf_counter() - t_start
    steps = len(data)
    return {"init": init, "final": weights_sha(model), "steps": steps, "seconds": round(dt, 3),
            "steps_per_s": (steps - 1) / dt, "last_loss": losses[-1].hex(), "loss_hex": [v.hex() for v in losses],
            "n_params": sum(p.numel() for p in model.parameters())}


def child(args) -> None:
    config = args.child
    from judge3d.core.numerics import PINNED_CPU_ENV, pin_cpu_numerics

    base = config.removesuffix("_fused")          # "<config>_fused": the same, with AdamW(fused=True)
    if config.startswith("pinned"):
        pin_cpu_numerics()
        os.environ.update(PINNED_VARIANTS.get(base, {}))
    import torch

    torch.set_num_threads(args.threads)
    if base in ("pinned_t1", "native_t1"):
        torch.set_num_threads(1)
    if base == "pinned_nomkldnn":
        torch.backends.mkldnn.enabled = False
    cfg = torch.__config__.show()
    mkl = next((l.strip() for l in cfg.splitlines() if "Math Kernel Library" in l or "oneMKL" in l), "?")
    onednn = next((l.strip() for l in cfg.splitlines() if "oneDNN" in l or "MKL-DNN" in l), "?")
    res = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "mkldnn": bool(torch.backends.mkldnn.enabled),
           "mkl": mkl[:80], "onednn": onednn[:80],
           "env": {k: os.environ.get(k, "") for k in dict.fromkeys(list(PINNED_CPU_ENV) + EXTRA_KEYS)}}
    res["probes"] = {k: v[:12] for k, v in op_probes(torch).items()}
    fused = config.endswith("_fused")
    res["adamw_fused"] = fused
    res["mini"] = train_mini(torch, args.mini_steps, fused)
    res["qwen"] = None if args.no_qwen else train_qwen(torch, args.qwen_steps, fused)
    for arch in filter(None, args.judge_paths.split(",")):
        res[f"judge_{arch}"] = train_judge_path(torch, arch, args.qwen_steps, fused)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mini-steps", type=int, default=20)
    ap.add_argument("--qwen-steps", type=int, default=20)
    ap.add_argument("--no-qwen", action="store_true")
    ap.add_argument("--judge-paths", default="",
                    help="also train tiny judges of these archs (qwen2_5_vl,internvl) through HFJudge's query path")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
