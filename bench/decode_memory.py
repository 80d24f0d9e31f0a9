"""Peak memory of one upload's decode, measured against the header-only bound ``bayesnet.decode_memory_bytes``.

Builds worst-case inputs in a temporary folder: a 7000 x 7000 16-bit MONOCHROME2 DICOM (RLE Lossless and
uncompressed Explicit VR Little Endian, with a window and a rescale, as a DX film has), the same pixels as a 16-bit
grayscale PNG, an 8-bit RGB PNG (a gray film with a coloured marker burned in) and an 8-bit grayscale JPEG; plus
real films from ../shared/data for scale. The pixels are a synthetic film (smooth gradients, rib-like bands and
noise), so the files compress about as a radiograph does.

Each case runs in a fresh subprocess, after a warm-up decode of a 256 px file of the same kind (so that lazily
imported decoders and one-time allocations are not counted), and reports the peak resident memory (VmHWM, reset
through /proc/self/clear_refs) above the resident memory just before the call, with the input bytes already loaded:
the larger of two calls, and the shorter of their times. Between calls freed heap memory is handed back to the
system (``malloc_trim``), so that each call starts from the same state:

* ``model``: what the service does for a prediction (``service.runtime.decoding.decode_for_model``:
  ``decode_image``, the geometry check, ``preprocess`` for the demo model's 224 px spec);
* ``preview``: what it does for the browser preview (``decode_image`` + ``service.runtime.pipeline.preview_png``: long
  side 1024, PNG encode); ``preview/2`` the same with ``decode_image(..., max_side=1024)``.

Prints one table (sizes in MiB, ``ratio``: measured peak over the bound) and the time of pydicom's RLE decode alone
by each installed plugin. Exits 1 when any measured peak exceeds its bound. ``--cases`` also runs rarer encodings
at any ``--size``: ``dicom-j2k``, ``dicom-jpegls``, ``dicom-jpeg`` (baseline, 8 bits), ``dicom-ybr`` (colour
baseline), ``jpeg-rgb``, ``jpeg-prog`` (progressive), ``png-palette`` and ``png-rotated`` (EXIF orientation 6).
``--before PATH`` adds the same measurements of another checkout of ``bayesnet`` and ``service`` (e.g.
``git archive HEAD bayesnet service models | tar -x -C /tmp/base``), run with pydicom's own RLE decoder as it was
before ``pylibjpeg-rle`` was a dependency.

    .venv/bin/python bench/decode_memory.py [--size 7000] [--before PATH] [--cases dicom-rle,png16]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIB = 1024 * 1024
WARM_UP_SIDE = 256
PREVIEW_SIDE = 1024  # service.runtime.pipeline.preview_png's long side


# --- inputs ------------------------------------------------------------------------------------------------------


def synthetic_film(side: int, seed: int = 0) -> np.ndarray:
    """A ``(side, side)`` uint16 12-bit 'radiograph': smooth gradients, rib-like bands and sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, side, dtype=np.float32)[None, :]
    film = 1800.0 + 1400.0 * y + 600.0 * np.cos(np.pi * x) ** 2
    film = film + 250.0 * np.sin(2 * np.pi * 9 * y + 0.4 * np.abs(x)) * (np.abs(x) > 0.15)
    film = film + rng.normal(0.0, 12.0, size=(side, side)).astype(np.float32)
    return np.clip(film, 0, 4095).astype(np.uint16)


def dicom_bytes(film: np.ndarray, transfer_syntax: str = "native") -> bytes:
    """A DX 'For Presentation' file of ``film`` in ``transfer_syntax``: 12 of 16 bits with a window and a rescale
    (``native``, ``rle``, ``j2k``, ``jpegls``), or 8 bits (``jpeg``: baseline, gray; ``ybr``: baseline, colour)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        RLELossless,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = film.shape
    if transfer_syntax in ("jpeg", "ybr"):
        colour = transfer_syntax == "ybr"
        pixels = rgb_film(film) if colour else (film >> 4).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if colour:
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        else:
            ds.WindowCenter, ds.WindowWidth = 150, 200
        ds.PixelData = encapsulate([jpeg_bytes(pixels)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        ds.WindowCenter, ds.WindowWidth = 2600, 2400
        ds.PixelData = film.tobytes()
        syntaxes = {"rle": RLELossless, "j2k": JPEG2000Lossless, "jpegls": JPEGLSLossless}
        if transfer_syntax in syntaxes:
            ds.compress(syntaxes[transfer_syntax], film)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def rgb_film(film: np.ndarray) -> np.ndarray:
    """The film as 8-bit RGB with a coloured marker burned in near the top (a colour secondary capture)."""
    gray = (film >> 4).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    side = film.shape[0]
    rgb[side // 20 : side // 10, side // 20 : side // 5] = (230, 40, 40)
    return rgb


def jpeg_bytes(pixels: np.ndarray, **options: Any) -> bytes:
    """8-bit samples (a 12-bit film is shifted to 8 bits) as a quality-90 JPEG."""
    from PIL import Image

    if pixels.dtype == np.uint16:
        pixels = (pixels >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def palette_png(film: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb_film(film)).quantize(64).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def rotated_png(film: np.ndarray) -> bytes:
    """8-bit gray PNG whose EXIF Orientation (6) asks for a rotation."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray((film >> 4).astype(np.uint8)).save(buffer, format="PNG", compress_level=1, exif=exif)
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[np.ndarray], bytes] | None  # None: a real file, ``path``
    path: Path | None = None
    modes: tuple[str, ...] = ("model", "preview")
    default: bool = True  # run without --cases (the others check the bound for rarer encodings)


CASES: tuple[Case, ...] = (
    Case("dicom-rle", lambda film: dicom_bytes(film, "rle")),
    Case("dicom-native", dicom_bytes),
    Case("png16", png_bytes),
    Case("png-rgb", lambda film: png_bytes(rgb_film(film))),
    Case("jpeg", jpeg_bytes, modes=("model", "preview", "preview/2")),
    Case("real-png", None, SHARED_DATA / "originals" / "00000075_000.png"),
    Case("real-dicom", None, SHARED_DATA / "originals" / "siim-chest-cr-jpeg-baseline.dcm"),
    Case("dicom-j2k", lambda film: dicom_bytes(film, "j2k"), default=False),
    Case("dicom-jpegls", lambda film: dicom_bytes(film, "jpegls"), default=False),
    Case("dicom-jpeg", lambda film: dicom_bytes(film, "jpeg"), default=False),
    Case("dicom-ybr", lambda film: dicom_bytes(film, "ybr"), default=False),
    Case("jpeg-rgb", lambda film: jpeg_bytes(rgb_film(film)), modes=("model", "preview", "preview/2"), default=False),
    Case("jpeg-prog", lambda film: jpeg_bytes(film, progressive=True), default=False),
    Case("png-palette", palette_png, default=False),
    Case("png-rotated", rotated_png, default=False),
)


def build_inputs(cases: list[Case], side: int, folder: Path) -> dict[str, tuple[Path, Path]]:
    """Write each case's file and its warm-up twin; ``{name: (file, warm-up file)}``."""
    films = {side: synthetic_film(side), WARM_UP_SIDE: synthetic_film(WARM_UP_SIDE, seed=1)}
    paths = {}
    for case in cases:
        if case.build is None:
            if case.path is None or not case.path.is_file():
                print(f"skipping {case.name}: {case.path} is absent", file=sys.stderr)
                continue
            paths[case.name] = (case.path, case.path)
            continue
        both = []
        for size, label in ((side, "full"), (WARM_UP_SIDE, "warm")):
            path = folder / f"{case.name}-{label}.bin"
            path.write_bytes(case.build(films[size]))
            both.append(path)
        paths[case.name] = (both[0], both[1])
    return paths


# --- one measurement, in a fresh interpreter ---------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(path: str, warm_path: str, modes: list[str], before: bool) -> None:
    """Measure one file in each mode and print a JSON line; runs in its own process."""
    if before:
        # The code before pylibjpeg-rle was a dependency decoded RLE with pydicom's own (numpy) decoder.
        from pydicom.pixels.decoders.base import RLELosslessDecoder

        if "pylibjpeg" in RLELosslessDecoder.available_plugins:
            RLELosslessDecoder.remove_plugin("pylibjpeg")
    import bayesnet
    from bayesnet import decode_image
    from bayesnet.checkpoint import load_spec
    from bayesnet.imaging import DEFAULT_MAX_PIXELS
    from service.runtime.decoding import decode_for_model
    from service.runtime.pipeline import preview_png

    spec = load_spec(REPO / "models" / "demo")
    max_pixels = DEFAULT_MAX_PIXELS
    libc = ctypes.CDLL("libc.so.6")

    def run(data: bytes, mode: str) -> None:
        if mode == "model":
            decode_for_model(data, spec, max_pixels=max_pixels)
        elif mode == "preview":
            preview_png(decode_image(data, max_pixels=max_pixels))
        else:
            preview_png(decode_image(data, max_pixels=max_pixels, max_side=PREVIEW_SIDE))

    warm = Path(warm_path).read_bytes()
    for mode in modes:
        run(warm, mode)
    data = Path(path).read_bytes()
    estimate = estimate_ms = None
    if hasattr(bayesnet, "decode_memory_bytes"):
        started = time.perf_counter()
        estimate = bayesnet.decode_memory_bytes(data, max_pixels=max_pixels, spec=spec)
        estimate_ms = (time.perf_counter() - started) * 1e3
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        # Twice, each from the same state (free heap memory handed back, the peak reset to the current size): the
        # larger peak and the shorter time (the first call at full size also pays for the first touch of memory).
        for _ in range(2):
            gc.collect()
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            rss_kib = _status_kib("VmRSS")
            started = time.perf_counter()
            run(data, mode)
            seconds = time.perf_counter() - started
            peak = (_status_kib("VmHWM") - rss_kib) * 1024
            was = results.get(mode, {"peak_bytes": 0, "seconds": float("inf")})
            results[mode] = {"peak_bytes": max(peak, was["peak_bytes"]), "seconds": min(seconds, was["seconds"])}
    print(
        json.dumps(
            {
                "modes": results,
                "estimate_bytes": estimate,
                "estimate_ms": estimate_ms,
                "bayesnet": str(Path(bayesnet.__file__).parent),
            }
        )
    )


def measure(path: Path, warm: Path, modes: tuple[str, ...], tree: Path, *, before: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(path), str(warm), ",".join(modes)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([*command, *(["--as-before"] if before else [])], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {path.name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["bayesnet"]).parent.resolve() != tree.resolve():
        raise SystemExit(f"the child imported bayesnet from {result['bayesnet']}, not from {tree}")
    return result


# --- the table ---------------------------------------------------------------------------------------------------


def rle_decoders(data: bytes, repeats: int = 3) -> str:
    """Seconds (best of ``repeats``) of pydicom's RLE decode of ``data`` alone, by each installed plugin."""
    import pydicom
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import RLELosslessDecoder

    ds = pydicom.dcmread(io.BytesIO(data))
    best = {}
    for plugin in RLELosslessDecoder.available_plugins:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            pixel_array(ds, decoding_plugin=plugin)
            times.append(time.perf_counter() - started)
        best[plugin] = min(times)
    line = ", ".join(f"{plugin} {seconds:.2f} s" for plugin, seconds in best.items())
    if "pydicom" in best and "pylibjpeg" in best:
        line += f"; pylibjpeg-rle {best['pydicom'] / best['pylibjpeg']:.1f}x faster"
    return line


def megapixels(data: bytes) -> float:
    from bayesnet import decode_image

    image = decode_image(data)
    return image.width * image.height / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=7000, help="side of the synthetic films, pixels (default 7000)")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (bayesnet/, service/)")
    parser.add_argument("--cases", help="comma-separated case names (default: all but the extra ones)")
    parser.add_argument("--child", nargs=3, metavar=("FILE", "WARM_UP_FILE", "MODES"), help=argparse.SUPPRESS)
    parser.add_argument("--as-before", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, warm, modes = args.child
        child(path, warm, modes.split(","), before=args.as_before)
        return 0

    wanted = set(args.cases.split(",")) if args.cases else None
    cases = [case for case in CASES if (case.default if wanted is None else case.name in wanted)]
    started = time.perf_counter()
    over = []
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as folder:
        paths = build_inputs(cases, args.size, Path(folder))
        print(f"inputs built in {time.perf_counter() - started:.0f} s; peak RSS above the RSS before the call, MiB\n")
        head = f"{'case':<14}{'mode':<10}{'file MiB':>9}{'MP':>6}"
        if args.before:
            head += f"{'before':>10}{'before s':>9}"
        head += f"{'after':>9}{'after s':>8}{'bound':>9}{'ratio':>7}{'bound ms':>9}"
        print(head)
        for case in cases:
            if case.name not in paths:
                continue
            path, warm = paths[case.name]
            data = path.read_bytes()
            size_mb, mp = len(data) / MIB, megapixels(data)
            after = measure(path, warm, case.modes, REPO, before=False)
            old = None
            if args.before:
                old = measure(path, warm, tuple(m for m in case.modes if m != "preview/2"), args.before, before=True)
            bound = after["estimate_bytes"]
            for mode in case.modes:
                line = f"{case.name:<14}{mode:<10}{size_mb:>9.1f}{mp:>6.1f}"
                if old is not None:
                    was = old["modes"].get(mode)
                    line += f"{was['peak_bytes'] / MIB:>10.0f}{was['seconds']:>9.2f}" if was else f"{'':>19}"
                now = after["modes"][mode]
                line += f"{now['peak_bytes'] / MIB:>9.0f}{now['seconds']:>8.2f}"
                if bound is None:
                    print(line + "  (no decode_memory_bytes in this checkout)", flush=True)
                    continue
                ratio = now["peak_bytes"] / bound
                line += f"{bound / MIB:>9.0f}{ratio:>7.2f}{after['estimate_ms']:>9.2f}"
                print(line, flush=True)
                if ratio > 1:
                    over.append(f"{case.name} {mode}: {now['peak_bytes'] / MIB:.0f} MB measured > {bound / MIB:.0f} MB")
        if "dicom-rle" in paths:
            rle = paths["dicom-rle"][0].read_bytes()
            print(f"\nRLE decode alone (pydicom pixel_array, best of 3), dicom-rle: {rle_decoders(rle)}")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    for line in over:
        print("OVER THE BOUND:", line)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
