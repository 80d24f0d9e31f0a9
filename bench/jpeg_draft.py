"""Reduced-size JPEG decoding (Pillow's DCT scaling, ``Image.draft``): what it saves and what it changes.

For each of the real 1024 px NIH films in ../shared/data/originals (as JPEG, quality 90) and the same films
upscaled to 2048 px (the size of a hospital export), decodes the JPEG at full size and with ``draft`` to the
smallest scale whose short side stays >= ``--min-side`` (default 448, twice the model's 224), then preprocesses
both as the service does and prints the decode time (one thread, best of ``--repeats``) and how far the model
input moved (normalised units; the input spans [-1, 1]).

    python bench/jpeg_draft.py [--min-side 448] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bayesnet import preprocess
from bayesnet.checkpoint import load_spec
from service.settings import DEFAULT_MODEL_DIR

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "originals"


def as_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode(data: bytes, min_side: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if min_side is not None:
            width, height = image.size
            short = min(width, height)
            image.draft("L", (max(1, width * min_side // short), max(1, height * min_side // short)))
        image.load()
        return np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-side", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_spec(DEFAULT_MODEL_DIR)
    files = sorted(ORIGINALS.glob("*.png"))
    if not files:
        raise SystemExit(f"no films in {ORIGINALS}")
    print(
        f"{'film':<16}{'size':>6}{'full ms':>9}{'draft ms':>10}{'speed-up':>10}{'draft px':>10}"
        f"{'max|dx|':>9}{'mean|dx|':>10}"
    )
    for path in files:
        gray = np.asarray(Image.open(path).convert("L"))
        big = np.asarray(Image.fromarray(gray).resize((2048, 2048), Image.Resampling.BICUBIC))
        for label, pixels in (("1024", gray), ("2048", big)):
            data = as_jpeg(pixels)
            timings, inputs, shape = {}, {}, None
            for min_side in (None, args.min_side):
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.thread_time()
                    decoded = decode(data, min_side)
                    best = min(best, time.thread_time() - started)
                timings[min_side] = best * 1e3
                inputs[min_side] = preprocess(decoded, spec)
                shape = decoded.shape
            dx = (inputs[args.min_side] - inputs[None]).abs()
            print(
                f"{path.stem:<16}{label:>6}{timings[None]:>9.1f}{timings[args.min_side]:>10.1f}"
                f"{timings[None] / timings[args.min_side]:>9.1f}x{shape[0]:>10}{float(dx.max()):>9.3f}"
                f"{float(dx.mean()):>10.4f}"
            )


if __name__ == "__main__":
    main()
