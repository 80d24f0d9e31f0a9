"""Grad-CAM heatmaps as RGBA PNGs, encoded with numpy + zlib (no per-pixel Python, no Pillow filter search).

With ``cams=auto`` every response carries up to four 224x224 RGBA maps, and encoding them was the largest
cost after the model itself (bench/serve.py). Pillow spends about as long choosing a PNG filter per row as
deflating; here the colour ramp is one table lookup and every row uses the PNG "Sub" filter, which turns
the smooth, bilinearly upsampled maps into small differences that deflate well at level 1.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE_RGBA = 6
_FILTER_SUB = 1


def _ramp() -> np.ndarray:
    """(256,) uint32: intensity byte -> RGBA pixel (black-red-yellow-white ramp, alpha = intensity)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    table = np.empty((256, 4), dtype=np.uint8)
    table[:, 0] = np.clip(v * 3.0, 0, 1) * 255
    table[:, 1] = np.clip(v * 3.0 - 1.0, 0, 1) * 255
    table[:, 2] = np.clip(v * 3.0 - 2.0, 0, 1) * 255
    table[:, 3] = np.arange(256)
    return table.view(np.uint32).reshape(256)


_RAMP = _ramp()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_rgba_png(rgba: np.ndarray, *, compress_level: int = 1) -> bytes:
    """A valid 8-bit RGBA PNG of ``rgba`` ``(H, W, 4)`` uint8, every scanline Sub-filtered."""
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 4) uint8 array, got {rgba.shape} {rgba.dtype}")
    height, width = rgba.shape[:2]
    rows = np.ascontiguousarray(rgba).reshape(height, width * 4)
    scanlines = np.empty((height, width * 4 + 1), dtype=np.uint8)
    scanlines[:, 0] = _FILTER_SUB
    scanlines[:, 1:5] = rows[:, :4]
    np.subtract(rows[:, 4:], rows[:, :-4], out=scanlines[:, 5:])  # wraps modulo 256, as PNG's Sub wants
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE_RGBA, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), compress_level))
        + _chunk(b"IEND", b"")
    )


def heatmap_rgba(intensity: np.ndarray) -> np.ndarray:
    """``(H, W)`` map in [0, 1] -> ``(H, W, 4)`` uint8: warm colour ramp, alpha = intensity (8-bit)."""
    # C order whatever the input's layout: the view below needs it, and maps computed in channels_last on a
    # GPU arrive transposed in memory.
    levels = (np.clip(intensity, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8, order="C")
    rgba: np.ndarray = _RAMP[levels].view(np.uint8).reshape(*levels.shape, 4)
    return rgba


def heatmap_png(intensity: np.ndarray) -> bytes:
    """An RGBA PNG of a [0, 1] map, ready to lay over the film (see :func:`heatmap_rgba`)."""
    return encode_rgba_png(heatmap_rgba(intensity))
