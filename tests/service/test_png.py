"""The hand-rolled heatmap PNG encoder decodes, pixel for pixel, in independent PNG readers."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.png import encode_rgba_png, heatmap_png, heatmap_rgba


def smooth_map(seed: int, size: int = 224) -> np.ndarray:
    coarse = torch.from_numpy(np.random.default_rng(seed).random((1, 1, 7, 7), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    out = fine[0, 0].numpy()
    return (out - out.min()) / (out.max() - out.min())


@pytest.mark.parametrize("shape", [(224, 224, 4), (1, 1, 4), (3, 517, 4), (400, 2, 4)])
def test_any_rgba_array_round_trips_through_pillow(shape: tuple[int, int, int]) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_rgba_png(rgba)))
    decoded.load()  # verifies every chunk CRC and the zlib stream
    assert decoded.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(decoded), rgba)


def test_round_trips_through_libpng_too() -> None:
    matplotlib_image = pytest.importorskip("matplotlib.image")  # matplotlib reads PNG with its own libpng path
    rgba = heatmap_rgba(smooth_map(1))
    decoded = matplotlib_image.imread(io.BytesIO(encode_rgba_png(rgba)), format="png")
    np.testing.assert_array_equal(np.round(decoded * 255).astype(np.uint8), rgba)


def test_heatmap_alpha_is_the_intensity_and_colour_warms_with_it() -> None:
    intensity = smooth_map(2)
    rgba = np.asarray(Image.open(io.BytesIO(heatmap_png(intensity))))
    assert rgba.shape == (224, 224, 4)
    np.testing.assert_allclose(rgba[..., 3] / 255.0, intensity, atol=0.5 / 255 + 1e-6)
    hot, cold = (
        np.unravel_index(intensity.argmax(), intensity.shape),
        np.unravel_index(intensity.argmin(), intensity.shape),
    )
    assert tuple(rgba[hot]) == (255, 255, 255, 255)
    assert tuple(rgba[cold]) == (0, 0, 0, 0)
    # Monotone ramp: a brighter pixel is never less red, green or blue.
    order = np.argsort(intensity.ravel())
    assert (np.diff(rgba.reshape(-1, 4)[order].astype(int), axis=0) >= 0).all()


@pytest.mark.parametrize("layout", ["transposed", "fortran", "strided"])
def test_maps_in_any_memory_layout_encode_like_their_c_order_copy(layout: str) -> None:
    # Grad-CAM maps computed in channels_last on a GPU reach the encoder transposed in memory (found on an H200).
    base = smooth_map(4, size=64)
    views = {
        "transposed": np.ascontiguousarray(base.T).T,
        "fortran": np.asfortranarray(base),
        "strided": base[::2, ::2],
    }
    view = views[layout]
    assert not view.flags.c_contiguous
    assert heatmap_png(view) == heatmap_png(np.ascontiguousarray(view))


def test_smooth_maps_compress_well() -> None:
    raw_bytes = 224 * 224 * 4
    png = heatmap_png(smooth_map(3))
    assert len(png) < raw_bytes / 4
    assert len(png) <= len(zlib.compress(heatmap_rgba(smooth_map(3)).tobytes(), 1)) * 1.05 + 100


def test_rejects_what_is_not_rgba_bytes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_rgba_png(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_rgba_png(np.zeros((4, 4, 4), dtype=np.float32))
