"""Judge throughput, pairs/s (both orders per pair), in one run:

  (a) naive baseline: free-text ``generate`` (up to 64 new tokens) one query at a time, parse the letter;
  (b) our path: HFJudge.p_first, batched, one forward per query, each montage encoded once for both orders;
      on CUDA with its GPU fast paths (threaded image prep; Qwen: grouped window attention, padded vision
      MLP), and again with them off (the CPU defaults) for a before/after on the same card.

Default: the tiny mini-world judges (sizes from params.yaml) on CPU with random weights.
``--full``: full-size Qwen2.5-VL-7B / InternVL3-8B architectures built FROM CONFIG (public config values,
written below; random weights, no download), bf16 on CUDA, two 504x504 montages per query; reports
linear-layer FLOPs per pair and the fraction of 800 TFLOP/s reached.
``--full --smoke``: the same configs cut to 2 LM layers / 2 vision blocks, runnable on CPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PEAK_FLOPS = 800e12          # the reference compute limit (H100 bf16 dense, rounded)
FULL_PROMPT = ("Image A is the first normal-map montage, image B the second. Which is the better 3D "
               "reconstruction? Answer with one letter: A or B.")

# Public config values of Qwen/Qwen2.5-VL-7B-Instruct (config.json).
QWEN25VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656}
# Public config values of OpenGVLab/InternVL3-8B-hf (config.json): InternViT-300M + Qwen2.5-7B.
INTERNVL3_8B = dict(
    text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False),
    vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                       norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True,
                       hidden_act="gelu"),
    image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
    vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
)
INTERNVL_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                        "<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667, "<video>": 151671}


# ------------------------------------------------------------------------------------------ builders
def _full_tokenizer(arch: str):
    """Byte-level tokenizer whose special tokens sit at the real checkpoints' ids (vocab padded between)."""
    from transformers import AddedToken, Qwen2Tokenizer

    from judge3d.judges.tiny import INTERNVL_NAMED_SPECIALS, _byte_vocab

    specials = QWEN_SPECIAL_IDS if arch == "qwen2_5_vl" else INTERNVL_SPECIAL_IDS
    vocab = _byte_vocab()
    top = max(specials.values())
    del vocab["<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab)}
    i = len(vocab)
    while i <= top:   # fillers never produced by the empty-ish merge list; they only place the specials
        vocab[f"<|filler_{i}|>"] = i
        i += 1
    for tok, tid in specials.items():
        vocab.pop(f"<|filler_{tid}|>")
        vocab[tok] = tid
    from judge3d.judges.tiny import WORD_INITIAL_MERGES

    named = dict(INTERNVL_NAMED_SPECIALS) if arch == "internvl" else {}
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(WORD_INITIAL_MERGES), extra_special_tokens=named)
    tok.add_tokens([AddedToken(s, special=True) for s in specials if s != "<|endoftext|>"])
    for s, tid in specials.items():
        got = tok.convert_tokens_to_ids(s)
        if got != tid:
            raise RuntimeError(f"benchmark tokenizer put {s} at {got}, expected {tid}")
    return tok


def build_full_judge(arch: str, layers: int | None, device: str, dtype: str, attn: str, batch_size: int):
    """HFJudge on a full-size architecture built from config with random weights (no files, no hub)."""
    import copy

    import torch
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    from judge3d.judges.hf import HFJudge, make_image_only_processor
    from judge3d.judges.tiny import INTERNVL_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE

    spec = copy.deepcopy(QWEN25VL_7B if arch == "qwen2_5_vl" else INTERNVL3_8B)
    if layers is not None:   # --smoke: same widths, fewer blocks
        spec["text_config"]["num_hidden_layers"] = layers
        if arch == "qwen2_5_vl":
            spec["vision_config"]["depth"] = layers
            spec["vision_config"]["fullatt_block_indexes"] = [layers - 1]
        else:
            spec["vision_config"]["num_hidden_layers"] = layers
    tok = _full_tokenizer(arch)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    if arch == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(**spec)
        cls = Qwen2_5_VLForConditionalGeneration
        ip = Qwen2VLImageProcessorPil()          # stock defaults: 504^2 -> 36x36 patches -> 324 tokens
        template = "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}" + QWEN_CHAT_TEMPLATE
    else:
        config = InternVLConfig(**spec)
        cls = InternVLForConditionalGeneration
        ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=False)
        template = INTERNVL_CHAT_TEMPLATE
    config._attn_implementation = attn
    with torch.device(device):
        model = cls._from_config(config, dtype=torch_dtype, attn_implementation=attn)
    model.eval()
    processor = make_image_only_processor(arch, tok, ip, template,
                                          spec.get("image_seq_length") if arch == "internvl" else None)
    return HFJudge(model, processor, name=f"{arch}-full-random", weights_hash="0" * 64, batch_size=batch_size)


def build_tiny_judge_from_params(arch: str, tmp: Path, batch_size: int):
    from judge3d.core.config import load_params, require
    from judge3d.judges.hf import HFJudge
    from judge3d.judges.tiny import TinySizes, build_tiny_judge

    params = load_params(ROOT / "params.yaml")
    sizes = TinySizes.from_params(require(params, f"judges.tiny.{arch}", dict))
    build_tiny_judge(tmp / arch, arch, sizes, seed=0)
    return HFJudge.load(tmp / arch, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ measure
def montages(n: int, size: int, seed: int = 0):
    """Montage-like test images: 2x2 tiles of smooth random normal-map colours on black."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        a = g.normal(size=(3, 3))
        img = np.stack([np.sin(3 * (a[c, 0] * xx + a[c, 1] * yy) + a[c, 2]) for c in range(3)], -1)
        img = ((img + 1) * 127.5).astype(np.uint8)
        img[size // 2 - 1:size // 2 + 1] = 0
        img[:, size // 2 - 1:size // 2 + 1] = 0
        out.append(Image.fromarray(img))
    return out


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def naive_pairs_per_s(judge, pairs, prompt: str, max_new_tokens: int) -> tuple[float, int]:
    """One query at a time through the processor + generate, letter parsed from the text."""
    import torch

    parsed = 0
    _sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for x, y in pairs:
            for first, second in ((x, y), (y, x)):
                inputs = judge.reference_inputs(first, second, prompt).to(judge.model.device)
                out = judge.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=judge.pad_id)
                text = judge.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                letters = [c for c in text if c in "AB"]
                parsed += bool(letters)
    _sync()
    return len(pairs) / (time.perf_counter() - t), parsed


def ours_pairs_per_s(judge, pairs, prompt: str, repeats: int) -> float:
    queries = [q for x, y in pairs for q in ((x, y), (y, x))]
    judge.p_first(queries[: judge.batch_size], prompt)   # warm-up (kernels, allocator)
    _sync()
    t = time.perf_counter()
    for _ in range(repeats):
        judge.p_first(queries, prompt)
    _sync()
    return repeats * len(pairs) / (time.perf_counter() - t)


def linear_flops_per_pair(judge, pairs, prompt: str) -> tuple[float, int]:
    """FLOPs of every nn.Linear (2 * in * out per row) in our path, per pair; also tokens per query."""
    import torch

    total = [0.0]

    def hook(module, inputs, _output):
        total[0] += 2.0 * module.in_features * module.out_features * (inputs[0].numel() / module.in_features)

    handles = [m.register_forward_hook(hook) for m in judge.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        queries = [q for x, y in pairs for q in ((x, y), (y, x))]
        judge.p_first(queries, prompt)
    finally:
        for h in handles:
            h.remove()
    prepared = judge.prepare_images([pairs[0][0], pairs[0][1]])
    tokens = len(judge.query_ids(prompt, prepared[0], prepared[1]))
    return total[0] / len(pairs), tokens


def run(arch: str, judge, n_pairs: int, size: int, prompt: str, max_new_tokens: int, naive_pairs: int,
        repeats: int) -> dict:
    ims = montages(2 * n_pairs, size)
    pairs = [(ims[2 * i], ims[2 * i + 1]) for i in range(n_pairs)]
    naive, parsed = naive_pairs_per_s(judge, pairs[:naive_pairs], prompt, max_new_tokens)
    ours = ours_pairs_per_s(judge, pairs, prompt, repeats)
    queries = [q for x, y in pairs for q in ((x, y), (y, x))]
    p_fast = judge.p_first(queries, prompt)
    fast = (judge.arch.grouped_attention, judge.arch.pad_mlp, judge.prep_workers)
    # the same batched path without the GPU fast paths (the CPU defaults): before/after on one card
    judge.arch.grouped_attention, judge.arch.pad_mlp, judge.prep_workers = False, False, 0
    try:
        stock = ours_pairs_per_s(judge, pairs, prompt, repeats)
        p_stock = judge.p_first(queries, prompt)
    finally:
        judge.arch.grouped_attention, judge.arch.pad_mlp, judge.prep_workers = fast
    flops, tokens = linear_flops_per_pair(judge, pairs[: max(1, judge.batch_size // 2)], prompt)
    return {"arch": arch, "naive_pairs_per_s": naive, "naive_parsed": f"{parsed}/{2 * min(naive_pairs, n_pairs)}",
            "ours_pairs_per_s": ours, "stock_pairs_per_s": stock, "fast": fast,
            "max_dp": float(np.abs(p_fast - p_stock).max()),
            "verdicts_agree": f"{int(((p_fast > 0.5) == (p_stock > 0.5)).sum())}/{len(queries)}", "speedup": ours / naive, "tokens_per_query": tokens,
            "linear_flops_per_pair": flops, "peak_fraction": flops * ours / PEAK_FLOPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size 7B/8B architectures (GPU)")
    ap.add_argument("--smoke", action="store_true", help="with --full: 2-layer versions, CPU-runnable")
    ap.add_argument("--arch", choices=["qwen2_5_vl", "internvl", "both"], default="both")
    ap.add_argument("--pairs", type=int, default=None, help="pairs for our batched path")
    ap.add_argument("--naive-pairs", type=int, default=None, help="pairs for the (slow) naive baseline")
    ap.add_argument("--batch-size", type=int, default=None, help="queries per forward (even: both orders)")
    ap.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 if "
                    "installed on CUDA, else sdpa)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--size", type=int, default=None, help="montage side, px (default: 504 with --full, "
                    "params render.size otherwise)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    archs = ["qwen2_5_vl", "internvl"] if args.arch == "both" else [args.arch]
    cuda = torch.cuda.is_available()
    if args.full:
        device = "cuda" if cuda and not args.smoke else "cpu"
        if not args.smoke and not cuda:
            raise SystemExit("--full needs a CUDA GPU (or add --smoke for the 2-layer CPU check).")
        dtype = "bfloat16" if device == "cuda" else "float32"
        attn = args.attn
        if attn is None:
            from transformers.utils import is_flash_attn_2_available

            attn = "flash_attention_2" if device == "cuda" and is_flash_attn_2_available() else "sdpa"
        size, prompt = args.size or 504, FULL_PROMPT
        n_pairs = args.pairs or (1 if args.smoke else 64)
        naive_pairs = args.naive_pairs or (1 if args.smoke else 4)
        batch = args.batch_size or (2 if args.smoke else 16)
        repeats = args.repeats or (1 if args.smoke else 3)
        max_new = 4 if args.smoke and args.max_new_tokens == 64 else args.max_new_tokens
        label = f"full{'-smoke (2 layers)' if args.smoke else ''}, {device}, {dtype}, attn={attn}"
    else:
        from judge3d.core.config import load_params

        params = load_params(ROOT / "params.yaml")
        device, dtype, attn = "cpu", "float32", args.attn or "sdpa"
        size, prompt = args.size or params["render"]["size"], params["judge"]["prompt"]
        n_pairs, naive_pairs = args.pairs or 16, args.naive_pairs or 4
        batch, repeats, max_new = args.batch_size or 16, args.repeats or 3, args.max_new_tokens
        label = "tiny mini-world judges (random weights), cpu, float32"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"judge throughput: {label}; device {card}; montage {size}x{size}, two per query; "
          f"naive = generate {max_new} tokens one query at a time")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            t = time.perf_counter()
            if args.full:
                judge = build_full_judge(arch, 2 if args.smoke else None, device, dtype, attn, batch)
            else:
                judge = build_tiny_judge_from_params(arch, Path(tmp), batch)
            n_params = sum(p.numel() for p in judge.model.parameters())
            print(f"[{arch}] built {n_params / 1e6:.1f}M params in {time.perf_counter() - t:.1f} s")
            r = run(arch, judge, n_pairs, size, prompt, max_new, naive_pairs, repeats)
            print(f"[{arch}] naive generate+parse : {r['naive_pairs_per_s']:8.3f} pairs/s  "
                  f"(letter found in {r['naive_parsed']} answers)")
            print(f"[{arch}] ours batched logprob : {r['ours_pairs_per_s']:8.3f} pairs/s  "
                  f"= {r['speedup']:.1f}x naive  (batch {batch} queries, {r['tokens_per_query']} tokens/query)")
            grouped, pad, workers = r["fast"]
            on = f"prep_workers={workers}" + (f", grouped vision attention={grouped}, padded vision MLP={pad}"
                                              if arch == "qwen2_5_vl" else "")
            print(f"[{arch}] ours, fast paths off  : {r['stock_pairs_per_s']:8.3f} pairs/s  (as on CPU: inline image "
                  f"prep{', stock vision attention and MLP' if arch == 'qwen2_5_vl' else ''}; above: {on})")
            print(f"[{arch}] fast vs off, same {2 * n_pairs} queries: max |delta p_first| {r['max_dp']:.3g}, "
                  f"verdicts agree {r['verdicts_agree']}")
            print(f"[{arch}] linear FLOPs/pair {r['linear_flops_per_pair']:.3e}; at {r['ours_pairs_per_s']:.3f} "
                  f"pairs/s = {100 * r['peak_fraction']:.3g}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s"
                  + ("" if device == "cuda" else " (not meaningful off-GPU)"))
            print(f"[{arch}] fast paths off        : {100 * r['peak_fraction'] * r['stock_pairs_per_s'] / r['ours_pairs_per_s']:.3g}% "
                  f"of {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
            del judge
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
