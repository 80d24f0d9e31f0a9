"""Grad-CAM heatmaps as PNGs, encoded with numpy + zlib: an 8-bit indexed image with a transparency table.

A heatmap is one intensity byte per pixel pushed through a fixed 256-entry colour ramp whose alpha is the
intensity. PNG stores exactly that natively: colour type 3 (palette) with the ramp as ``PLTE`` and its
alphas as ``tRNS``. Every PNG reader (browsers, Pillow's ``convert("RGBA")``, libpng with
``png_set_tRNS_to_alpha``, matplotlib) expands it to the same RGBA pixels an RGBA PNG would carry, while the
encoder deflates a quarter of the bytes, in a fraction of the time (``python bench/heatmap_png.py``;
docs/benchmarks.md). With ``cams=auto`` each response carries up to four maps, and their encoding was the
largest cost after the model.

The deflate itself is Intel ISA-L's (``isal``, level 1) where it is installed, as the service's extra installs
it: faster than zlib at level 1 and a smaller stream (the same benchmark prints both). A plain zlib stream is
what PNG requires and what either library writes, so any decoder reads both; without ``isal`` the standard
library's zlib is used.

Every scanline uses the PNG "Sub" filter, which turns the smooth, bilinearly upsampled maps into small
differences that deflate well at level 1 (Pillow spends about as long choosing a filter per row as
deflating).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np

_deflate: Callable[[bytes, int], bytes]
try:
    from isal.isal_zlib import compress as _deflate  # ISA-L: levels 0-3, a standard zlib stream
except ImportError:  # pragma: no cover - isal is in the serve extra; the stdlib writes the same format
    _deflate = zlib.compress

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE_PALETTE = 3
_FILTER_SUB = 1


def _ramp() -> np.ndarray:
    """(256, 4) uint8: intensity byte -> RGBA (black-red-yellow-white ramp, alpha = intensity)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    table = np.empty((256, 4), dtype=np.uint8)
    table[:, 0] = np.clip(v * 3.0, 0, 1) * 255
    table[:, 1] = np.clip(v * 3.0 - 1.0, 0, 1) * 255
    table[:, 2] = np.clip(v * 3.0 - 2.0, 0, 1) * 255
    table[:, 3] = np.arange(256)
    return table


_RAMP = _ramp()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


_PALETTE_CHUNKS = _chunk(b"PLTE", _RAMP[:, :3].tobytes()) + _chunk(b"tRNS", _RAMP[:, 3].tobytes())


def heatmap_levels(intensity: np.ndarray) -> np.ndarray:
    """``(H, W)`` map in [0, 1] -> ``(H, W)`` uint8 levels, C order whatever the input's layout.

    (Maps computed in channels_last on a GPU arrive transposed in memory; the encoder needs C order.)
    """
    if intensity.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {intensity.shape}")
    scaled = np.clip(intensity, 0.0, 1.0)  # a new array: the caller's map is never written
    scaled *= 255.0  # in place, the same float operations as a chained expression without its two temporaries
    scaled += 0.5
    levels: np.ndarray = scaled.astype(np.uint8, order="C")
    return levels


def heatmap_rgba(intensity: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8: the pixels a PNG reader decodes :func:`heatmap_png` to (warm ramp, alpha = intensity)."""
    rgba: np.ndarray = _RAMP[heatmap_levels(intensity)]
    return rgba


def heatmap_png(intensity: np.ndarray, *, compress_level: int = 1) -> bytes:
    """A PNG of a [0, 1] map, ready to lay over the film: decodes to :func:`heatmap_rgba`'s RGBA pixels.

    ``compress_level``: 0-3 (ISA-L's range, also valid for zlib): 1 is both fast and small for these maps.
    """
    levels = heatmap_levels(intensity)
    height, width = levels.shape
    scanlines = np.empty((height, width + 1), dtype=np.uint8)
    scanlines[:, 0] = _FILTER_SUB
    scanlines[:, 1] = levels[:, 0]
    np.subtract(levels[:, 1:], levels[:, :-1], out=scanlines[:, 2:])  # wraps modulo 256, as PNG's Sub wants
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE_PALETTE, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _PALETTE_CHUNKS
        + _chunk(b"IDAT", _deflate(scanlines.tobytes(), compress_level))
        + _chunk(b"IEND", b"")
    )
