"""Input-image degradations (``params.yaml: degradations.<severity>``), deterministic per seed.

Fixed order: downscale+upscale, gaussian blur, gaussian noise, JPEG, occlusion. The occluder is
placed on the object as seen in the *clean* input, so it always hides object pixels.

An RGBA input (a cut-out, ``world.image.alpha``) is degraded in colour and keeps its cut-out: the
RGB channels get every degradation exactly as an RGB image would; the alpha channel goes through
the geometric ones (downscale+upscale, blur) with the same filters, so the mask follows the
degraded colour; noise and JPEG leave it alone. The object is alpha > 0 of the clean input, and the
occluder's box gets alpha 255: the occluder stays part of what a cut-out consumer (TRELLIS crops to
alpha and composites onto black) sees, a block over the object, not a hole in it.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from judge3d.core.config import ParamsError, require

# The one list of input severities (mild -> severe); every other layer imports it from here.
SEVERITIES = ("mild", "medium", "severe")
REGIMES = ("clean", *SEVERITIES)              # the input regimes: clean or one severity
OCCLUSION_FILLS = ("background", "grey")
GREY = 128

# key -> (type, check, description of the valid range)
_SPEC: dict[str, tuple[type, Any, str]] = {
    "downscale": (float, lambda v: 0.05 <= v <= 1.0, "a factor in [0.05, 1] (1 = off)"),
    "blur_sigma": (float, lambda v: 0.0 <= v <= 20.0, "gaussian sigma in px, 0..20 (0 = off)"),
    "noise_std": (float, lambda v: 0.0 <= v <= 1.0, "std of additive noise on the [0, 1] scale (0 = off)"),
    "jpeg_quality": (int, lambda v: 1 <= v <= 100, "an int in 1..100"),
    "occlusion_frac": (float, lambda v: 0.0 <= v <= 0.9, "fraction of the object's pixels hidden, 0..0.9"),
}
_OPTIONAL = {"occlusion_fill": "grey"}


def require_severities(params: Mapping[str, Any], dotted: str) -> list[str]:
    """A params list of severities (e.g. ``calibrate.severities``), each one of :data:`SEVERITIES`."""
    return require(params, dotted, list, check=lambda v: all(s in SEVERITIES for s in v),
                   hint=f"A list of severities from {', '.join(SEVERITIES)}.")


def validate_spec(spec: Mapping[str, Any], where: str = "degradations.<severity>") -> dict[str, Any]:
    """Checked, typed copy of one severity block; ParamsError names ``<where>.<key>``."""
    if not isinstance(spec, Mapping):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping of {sorted(_SPEC)}, got {spec!r}")
    unknown = sorted(set(spec) - set(_SPEC) - set(_OPTIONAL))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key '{where}.{unknown[0]}'; valid keys: "
                          f"{sorted(_SPEC) + sorted(_OPTIONAL)}")
    out: dict[str, Any] = {}
    for key, (kind, check, desc) in _SPEC.items():
        # require() reports the full dotted key ('degradations.severe.blur_sigma') and the fix.
        out[key] = require(_nest(where, spec), f"{where}.{key}", kind,
                           check=check, hint=f"It must be {desc}.")
    fill = spec.get("occlusion_fill", _OPTIONAL["occlusion_fill"])
    if fill not in OCCLUSION_FILLS:
        raise ParamsError(f"params.yaml: '{where}.occlusion_fill' must be one of {list(OCCLUSION_FILLS)}, got {fill!r}")
    out["occlusion_fill"] = fill
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


def severity_spec(params: Mapping[str, Any], severity: str) -> dict[str, Any]:
    block = require(params, f"degradations.{severity}", dict,
                    hint=f"define it like the others (keys {sorted(_SPEC)}).")
    return validate_spec(block, f"degradations.{severity}")


def _background_colour(image: np.ndarray) -> np.ndarray:
    """The most common colour on the image border (the plain render background)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(-1, 3)
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return colours[np.argmax(counts)]


def _occluder(mask: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """A rectangle (seeded aspect ratio and centre on the object) covering ~frac of ``mask``'s pixels."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    total = len(ys)
    rect = np.zeros_like(mask)
    if total == 0 or frac <= 0:
        return rect
    pick = rng.integers(total)
    cy, cx = ys[pick], xs[pick]
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    target = frac * total
    cum = np.cumsum(np.cumsum(mask, axis=0), axis=1)  # summed-area table

    def covered(scale: float):
        hh = max(1, int(round(scale * np.sqrt(aspect))))
        ww = max(1, int(round(scale / np.sqrt(aspect))))
        y0, y1 = max(0, cy - hh // 2), min(h, cy - hh // 2 + hh)
        x0, x1 = max(0, cx - ww // 2), min(w, cx - ww // 2 + ww)
        s = cum[y1 - 1, x1 - 1]
        s -= cum[y0 - 1, x1 - 1] if y0 > 0 else 0
        s -= cum[y1 - 1, x0 - 1] if x0 > 0 else 0
        s += cum[y0 - 1, x0 - 1] if (x0 > 0 and y0 > 0) else 0
        return s, (y0, y1, x0, x1)

    lo, hi = 1.0, float(2 * max(h, w))
    for _ in range(30):  # bisection on the rectangle's size
        mid = 0.5 * (lo + hi)
        if covered(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    _, (y0, y1, x0, x1) = covered(hi)
    rect[y0:y1, x0:x1] = True
    return rect


def degrade(image: np.ndarray, spec: Mapping[str, Any], seed: int, *,
            where: str = "degradations.<severity>") -> np.ndarray:
    """Degrade a uint8 RGB (H, W, 3) or RGBA (H, W, 4) image per ``spec`` (one
    ``degradations.<severity>`` block); the output has the input's shape (the module docstring says
    what happens to alpha)."""
    cfg = validate_spec(spec, where)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 2:
        raise ValueError(f"degrade expects an (H, W, 3) uint8 RGB or (H, W, 4) uint8 RGBA image, "
                         f"got {image.dtype} {image.shape}")
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    alpha = image[:, :, 3] if image.shape[2] == 4 else None
    image = np.ascontiguousarray(image[:, :, :3])
    background = _background_colour(image)
    object_mask = np.any(image != background, axis=2) if alpha is None else alpha > 0

    out = image
    if cfg["downscale"] < 1.0:
        small = (max(1, round(w * cfg["downscale"])), max(1, round(h * cfg["downscale"])))
        out = np.asarray(Image.fromarray(out).resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR))
        if alpha is not None:  # alone, as an "L" image: PIL resizes RGBA premultiplied, which would change the RGB
            alpha = np.asarray(Image.fromarray(alpha).resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR))
    work = out.astype(np.float64) / 255.0
    if cfg["blur_sigma"] > 0:
        work = ndimage.gaussian_filter(work, sigma=(cfg["blur_sigma"], cfg["blur_sigma"], 0), mode="nearest")
        if alpha is not None:
            blurred = ndimage.gaussian_filter(alpha.astype(np.float64) / 255.0, sigma=cfg["blur_sigma"], mode="nearest")
            alpha = np.clip(np.round(blurred * 255.0), 0, 255).astype(np.uint8)
    if cfg["noise_std"] > 0:
        work = work + rng.normal(0.0, cfg["noise_std"], size=work.shape)
    out = np.clip(np.round(work * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=cfg["jpeg_quality"])
    out = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    if cfg["occlusion_frac"] > 0:
        rect = _occluder(object_mask, cfg["occlusion_frac"], rng)
        fill = background if cfg["occlusion_fill"] == "background" else np.array([GREY] * 3, dtype=np.uint8)
        out[rect] = fill
        if alpha is not None:
            alpha = alpha.copy()
            alpha[rect] = 255
    return out if alpha is None else np.dstack([out, alpha])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error on the [0, 1] scale."""
    return float(np.mean((np.asarray(a, np.float64) / 255.0 - np.asarray(b, np.float64) / 255.0) ** 2))
