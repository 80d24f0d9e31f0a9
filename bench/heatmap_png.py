"""Heatmap PNG encoding: the service's indexed-colour encoder against RGBA encodings of the same pixels.

    python bench/heatmap_png.py [--maps 16] [--seconds 1]

Real Grad-CAM maps when the shipped demo model and ../shared's NIH films are present (else smooth random
maps of the same shape): each encoder's time per 224x224 map and its size, with the check that the
indexed PNG decodes to exactly the RGBA pixels.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from serve import radiographs
from timing import timed_for

from bayesnet import load_checkpoint
from bayesnet.gradcam import cams_from_features
from bayesnet.imaging import decode_image
from bayesnet.preprocess import preprocess
from service.runtime.heatmap_png import _PNG_SIGNATURE, _chunk, _deflate, heatmap_png, heatmap_rgba
from service.settings import DEFAULT_MODEL_DIR

CPU = torch.device("cpu")


def real_maps(n: int) -> list[np.ndarray]:
    """Grad-CAM maps of the demo model for its four most probable findings on each film."""
    model, spec = load_checkpoint(DEFAULT_MODEL_DIR)
    model.eval()
    films = radiographs(max(1, n // 4))
    x = torch.stack([preprocess(decode_image(data), spec) for data in films])
    with torch.inference_mode():
        features = model.forward_features(x)
        top = torch.sigmoid(model.forward_head(model.pool(features), None)).mean(0).topk(4).indices.tolist()
        maps = cams_from_features(model, features, top, (spec.image_size, spec.image_size))
    return [m for image in maps.numpy() for m in image][:n]


def rgba_sub_png(intensity: np.ndarray) -> bytes:
    """The same pixels as an RGBA PNG, Sub-filtered and deflated at level 1 (the service's encoder until 2026-11-26)."""
    rgba = heatmap_rgba(intensity)
    height, width = rgba.shape[:2]
    rows = rgba.reshape(height, width * 4)
    lines = np.empty((height, width * 4 + 1), dtype=np.uint8)
    lines[:, 0] = 1
    lines[:, 1:5] = rows[:, :4]
    np.subtract(rows[:, 4:], rows[:, :-4], out=lines[:, 5:])
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    idat = zlib.compress(lines.tobytes(), 1)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def zlib_indexed_png(intensity: np.ndarray) -> bytes:
    """The service's indexed PNG deflated by the standard library's zlib (what it falls back to without isal)."""
    png = heatmap_png(intensity)
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    scanlines = zlib.decompress(png[start + 8 : start + 8 + length])
    end = start + 12 + length
    return png[:start] + _chunk(b"IDAT", zlib.compress(scanlines, 1)) + png[end:]


def pillow_rgba_png(intensity: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(heatmap_rgba(intensity), mode="RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing span per encoder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    maps = real_maps(args.maps)
    for m in maps:  # the claim the service relies on: same pixels, whatever the encoding
        decoded = np.asarray(Image.open(io.BytesIO(heatmap_png(m))).convert("RGBA"))
        assert np.array_equal(decoded, heatmap_rgba(m))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(rgba_sub_png(m)))), decoded)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(zlib_indexed_png(m))).convert("RGBA")), decoded)
    encoders = {
        f"indexed + tRNS, Sub, level 1 (the service: {_deflate.__module__})": heatmap_png,
        "indexed + tRNS, Sub, level 1, stdlib zlib": zlib_indexed_png,
        "RGBA, Sub, level 1 (numpy + zlib)": rgba_sub_png,
        "RGBA, Pillow, level 1": pillow_rgba_png,
    }
    print(f"{len(maps)} Grad-CAM maps of {maps[0].shape[0]}x{maps[0].shape[1]}, one thread; decoded pixels identical")
    print(f"{'encoder':<60}{'ms / map':>10}{'bytes / map':>13}{'x service':>11}")
    base = None
    for name, encode in encoders.items():
        times = timed_for(lambda encode=encode: [encode(m) for m in maps], args.seconds, CPU)
        ms = statistics.median(times) / len(maps) * 1e3
        size = statistics.mean(len(encode(m)) for m in maps)
        base = base or ms
        print(f"{name:<60}{ms:>10.3f}{size:>13.0f}{ms / base:>10.1f}x")


if __name__ == "__main__":
    main()
