"""The ``hf`` judge backend: a transformers VLM read out as P(first image is better).

One forward pass per query; the answer is read from the next-token distribution restricted to the
answer letters (bare and word-initial ids of "A" and "B", log-sum-exp within each letter, softmax
over the two). No generation, no text parsing.

Supported: ``Qwen2_5_VLForConditionalGeneration`` (model_type ``qwen2_5_vl``) and the HF-native
``InternVLForConditionalGeneration`` (``internvl``, e.g. OpenGVLab/InternVL3-8B-hf), local dir or
hub id, ``trust_remote_code`` off.

Inputs are built by hand from the checkpoint's own tokenizer, image processor and chat template
(the image-only path: the stock processors need torchvision for their video half). The stock
processor (or, without torchvision, an image-only subclass of it) is kept as the reference: the
tests check that our ids equal its ids and our logits equal the model's on its inputs. Each
distinct image is encoded by the vision tower once per batch, so both orders of a pair share it.
"""
from __future__ import annotations

import abc
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ANSWER_LETTERS = ("A", "B")
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "internvl")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class JudgeLoadError(RuntimeError):
    """A judge cannot be loaded as configured; the message names the thing and the fix."""


ImageLike = Any  # PIL.Image.Image | str | pathlib.Path


# --------------------------------------------------------------------------------------------
# image-only processors: the stock classes minus their video processor (which needs torchvision)
# --------------------------------------------------------------------------------------------
def _image_only_processor_classes():
    from transformers import InternVLProcessor, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without the video processor; images and text behave as the stock one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        """InternVLProcessor without the video processor."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                     chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return {"qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor, "internvl": ImageOnlyInternVLProcessor}


def make_image_only_processor(model_type: str, tokenizer, image_processor, chat_template: str,
                              image_seq_length: int | None = None):
    cls = _image_only_processor_classes()[model_type]
    if model_type == "internvl":
        return cls(image_processor, tokenizer, image_seq_length=image_seq_length, chat_template=chat_template)
    return cls(image_processor, tokenizer, chat_template=chat_template)


def load_processor(source: str, model_type: str):
    """The stock AutoProcessor where torchvision imports; otherwise the image-only subclass."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=False)
    return _image_only_processor_classes()[model_type].from_pretrained(source, trust_remote_code=False)


# --------------------------------------------------------------------------------------------
# answer tokens
# --------------------------------------------------------------------------------------------
def gather_answer_ids(tokenizer, letters: Sequence[str] = ANSWER_LETTERS) -> dict[str, list[int]]:
    """Single-token ids of each letter, bare ("A") and word-initial (" A"); raise if a letter has none."""
    out: dict[str, list[int]] = {}
    for letter in letters:
        ids = []
        for variant in (letter, " " + letter):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1 and tokenizer.decode(enc).strip() == letter and enc[0] not in ids:
                ids.append(int(enc[0]))
        if not ids:
            raise JudgeLoadError(
                f"answer token {letter!r} is not a single token of this tokenizer (neither {letter!r} nor "
                f"{' ' + letter!r}); the judge cannot read P({letter}) from one forward pass. Use a checkpoint "
                "whose tokenizer has the answer letters as tokens (every Qwen2 / InternVL tokenizer does).")
        out[letter] = ids
    shared = set(out[letters[0]]) & set(out[letters[1]])
    if shared:
        raise JudgeLoadError(f"answer letters share token ids {sorted(shared)}: the tokenizer is broken.")
    return out


def p_first_from_logits(logits, answer_ids: dict[str, list[int]]):
    """P(first) from last-position logits (B, V): log-sum-exp within each letter, softmax over the two."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    la = torch.logsumexp(logp[:, answer_ids[ANSWER_LETTERS[0]]], dim=-1)
    lb = torch.logsumexp(logp[:, answer_ids[ANSWER_LETTERS[1]]], dim=-1)
    return torch.sigmoid(la - lb)


# --------------------------------------------------------------------------------------------
# per-architecture input building
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedImage:
    """One image after the checkpoint's image processor: pixels for the vision tower and its token count."""
    pixel_values: Any          # torch tensor; Qwen: (patches, C*T*P*P); InternVL: (tiles, 3, H, W)
    grid_thw: Any | None       # Qwen: (1, 3) long tensor; InternVL: None
    n_tiles: int               # InternVL tiles (1 for Qwen)
    n_tokens: int              # placeholder tokens this image takes in the LM sequence


class _Arch(abc.ABC):
    """How one architecture turns images into placeholder tokens and vision features."""
    model_type: str

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = model.config

    @abc.abstractmethod
    def placeholder_id(self) -> int:
        """The token the chat template emits once per image."""

    @abc.abstractmethod
    def expand(self, image: PreparedImage) -> list[int]:
        """The ids that replace one placeholder in the LM sequence."""

    @abc.abstractmethod
    def prepare(self, image) -> PreparedImage:
        """Run the checkpoint's image processor on one RGB image."""

    @abc.abstractmethod
    def encode(self, images: Sequence[PreparedImage]) -> list:
        """Vision features, one (n_tokens, hidden) tensor per image."""

    @abc.abstractmethod
    def forward_last(self, input_ids, attention_mask, query_images: list[PreparedImage], query_feats: list):
        """Last-position logits (B, V) of left-padded queries."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise JudgeLoadError when processor and model config disagree."""


class _QwenArch(_Arch):
    model_type = "qwen2_5_vl"

    def placeholder_id(self) -> int:
        return int(self.config.image_token_id)

    def expand(self, image: PreparedImage) -> list[int]:
        return [self.placeholder_id()] * image.n_tokens

    def prepare(self, image) -> PreparedImage:
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = self.processor.image_processor.merge_size
        return PreparedImage(out["pixel_values"], grid, 1, int(grid.prod()) // merge ** 2)

    def encode(self, images):
        import torch

        dev = self.model.device
        pixels = torch.cat([im.pixel_values for im in images]).to(dev)
        grid = torch.cat([im.grid_thw for im in images]).to(dev)
        return list(self.model.model.get_image_features(pixels, grid).pooler_output)

    def forward_last(self, input_ids, attention_mask, query_images, query_feats):
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid = torch.cat([im.grid_thw for im in query_images]).to(input_ids.device)
        mm_types = (input_ids == self.placeholder_id()).int()
        # 3-D rope positions from the model's own helper; without them positions are silently wrong
        position_ids, _ = self.model.model.get_rope_index(input_ids, mm_types, image_grid_thw=grid,
                                                           attention_mask=attention_mask)
        feats = BaseModelOutputWithPooling(pooler_output=tuple(query_feats))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         image_grid_thw=grid, mm_encoder_outputs={"image": feats}, logits_to_keep=1,
                         use_cache=False)
        return out.logits[:, -1]

    def check(self) -> None:
        cfg, tok, ip = self.config, self.tokenizer, self.processor.image_processor
        vis = cfg.vision_config
        problems = []
        for attr, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                            ("vision_end_token_id", "<|vision_end|>")):
            tid = tok.convert_tokens_to_ids(token)
            if getattr(cfg, attr) != tid:
                problems.append(f"config.{attr}={getattr(cfg, attr)} but the tokenizer has {token}={tid}")
        if getattr(self.processor, "image_token_id", None) != cfg.image_token_id:
            problems.append(f"processor image_token_id={getattr(self.processor, 'image_token_id', None)} "
                            f"!= config.image_token_id={cfg.image_token_id}")
        for ip_attr, vis_attr in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                                  ("temporal_patch_size", "temporal_patch_size")):
            if getattr(ip, ip_attr, None) != getattr(vis, vis_attr):
                problems.append(f"image processor {ip_attr}={getattr(ip, ip_attr, None)} != "
                                f"vision_config.{vis_attr}={getattr(vis, vis_attr)}")
        if problems:
            raise JudgeLoadError("processor / model mismatch: " + "; ".join(problems))


class _InternVLArch(_Arch):
    model_type = "internvl"

    def placeholder_id(self) -> int:
        return int(self.config.image_token_id)

    def expand(self, image: PreparedImage) -> list[int]:
        p = self.processor
        return [p.start_image_token_id] + [p.image_token_id] * image.n_tokens + [p.end_image_token_id]

    def prepare(self, image) -> PreparedImage:
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        tiles = int(out["num_patches"][0])
        return PreparedImage(out["pixel_values"], None, tiles, tiles * self.processor.image_seq_length)

    def encode(self, images):
        import torch

        pixels = torch.cat([im.pixel_values for im in images]).to(self.model.device, self.model.dtype)
        feats = self.model.model.get_image_features(
            pixels, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy).pooler_output
        per_image = torch.split(feats, [im.n_tiles for im in images])
        return [f.reshape(-1, f.shape[-1]) for f in per_image]

    def forward_last(self, input_ids, attention_mask, query_images, query_feats):
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # left padding: positions count real tokens only, so a padded query equals the unpadded one
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        feats = BaseModelOutputWithPooling(pooler_output=torch.cat(list(query_feats)))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         mm_encoder_outputs={"image": feats}, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1]

    def check(self) -> None:
        cfg, p = self.config, self.processor
        vis = cfg.vision_config
        problems = []
        if getattr(p, "image_token_id", None) != cfg.image_token_id:
            problems.append(f"processor image token id {getattr(p, 'image_token_id', None)} != "
                            f"config.image_token_id={cfg.image_token_id}")
        side = [s // q for s, q in zip(vis.image_size, vis.patch_size)]
        want = int(side[0] * side[1] * cfg.downsample_ratio ** 2)
        if p.image_seq_length != want:
            problems.append(f"processor image_seq_length={p.image_seq_length} but the vision tower gives {want} "
                            f"tokens per tile (image_size {list(vis.image_size)}, patch {list(vis.patch_size)})")
        size = p.image_processor.size
        got = [getattr(size, "height", None), getattr(size, "width", None)]
        if got != list(vis.image_size):
            problems.append(f"image processor tile size {got} != vision_config.image_size {list(vis.image_size)}")
        if problems:
            raise JudgeLoadError("processor / model mismatch: " + "; ".join(problems))


_ARCHES = {"qwen2_5_vl": _QwenArch, "internvl": _InternVLArch}


# --------------------------------------------------------------------------------------------
# the judge
# --------------------------------------------------------------------------------------------
IMAGE_SLOTS = ("<image1>", "<image2>")


def prompt_content(prompt: str) -> list[dict]:
    """Chat content items for a judge prompt: the two images at their slots, or first (no slots)."""
    present = [slot in prompt for slot in IMAGE_SLOTS]
    if not any(present):
        return [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
    counts = [prompt.count(slot) for slot in IMAGE_SLOTS]
    first, second = (prompt.find(slot) for slot in IMAGE_SLOTS)
    if counts != [1, 1] or first > second:
        raise ValueError(f"judge prompt {prompt!r}: name each of {IMAGE_SLOTS[0]} and {IMAGE_SLOTS[1]} once, in "
                         "that order (or neither, to show both images before the text).")
    head, rest = prompt.split(IMAGE_SLOTS[0])
    middle, tail = rest.split(IMAGE_SLOTS[1])
    content: list[dict] = []
    for text, image in ((head, True), (middle, True), (tail, False)):
        if text:
            content.append({"type": "text", "text": text})
        if image:
            content.append({"type": "image"})
    return content


def open_image(image: ImageLike):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"judge image {path} not found: run the render stage that makes it.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise ValueError(f"judge image {path} is not a readable image ({exc}); re-render it.") from exc


def _image_key(image: ImageLike) -> str:
    from PIL import Image

    if isinstance(image, Image.Image):
        h = hashlib.sha1(image.tobytes())
        h.update(f"{image.size}{image.mode}".encode())
        return "img:" + h.hexdigest()
    return "path:" + Path(image).resolve().as_posix()


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the (name, sha256) of every safetensors file; refuses pickle-only checkpoints."""
    from judge3d.io import file_sha256

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise JudgeLoadError(f"{folder} holds no *.safetensors weights; judge3d loads safetensors only "
                             "(convert the checkpoint with save_pretrained(safe_serialization=True)).")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def _resolve_source(model: str | Path) -> tuple[str, Path]:
    """(source for from_pretrained, local folder holding its files)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise JudgeLoadError(f"judge model dir {path} has no config.json: it is not a saved HF model. "
                                 "Re-run the pretrain-judges stage (mini) or point to a full checkpoint dir (paper).")
        return str(path), path
    text = str(model)
    if _HUB_ID.match(text) and not text.startswith(("models/", "data/", "./", "../")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(text, local_files_only=True,
                                      allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model"])
        except Exception as exc:
            raise JudgeLoadError(
                f"judge model {text!r} is neither a local dir nor a hub id in the local HF cache ({exc}). "
                f"Download it first (huggingface-cli download {text}) or set the judge's model to a local dir."
            ) from exc
        return local, Path(local)
    raise JudgeLoadError(
        f"judge model dir {path} not found. Mini profile: build it with the pretrain-judges stage "
        "(`dvc repro pretrain-judges`, i.e. stages/pretrain_judges.py). Paper profile: set the judge's "
        "model in params.yaml to a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct, OpenGVLab/InternVL3-8B-hf) "
        "or a local dir holding that checkpoint.")


class HFJudge:
    """A transformers VLM as a pairwise judge: ``p_first(pairs, prompt)`` -> P(first image is better)."""

    def __init__(self, model, processor, *, name: str, weights_hash: str, batch_size: int = 16):
        model_type = model.config.model_type
        if model_type not in _ARCHES:
            raise JudgeLoadError(f"model_type {model_type!r} is not a supported judge; use one of "
                                 f"{SUPPORTED_MODEL_TYPES}.")
        if batch_size < 1:
            raise ValueError(f"judge batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.arch = _ARCHES[model_type](model, processor)
        self.model_type = model_type
        self.batch_size = int(batch_size)
        self.judge_id = f"{name}@{weights_hash[:12]}"
        self.weights_hash = weights_hash
        if getattr(processor, "chat_template", None) is None:
            raise JudgeLoadError(f"{name}: the processor has no chat template (chat_template.jinja / "
                                 "chat_template.json); the judge prompt is built through it.")
        self.answer_ids = gather_answer_ids(self.tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        bad = [i for ids in self.answer_ids.values() for i in ids if i >= vocab]
        if bad:
            raise JudgeLoadError(f"{name}: answer token ids {bad} are outside the model's vocab ({vocab}): "
                                 "tokenizer and weights do not belong together.")
        self.arch.check()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._template_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, model: str | Path, dtype: str = "float32", device: str = "cpu",
             attn_implementation: str = "sdpa", batch_size: int = 16, name: str | None = None) -> "HFJudge":
        import torch
        from transformers import AutoConfig

        source, folder = _resolve_source(model)
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        if config.model_type not in _ARCHES:
            raise JudgeLoadError(f"{model}: model_type {config.model_type!r} is not a supported judge; use "
                                 f"one of {SUPPORTED_MODEL_TYPES} (InternVL: the HF-native '-hf' checkpoints).")
        if dtype not in _DTYPES:
            raise JudgeLoadError(f"judge dtype {dtype!r} unknown; use one of {sorted(_DTYPES)}.")
        weights_hash = weights_sha256(folder)
        try:
            processor = load_processor(source, config.model_type)
        except JudgeLoadError:
            raise
        except Exception as exc:
            raise JudgeLoadError(f"{model}: cannot build the {config.model_type} processor from its tokenizer / "
                                 f"preprocessor files ({type(exc).__name__}: {exc}).") from exc
        if config.model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as model_cls
        else:
            from transformers import InternVLForConditionalGeneration as model_cls
        net = model_cls.from_pretrained(source, dtype=getattr(torch, _DTYPES[dtype]),
                                        attn_implementation=attn_implementation, trust_remote_code=False,
                                        use_safetensors=True)
        net.to(device).eval()
        return cls(net, processor, name=name or Path(str(model)).as_posix(), weights_hash=weights_hash,
                   batch_size=batch_size)

    # ---------------------------------------------------------------- inputs
    def messages(self, prompt: str) -> list[dict]:
        """One user turn with the two images. A prompt naming both slots (``<image1>``, ``<image2>``)
        places each image there, e.g. ``"A: <image1> B: <image2> Better: A or B?"``; otherwise both
        images come first and the prompt after them."""
        return [{"role": "user", "content": prompt_content(prompt)}]

    def prompt_text(self, prompt: str) -> str:
        return self.processor.apply_chat_template(self.messages(prompt), tokenize=False,
                                                  add_generation_prompt=True)

    def _template_segments(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the chat text split at its two image placeholders: (before, between, after)."""
        if prompt not in self._template_cache:
            if not prompt or not prompt.strip():
                raise ValueError("judge prompt is empty: set judge.prompt in params.yaml.")
            ids = self.tokenizer(self.prompt_text(prompt))["input_ids"]
            ph = self.arch.placeholder_id()
            at = [i for i, t in enumerate(ids) if t == ph]
            if len(at) != 2:
                raise JudgeLoadError(f"{self.judge_id}: the chat template gave {len(at)} image placeholders for "
                                     "two images; the template and processor do not match.")
            self._template_cache[prompt] = (ids[:at[0]], ids[at[0] + 1:at[1]], ids[at[1] + 1:])
        return self._template_cache[prompt]

    def query_ids(self, prompt: str, first: PreparedImage, second: PreparedImage) -> list[int]:
        before, between, after = self._template_segments(prompt)
        return before + self.arch.expand(first) + between + self.arch.expand(second) + after

    def prepare_images(self, images: Iterable[ImageLike]) -> list[PreparedImage]:
        return [self.arch.prepare(open_image(im)) for im in images]

    def reference_inputs(self, first: ImageLike, second: ImageLike, prompt: str):
        """The processor's own inputs for one query (the reference path; the naive benchmark uses it)."""
        return self.processor(text=[self.prompt_text(prompt)], images=[open_image(first), open_image(second)],
                              return_tensors="pt")

    # ---------------------------------------------------------------- forward
    def query_logits(self, prepared: Sequence[PreparedImage], queries: Sequence[tuple[int, int]], prompt: str,
                     features: Sequence | None = None):
        """Last-position logits (B, V) for queries given as (first, second) indices into ``prepared``.

        Each distinct image is encoded once (or taken from ``features``); left padding; grads flow
        if enabled (training uses this same function).
        """
        import torch

        used = sorted({i for q in queries for i in q})
        if features is None:
            enc = self.arch.encode([prepared[i] for i in used])
            feats = dict(zip(used, enc))
        else:
            feats = {i: features[i] for i in used}
        seqs = [self.query_ids(prompt, prepared[a], prepared[b]) for a, b in queries]
        width = max(len(s) for s in seqs)
        dev = self.model.device
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
        q_images = [prepared[i] for q in queries for i in q]
        q_feats = [feats[i] for q in queries for i in q]
        return self.arch.forward_last(input_ids.to(dev), mask.to(dev), q_images, q_feats)

    def p_first(self, pairs: Sequence[tuple[ImageLike, ImageLike]], prompt: str) -> np.ndarray:
        """P(first image is better) per (first, second) pair, one forward pass per query.

        Queries that share an image (e.g. both orders of a pair) are batched together so the image is
        encoded once.
        """
        import torch

        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float64)
        keys = [(_image_key(a), _image_key(b)) for a, b in pairs]
        # both orders of a pair next to each other, so one batch holds them and shares their features
        order = sorted(range(len(pairs)), key=lambda i: (tuple(sorted(keys[i])), keys[i]))
        out = np.empty(len(pairs), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                index: dict[str, int] = {}
                sources = []
                for i in chunk:
                    for k, im in zip(keys[i], pairs[i]):
                        if k not in index:
                            index[k] = len(sources)
                            sources.append(im)
                prepared = self.prepare_images(sources)
                queries = [(index[keys[i][0]], index[keys[i][1]]) for i in chunk]
                logits = self.query_logits(prepared, queries, prompt)
                p = p_first_from_logits(logits, self.answer_ids).double().cpu().numpy()
                if not np.all(np.isfinite(p)):
                    raise FloatingPointError(f"{self.judge_id}: non-finite P(first) (model output has NaN/inf); "
                                             "check the weights and dtype.")
                out[chunk] = p
        return out
