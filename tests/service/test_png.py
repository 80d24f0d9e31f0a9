"""The hand-rolled heatmap PNG encoder (indexed colour + transparency) decodes to the intended RGBA pixels."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.runtime.heatmap_png import heatmap_png, heatmap_rgba


def smooth_map(seed: int, size: int = 224) -> np.ndarray:
    coarse = torch.from_numpy(np.random.default_rng(seed).random((1, 1, 7, 7), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    out = fine[0, 0].numpy()
    return (out - out.min()) / (out.max() - out.min())


def decode_rgba(png: bytes) -> np.ndarray:
    decoded = Image.open(io.BytesIO(png))
    decoded.load()  # verifies every chunk CRC and the zlib stream
    assert decoded.mode == "P" and "transparency" in decoded.info  # indexed, with a transparency table
    return np.asarray(decoded.convert("RGBA"))


@pytest.mark.parametrize("shape", [(224, 224), (1, 1), (3, 517), (400, 2)])
def test_any_map_decodes_to_its_rgba_pixels_in_pillow(shape: tuple[int, int]) -> None:
    intensity = np.random.default_rng(0).random(shape)
    np.testing.assert_array_equal(decode_rgba(heatmap_png(intensity)), heatmap_rgba(intensity))


def test_decodes_to_the_same_rgba_in_libpng_too() -> None:
    matplotlib_image = pytest.importorskip("matplotlib.image")  # another PNG reading path
    intensity = smooth_map(1)
    decoded = matplotlib_image.imread(io.BytesIO(heatmap_png(intensity)), format="png")
    if decoded.dtype != np.uint8:
        decoded = np.round(decoded * 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded, heatmap_rgba(intensity))


def test_heatmap_alpha_is_the_intensity_and_colour_warms_with_it() -> None:
    intensity = smooth_map(2)
    rgba = decode_rgba(heatmap_png(intensity))
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
    intensity = smooth_map(3)
    png = heatmap_png(intensity)
    assert len(png) < 224 * 224 / 2  # under half a byte per pixel, palette and chunks included
    # A quarter of what the same pixels cost as RGBA deflated at the same level, or less.
    assert len(png) < len(zlib.compress(heatmap_rgba(intensity).tobytes(), 1)) / 2


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4)), np.zeros(16)])
def test_rejects_what_is_not_a_2d_map(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        heatmap_png(bad)


def test_isal_deflates_and_the_zlib_fallback_decodes_to_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.runtime.heatmap_png

    intensity = smooth_map(5)
    assert service.runtime.heatmap_png._deflate.__module__ == "isal.isal_zlib"  # the serve extra installs it
    fast = heatmap_png(intensity)
    monkeypatch.setattr(service.runtime.heatmap_png, "_deflate", zlib.compress)  # what runs where isal is not installed
    fallback = heatmap_png(intensity)
    assert fast != fallback
    np.testing.assert_array_equal(decode_rgba(fast), heatmap_rgba(intensity))
    np.testing.assert_array_equal(decode_rgba(fallback), heatmap_rgba(intensity))
