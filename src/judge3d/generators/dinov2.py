"""TRELLIS's image conditioner on transformers' DINOv2-with-registers, with no torch.hub call.

TRELLIS-image-large loads ``dinov2_vitl14_reg`` through torch.hub and conditions on
``forward_features(x)["x_prenorm"]`` (the last block's output, before the final norm), layer-normed
without affine parameters: (B, 1 + 4 + 37 * 37 = 1374, 1024) tokens for a 518 px image. This module
gives the same tokens from :class:`transformers.Dinov2WithRegistersModel`:

* :class:`Dinov2Conditioner` loads a transformers folder or hub id (safetensors only, never remote
  code), prepares images the way TRELLIS's pipeline does, and encodes them in batches.
* :func:`convert_hub_state_dict` maps the torch.hub checkpoint's state dict (facebookresearch/dinov2,
  e.g. ``dinov2_vitl14_reg4_pretrain.pth``) onto transformers' names, splitting the fused qkv
  projection; :func:`write_transformers_folder` turns such a checkpoint file into a folder that
  :class:`Dinov2Conditioner` loads, for a user who holds only the hub weights.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from judge3d.generators.base import resolve_device

# TRELLIS's conditioning input: images resized to 518 px (37 x 37 patches of 14 px), ImageNet-normalized.
RESOLUTION = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TRELLIS crops to the object's alpha > 0.8 bounding box, widened by 20 %.
ALPHA_THRESHOLD = 0.8
CROP_MARGIN = 1.2
DEFAULT_MODEL = "facebook/dinov2-with-registers-large"   # transformers' port of dinov2_vitl14_reg
VITL14_REG_HEADS = 16


def _fix_hint(where: str) -> str:
    return (f"Download transformers' port (`hf download {DEFAULT_MODEL} --local-dir {where}`), or convert "
            f"the torch.hub checkpoint dinov2_vitl14_reg4_pretrain.pth with "
            f"`judge3d.generators.dinov2.write_transformers_folder(checkpoint, '{where}')`.")


# -- image preparation ---------------------------------------------------------------------------
def _has_alpha(image: Image.Image) -> bool:
    return image.mode == "RGBA" and not np.all(np.asarray(image)[:, :, 3] == 255)


def prepare_image(image: Image.Image | np.ndarray, resolution: int = RESOLUTION) -> Image.Image:
    """One image -> the RGB ``resolution`` px image TRELLIS's ``preprocess_image`` hands its encoder.

    An image with a (not fully opaque) alpha channel is cropped to its object's alpha > 0.8 bounding
    box widened by 20 % and centred, resized with Lanczos, and composited onto black (RGB times
    alpha), as TRELLIS does. An RGB image, or one whose alpha is all opaque, is taken as already
    prepared and only resized: TRELLIS would remove its background with rembg, which this does not do,
    so give RGBA cut-outs.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"an image array must be uint8 (H, W, 3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image, "RGBA" if image.shape[-1] == 4 else "RGB")
    if not _has_alpha(image):
        return image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
    alpha = np.asarray(image)[:, :, 3]
    rows_cols = np.argwhere(alpha > ALPHA_THRESHOLD * 255)
    if len(rows_cols) == 0:
        raise ValueError(f"image {image.size} has an alpha channel but no pixel with alpha > "
                         f"{ALPHA_THRESHOLD}: nothing to crop to (is the object missing from the render?)")
    left, top = rows_cols[:, 1].min(), rows_cols[:, 0].min()
    right, bottom = rows_cols[:, 1].max(), rows_cols[:, 0].max()
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    size = int(max(right - left, bottom - top) * CROP_MARGIN)
    # Same arithmetic as TRELLIS (float centre, integer half size) so the crop box is identical.
    box = (centre_x - size // 2, centre_y - size // 2, centre_x + size // 2, centre_y + size // 2)
    cropped = image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)
    rgba = np.asarray(cropped).astype(np.float32) / 255
    return Image.fromarray((rgba[:, :, :3] * rgba[:, :, 3:4] * 255).astype(np.uint8))


def pixel_values(images: Any, resolution: int = RESOLUTION) -> torch.Tensor:
    """Images -> ImageNet-normalized float (B, 3, R, R), as TRELLIS's ``encode_image`` builds them.

    ``images``: PIL images or uint8 (H, W, 3|4) arrays (a list, or one (B, H, W, C) array), each
    prepared by :func:`prepare_image`; or a float (B, 3, R, R) tensor in [0, 1], taken as prepared.
    """
    if isinstance(images, torch.Tensor):
        if not images.dtype.is_floating_point or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be float (B, 3, {resolution}, {resolution}) in [0, 1], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (resolution, resolution):
            raise ValueError(f"an image tensor must already be {resolution} x {resolution} px (TRELLIS does not "
                             f"resize tensors), got {tuple(images.shape[-2:])}; pass PIL images or arrays instead")
        x = images.float()
    else:
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        prepared = [np.asarray(prepare_image(im, resolution), dtype=np.float32) / 255 for im in images]
        if not prepared:
            raise ValueError("no images to encode")
        x = torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# -- the conditioner -----------------------------------------------------------------------------
class Dinov2Conditioner:
    """Frozen DINOv2-with-registers giving TRELLIS's conditioning tokens.

    ``encode(images) -> (B, 1 + registers + patches, D)`` float32: the encoder's last hidden state
    before the model's final layer norm, then a layer norm without affine parameters (TRELLIS's
    ``x_prenorm`` path). For dinov2_vitl14_reg at 518 px that is (B, 1374, 1024).
    """

    def __init__(self, model, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
                 resolution: int = RESOLUTION, batch_size: int = 16):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        config = model.config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        if self.resolution % patch:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the patch size {patch}")
        self.num_tokens = 1 + config.num_register_tokens + (self.resolution // patch) ** 2
        self.width = config.hidden_size
        # The final layer norm's input is the pre-norm state; a hook keeps it without asking the model
        # for every layer's hidden states (24 x B x 1374 x 1024 floats at full size).
        self._prenorm: torch.Tensor | None = None
        self.model.layernorm.register_forward_pre_hook(self._keep_prenorm)

    def _keep_prenorm(self, module, args) -> None:
        self._prenorm = args[0]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
                        dtype: torch.dtype = torch.float32, local_files_only: bool = False,
                        **kwargs) -> "Dinov2Conditioner":
        """Load a transformers folder (config.json + model.safetensors) or a hub id, safetensors only.

        A path that names no folder fails here with the fix, instead of being looked up on the hub.
        """
        from transformers import Dinov2WithRegistersModel

        name = str(name_or_path)
        path = Path(name).expanduser()
        looks_local = (path.exists() or path.is_absolute() or name.startswith((".", "~"))
                       or name.count("/") != 1 or "\\" in name)
        if looks_local:
            if not path.is_dir():
                raise FileNotFoundError(f"DINOv2 conditioner folder {path} does not exist. {_fix_hint(name)}")
            missing = [n for n in ("config.json", "model.safetensors") if not (path / n).is_file()]
            if missing and not (path / "model.safetensors.index.json").is_file():
                raise FileNotFoundError(f"DINOv2 conditioner folder {path} lacks {' and '.join(missing)}. "
                                        f"{_fix_hint(name)}")
        try:
            model = Dinov2WithRegistersModel.from_pretrained(
                str(path) if looks_local else name, use_safetensors=True, dtype=dtype,
                local_files_only=local_files_only)
        except OSError as exc:
            raise FileNotFoundError(f"could not load the DINOv2 conditioner {name!r}: {str(exc).rstrip('.')}. "
                                    f"{_fix_hint('models/dinov2')}") from exc
        return cls(model, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized (B, 3, R, R) pixels -> tokens, in one forward pass."""
        self._prenorm = None
        self.model(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        prenorm, self._prenorm = self._prenorm, None
        prenorm = prenorm.float()
        return F.layer_norm(prenorm, prenorm.shape[-1:])

    @torch.no_grad()
    def encode(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """Images (see :func:`pixel_values`) -> float32 tokens (B, num_tokens, width) on ``device``."""
        pixels = pixel_values(images, self.resolution)
        step = batch_size or self.batch_size
        return torch.cat([self.tokens(pixels[i:i + step]) for i in range(0, len(pixels), step)])

    def unconditional(self, batch: int) -> torch.Tensor:
        """The unconditional branch's tokens: zeros of the encoded shape, as TRELLIS's ``get_cond``."""
        return torch.zeros(batch, self.num_tokens, self.width, device=self.device)


# -- the torch.hub checkpoint --------------------------------------------------------------------
_BLOCK_RENAMES = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
                  "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_LAYER_SCALES = {"ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")


def convert_hub_state_dict(hub_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The torch.hub DINOv2-with-registers state dict -> :class:`transformers.Dinov2WithRegistersModel`'s.

    Hub names (``patch_embed``, ``cls_token``, ``register_tokens``, ``pos_embed``, ``mask_token``,
    ``blocks.N.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}``, ``norm``) map one to
    one, except the fused ``attn.qkv`` projection, split into query, key and value (its output rows
    are q, k, v in that order). MLP blocks only (the ViT-S/B/L models, not giant's SwiGLU); unknown
    keys raise rather than load half a model.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in hub_state_dict.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        prefix = f"encoder.layer.{index}"
        if module == "attn.qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.attention.{name}.{kind}"] = part.clone()
        elif module in _LAYER_SCALES and kind == "gamma":
            out[f"{prefix}.{_LAYER_SCALES[module]}"] = value
        elif module in _BLOCK_RENAMES and kind != "gamma":
            out[f"{prefix}.{_BLOCK_RENAMES[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"not a DINOv2 hub ViT-with-registers state dict (MLP blocks, unchunked): "
                       f"unexpected keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def hub_config(hub_state_dict: Mapping[str, torch.Tensor], num_attention_heads: int = VITL14_REG_HEADS):
    """The :class:`transformers.Dinov2WithRegistersConfig` matching a hub state dict. The head count
    is not in the weights: 16 for ViT-L (dinov2_vitl14_reg), 12 for ViT-B, 6 for ViT-S."""
    from transformers import Dinov2WithRegistersConfig

    hidden = hub_state_dict["cls_token"].shape[-1]
    patch = hub_state_dict["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(hub_state_dict["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in hub_state_dict if (m := _BLOCK_KEY.fullmatch(k)))
    mlp_hidden = hub_state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return Dinov2WithRegistersConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=num_attention_heads,
        mlp_ratio=mlp_hidden // hidden, patch_size=patch, image_size=grid * patch,
        num_register_tokens=hub_state_dict["register_tokens"].shape[1],
        layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu", qkv_bias=True)


def model_from_hub_state_dict(hub_state_dict: Mapping[str, torch.Tensor],
                              num_attention_heads: int = VITL14_REG_HEADS):
    """A :class:`transformers.Dinov2WithRegistersModel` holding a hub state dict's weights (strict)."""
    from transformers import Dinov2WithRegistersModel

    config = hub_config(hub_state_dict, num_attention_heads)
    with torch.device("meta"):      # no random init of weights about to be replaced
        model = Dinov2WithRegistersModel(config)
    model.load_state_dict(convert_hub_state_dict(hub_state_dict), strict=True, assign=True)
    return model.eval()


def write_transformers_folder(hub_checkpoint: str | Path, out_dir: str | Path,
                              num_attention_heads: int = VITL14_REG_HEADS) -> Path:
    """Convert a torch.hub DINOv2-with-registers checkpoint file (e.g. dinov2_vitl14_reg4_pretrain.pth)
    into a transformers folder (config.json + model.safetensors) for :meth:`Dinov2Conditioner.from_pretrained`.
    The file is read with ``torch.load(weights_only=True)``: tensors only, no pickled code."""
    hub_state_dict = torch.load(Path(hub_checkpoint), map_location="cpu", weights_only=True)
    model = model_from_hub_state_dict(hub_state_dict, num_attention_heads)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


# -- a tiny random-weight conditioner (the paper-smoke profile, tests) -----------------------------------
TINY_PATCH = 14


def write_tiny_conditioner(out_dir: str | Path, hidden: int, resolution: int, seed: int) -> Path:
    """A random :class:`transformers.Dinov2WithRegistersModel` of width ``hidden`` (2 layers, 4
    registers, patch 14) saved as a transformers folder, for ``resolution`` px inputs: the same class
    and code path as the full-size conditioner, at a size a CPU runs in milliseconds."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if resolution % TINY_PATCH:
        raise ValueError(f"the tiny conditioner's resolution must be a multiple of {TINY_PATCH}, got {resolution}")
    config = Dinov2WithRegistersConfig(hidden_size=int(hidden), num_hidden_layers=2, num_attention_heads=2,
                                       mlp_ratio=2, patch_size=TINY_PATCH, image_size=int(resolution),
                                       num_register_tokens=4, layer_norm_eps=1e-6, layerscale_value=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = Dinov2WithRegistersModel(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


__all__: Sequence[str] = [
    "DEFAULT_MODEL", "Dinov2Conditioner", "RESOLUTION", "convert_hub_state_dict", "hub_config",
    "model_from_hub_state_dict", "pixel_values", "prepare_image", "write_tiny_conditioner",
    "write_transformers_folder",
]
