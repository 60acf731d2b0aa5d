"""Input-image degradations: determinism, monotone severity, occlusion, spec validation."""
from __future__ import annotations

import numpy as np
import pytest

from judge3d.core.config import ParamsError, load_params
from judge3d.world.degrade import SEVERITIES, degrade, mse, severity_spec
from judge3d.world.shapes import build_shape

PARAMS = load_params()


@pytest.fixture(scope="module")
def images():
    from judge3d.render import render_input_image
    img = PARAMS["world"]["image"]
    return [render_input_image(build_shape(c, 11), img["size"], img["azimuth_deg"], img["elevation_deg"],
                               img["background"]) for c in ("chair", "cabinet", "lamp", "sofa")]


def test_deterministic_per_seed(images):
    spec = severity_spec(PARAMS, "medium")
    a = degrade(images[0], spec, seed=123)
    assert a.dtype == np.uint8 and a.shape == images[0].shape
    np.testing.assert_array_equal(a, degrade(images[0], spec, seed=123))
    assert not np.array_equal(a, degrade(images[0], spec, seed=124))


def test_error_grows_with_severity(images):
    for i, image in enumerate(images):
        errors = [mse(degrade(image, severity_spec(PARAMS, s), seed=i), image) for s in SEVERITIES]
        assert 0 < errors[0] < errors[1] < errors[2], f"image {i}: {errors}"


def test_occlusion_hides_about_the_requested_object_fraction(images):
    image = images[1]
    background = np.array(PARAMS["world"]["image"]["background"])
    object_mask = np.any(image != background, axis=2)
    for frac in (0.1, 0.3):
        spec = {"downscale": 1.0, "blur_sigma": 0.0, "noise_std": 0.0, "jpeg_quality": 100,
                "occlusion_frac": frac, "occlusion_fill": "grey"}
        out = degrade(image, spec, seed=5)
        grey = np.all(np.abs(out.astype(int) - 128) <= 2, axis=2) & np.any(np.abs(image.astype(int) - 128) > 2, axis=2)
        hidden = (grey & object_mask).sum() / object_mask.sum()
        assert abs(hidden - frac) < 0.05, (frac, hidden)
    bg_fill = degrade(image, {**spec, "occlusion_fill": "background"}, seed=5)
    assert np.any(np.all(bg_fill == background, axis=2) & object_mask)


@pytest.mark.parametrize("key, value, message", [
    ("jpeg_quality", 0, "degradations.severe.jpeg_quality"),
    ("jpeg_quality", "high", "degradations.severe.jpeg_quality"),
    ("downscale", 1.5, "degradations.severe.downscale"),
    ("blur_sigma", -1.0, "degradations.severe.blur_sigma"),
    ("noise_std", True, "degradations.severe.noise_std"),
    ("occlusion_fill", "pink", "degradations.severe.occlusion_fill"),
    ("blur", 1.0, "degradations.severe.blur"),
])
def test_bad_spec_names_the_key(images, key, value, message):
    params = {**PARAMS, "degradations": {**PARAMS["degradations"],
                                         "severe": {**PARAMS["degradations"]["severe"], key: value}}}
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        severity_spec(params, "severe")
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        degrade(images[0], params["degradations"]["severe"], seed=0, where="degradations.severe")


def test_missing_key_and_missing_severity():
    spec = dict(PARAMS["degradations"]["mild"])
    del spec["noise_std"]
    with pytest.raises(ParamsError, match=r"missing key 'degradations\.mild\.noise_std'"):
        severity_spec({"degradations": {"mild": spec}}, "mild")
    with pytest.raises(ParamsError, match=r"degradations\.extreme"):
        severity_spec(PARAMS, "extreme")


def test_bad_image_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8 RGB"):
        degrade(np.zeros((8, 8), np.uint8), severity_spec(PARAMS, "mild"), seed=0)


@pytest.fixture(scope="module")
def cut_outs():
    from judge3d.render import render_input_image
    img = PARAMS["world"]["image"]
    return [render_input_image(build_shape(c, 11), img["size"], img["azimuth_deg"], img["elevation_deg"],
                               img["background"], alpha=True) for c in ("chair", "cabinet")]


def test_rgba_degrades_the_colour_as_rgb_and_carries_the_cut_out(cut_outs):
    no_occluder = {**severity_spec(PARAMS, "severe"), "occlusion_frac": 0.0}
    for i, rgba in enumerate(cut_outs):
        out = degrade(rgba, no_occluder, seed=i)
        assert out.shape == rgba.shape and out.dtype == np.uint8
        # Colour: the same bytes the RGB image gets (same draws, alpha takes none).
        np.testing.assert_array_equal(out[..., :3], degrade(np.ascontiguousarray(rgba[..., :3]), no_occluder, seed=i))
        # Alpha: blurred and resampled with the colour, so it softens but stays a cut-out.
        alpha, clean = out[..., 3], rgba[..., 3]
        assert alpha[0, 0] == 0 and alpha[clean == 255].mean() > 150 and alpha[clean == 0].mean() < 30
        assert not np.array_equal(alpha, clean)
        sharp = {**no_occluder, "downscale": 1.0, "blur_sigma": 0.0}
        np.testing.assert_array_equal(degrade(rgba, sharp, seed=i)[..., 3], clean)  # noise and JPEG leave it alone


def test_rgba_occluder_is_opaque(cut_outs):
    rgba = cut_outs[1]
    spec = {"downscale": 1.0, "blur_sigma": 0.0, "noise_std": 0.0, "jpeg_quality": 100,
            "occlusion_frac": 0.3, "occlusion_fill": "grey"}
    out = degrade(rgba, spec, seed=5)
    assert out.shape == rgba.shape
    grey = np.all(np.abs(out[..., :3].astype(int) - 128) <= 2, axis=2) & np.any(
        np.abs(rgba[..., :3].astype(int) - 128) > 2, axis=2)
    assert grey.sum() > 0.2 * (rgba[..., 3] > 0).sum()
    assert np.all(out[..., 3][grey] == 255)
    # The box reaches past the object's silhouette: there the occluder is opaque where the clean image was clear.
    assert np.any(grey & (rgba[..., 3] == 0))
