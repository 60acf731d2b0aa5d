"""Tiny random-init Qwen2.5-VL and InternVL judges, saved as standard HF folders.

The folders have the layout of the real checkpoints (config.json, model.safetensors, tokenizer
files, preprocessor/processor config, chat template), so :class:`judge3d.judges.hf.HFJudge`
loads them through exactly the code path it uses for Qwen2.5-VL-7B-Instruct / InternVL3-8B-hf.

Tokenizer: byte-level BPE over the 256 byte symbols (docs/protocol.md#the-tiny-judges). Two merges
("Ġ A", "Ġ B") make the word-initial answer letters single tokens as they are in the real 151k
vocabularies, so the judge's "bare + word-initial" id gathering is exercised on the tiny judges too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
INTERNVL_NAMED_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>",
                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
INTERNVL_SPECIALS = ["<|im_start|>", "<|im_end|>"]
WORD_INITIAL_MERGES = [("Ġ", "A"), ("Ġ", "B")]

# ChatML, as both real checkpoints use. One placeholder per image; the processor expands it.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<IMG_CONTEXT>\\n'")


@dataclass
class TinyLMSize:
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512


@dataclass
class TinyVisionSize:
    hidden: int = 128
    depth: int = 3
    heads: int = 4
    intermediate: int = 256
    patch: int = 14


@dataclass
class TinySizes:
    lm: TinyLMSize = field(default_factory=TinyLMSize)
    vision: TinyVisionSize = field(default_factory=TinyVisionSize)
    image_size: int = 112          # judge input side, px (montages are resized to it)

    @classmethod
    def from_params(cls, block: dict[str, Any]) -> "TinySizes":
        """Sizes from a params block ``{image_size, lm: {...}, vision: {...}}``; unknown keys are an error."""
        try:
            return cls(lm=TinyLMSize(**block.get("lm", {})), vision=TinyVisionSize(**block.get("vision", {})),
                       image_size=int(block.get("image_size", 112)))
        except TypeError as exc:
            raise ValueError(f"bad tiny-judge size block {block!r}: {exc}") from exc


def _byte_vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0}
    for byte, symbol in sorted(bytes_to_unicode().items()):
        vocab[symbol] = len(vocab)
    for left, right in WORD_INITIAL_MERGES:
        vocab[left + right] = len(vocab)
    return vocab


def build_tokenizer(arch: str):
    """Byte-level BPE tokenizer (Qwen2Tokenizer class, as both real checkpoints ship) with chat specials."""
    from transformers import AddedToken, Qwen2Tokenizer

    if arch == "qwen2_5_vl":
        tok = Qwen2Tokenizer(vocab=_byte_vocab(), merges=list(WORD_INITIAL_MERGES))
        tok.add_tokens([AddedToken(s, special=True) for s in QWEN_SPECIALS])
    elif arch == "internvl":
        tok = Qwen2Tokenizer(vocab=_byte_vocab(), merges=list(WORD_INITIAL_MERGES),
                             extra_special_tokens=dict(INTERNVL_NAMED_SPECIALS))
        tok.add_tokens([AddedToken(s, special=True) for s in INTERNVL_SPECIALS])
    else:
        raise ValueError(f"unknown tiny judge arch {arch!r}: use 'qwen2_5_vl' or 'internvl'")
    return tok


def mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) split of head_dim/2 rotary pairs in Qwen2.5-VL's 1/4, 3/8, 3/8 proportions ([16, 24, 24] at 128)."""
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_config(tok, sizes: TinySizes):
    from transformers import Qwen2_5_VLConfig

    lm, vis = sizes.lm, sizes.vision
    if lm.hidden % lm.heads or lm.heads % lm.kv_heads:
        raise ValueError(f"LM hidden {lm.hidden} / heads {lm.heads} / kv_heads {lm.kv_heads} do not divide")
    merge = 2
    if sizes.image_size % (vis.patch * merge):
        raise ValueError(f"image_size {sizes.image_size} must be a multiple of patch*merge = {vis.patch * merge}")
    ids = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok), hidden_size=lm.hidden, intermediate_size=lm.intermediate,
        num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": mrope_section(lm.hidden // lm.heads)},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        initializer_range=init_std(lm.hidden),
    )
    vision = dict(
        initializer_range=init_std(vis.hidden),
        depth=vis.depth, hidden_size=vis.hidden, intermediate_size=vis.intermediate, num_heads=vis.heads,
        patch_size=vis.patch, spatial_merge_size=merge, temporal_patch_size=2,
        # one attention window covers the whole judge image; the last block is full attention as in 7B
        window_size=sizes.image_size, out_hidden_size=lm.hidden, fullatt_block_indexes=[vis.depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False, initializer_range=init_std(lm.hidden),
    )


def init_std(width: int) -> float:
    """Weight-init std for a from-scratch tiny judge: 1/sqrt(width).

    The checkpoints' ``initializer_range`` 0.02 is tuned for 3584/4096-wide layers. At width 192 it
    makes every projection shrink its input about 4x, so at init the answer logit hardly depends on
    the images (and even less on their order) and training sat at the ln 2 plateau.
    """
    return float(width) ** -0.5


def _internvl_config(tok, sizes: TinySizes):
    from transformers import InternVLConfig

    lm, vis = sizes.lm, sizes.vision
    if sizes.image_size % (vis.patch * 2):
        raise ValueError(f"image_size {sizes.image_size} must be a multiple of 2*patch = {vis.patch * 2}")
    ids = tok.convert_tokens_to_ids
    text = dict(
        model_type="qwen2", vocab_size=len(tok), hidden_size=lm.hidden, intermediate_size=lm.intermediate,
        num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False, initializer_range=init_std(lm.hidden),
    )
    vision = dict(
        initializer_range=init_std(vis.hidden),
        hidden_size=vis.hidden, num_hidden_layers=vis.depth, num_attention_heads=vis.heads,
        intermediate_size=vis.intermediate, image_size=[sizes.image_size] * 2, patch_size=[vis.patch] * 2,
        norm_type="layer_norm", use_mean_pooling=True,
    )
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=tok.context_image_token_id,
                          initializer_range=init_std(lm.hidden),
                          image_seq_length=image_seq_length(sizes), downsample_ratio=0.5,
                          tie_word_embeddings=False)


def image_seq_length(sizes: TinySizes) -> int:
    per_side = sizes.image_size // sizes.vision.patch
    return (per_side // 2) ** 2          # pixel shuffle at downsample_ratio 0.5


def _image_processor(arch: str, sizes: TinySizes):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2VLImageProcessorPil

        area = sizes.image_size ** 2
        # min = max pixels: every montage is resized to image_size^2 whatever its own side
        return Qwen2VLImageProcessorPil(min_pixels=area, max_pixels=area, patch_size=sizes.vision.patch,
                                        merge_size=2, temporal_patch_size=2)
    from transformers import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": sizes.image_size, "width": sizes.image_size},
                                    crop_to_patches=False, min_patches=1, max_patches=1)


def _write_processor_files(out: Path, arch: str, tok, image_processor, sizes: TinySizes) -> None:
    """Processor files as the real checkpoints name them, so AutoProcessor resolves the stock class."""
    image_processor.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    stock = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
             "internvl": ("InternVLProcessor", "GotOcr2ImageProcessor", "InternVLVideoProcessor")}[arch]
    pre["image_processor_type"] = stock[1]
    pre["processor_class"] = stock[0]
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    proc = {"processor_class": stock[0]}
    if arch == "internvl":
        proc["image_seq_length"] = image_seq_length(sizes)
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
    # The stock processors also load a video processor (torchvision machines); give it matching settings.
    video = {k: v for k, v in pre.items() if k not in ("image_processor_type", "crop_to_patches",
                                                        "min_patches", "max_patches")}
    video["video_processor_type"] = stock[2]
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    template = QWEN_CHAT_TEMPLATE if arch == "qwen2_5_vl" else INTERNVL_CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template)


def build_tiny_judge(out_dir: str | Path, arch: str, sizes: TinySizes | None = None, *, seed: int = 0,
                     save: bool = True):
    """Build a random-init tiny judge of ``arch`` ('qwen2_5_vl' | 'internvl'); save it to ``out_dir``.

    Returns the model (float32, CPU). ``save=False`` returns it unsaved (training saves after it passes).
    """
    import torch

    sizes = sizes or TinySizes()
    tok = build_tokenizer(arch)
    tok.chat_template = QWEN_CHAT_TEMPLATE if arch == "qwen2_5_vl" else INTERNVL_CHAT_TEMPLATE
    config = _qwen_config(tok, sizes) if arch == "qwen2_5_vl" else _internvl_config(tok, sizes)
    torch.manual_seed(seed)
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        from transformers import InternVLForConditionalGeneration as cls
    model = cls(config).float().eval()
    image_processor = _image_processor(arch, sizes)
    if save:
        save_tiny_judge(out_dir, model, tok, image_processor, arch, sizes)
    return model, tok, image_processor


def save_tiny_judge(out_dir: str | Path, model, tok, image_processor, arch: str, sizes: TinySizes,
                    extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _write_processor_files(out, arch, tok, image_processor, sizes)
    info = {"arch": arch, "sizes": asdict(sizes), "n_params": sum(p.numel() for p in model.parameters())}
    info.update(extra or {})
    (out / "judge3d_tiny.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def build_tiny_qwen25vl(out_dir: str | Path, sizes: TinySizes | None = None, *, seed: int = 0):
    return build_tiny_judge(out_dir, "qwen2_5_vl", sizes, seed=seed)


def build_tiny_internvl(out_dir: str | Path, sizes: TinySizes | None = None, *, seed: int = 0):
    return build_tiny_judge(out_dir, "internvl", sizes, seed=seed)
