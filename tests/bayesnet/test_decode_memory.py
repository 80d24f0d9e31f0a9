"""Decode memory: the header-only bound (``decode_memory_bytes``), the pixels it must not change, and reduced-size
JPEG decoding for previews.

The bound is checked against tracemalloc, which sees numpy's arrays and Python's bytes (not Pillow's, libjpeg's or
torch's own buffers: ``bench/decode_memory.py`` measures resident memory at 7000 x 7000 for those). Inputs are
1500 px films built here in their real formats from a synthetic film (the bench's), and real files from
``pydicom-data`` and ``../shared/data``; nothing is mocked.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.processing import apply_modality_lut, apply_windowing

import bench.decode_memory as bench  # the bench's input builders: the test and the bench decode the same files
from bayesnet import ModelSpec, decode_image, decode_memory_bytes, preprocess
from bayesnet.errors import CorruptImageError
from bayesnet.imaging import decoded
from bayesnet.imaging.memory import OVERHEAD_BYTES, REFUSED_BYTES

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

SIDE = 1500
MIB = 1024 * 1024


def shared_bytes(relative: str) -> bytes:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real test data {path} is absent (../shared/data ships only with the dev setup)")
    return path.read_bytes()


def pydicom_data_bytes(name: str) -> bytes:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    return Path(data_store.DataStore().get_path(name)).read_bytes()


def pydicom_test_bytes(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    return bench.synthetic_film(SIDE)


BUILDERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "dicom-rle": lambda film: bench.dicom_bytes(film, "rle"),
    "dicom-native": bench.dicom_bytes,
    "dicom-jpeg": lambda film: bench.dicom_bytes(film, "jpeg"),
    "dicom-ybr": lambda film: bench.dicom_bytes(film, "ybr"),
    "png16": bench.png_bytes,
    "png-rgb": lambda film: bench.png_bytes(bench.rgb_film(film)),
    "png-palette": bench.palette_png,
    "jpeg": bench.jpeg_bytes,
    "jpeg-rgb": lambda film: bench.jpeg_bytes(bench.rgb_film(film)),
}


# --- the bound -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_resize", ["squash", "letterbox"])
@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_bound_covers_the_traced_peak_of_decode_and_preprocess(film: np.ndarray, case: str, spec_resize: str) -> None:
    tall = film[:, : SIDE * 2 // 3] if spec_resize == "letterbox" else film  # a letterbox pads a non-square film
    data = BUILDERS[case](np.ascontiguousarray(tall))
    spec = ModelSpec(arch="test_efficientnet", image_size=224, resize=spec_resize, name="memory-test")
    bound = decode_memory_bytes(data, spec=spec)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        image = decode_image(data)
        tensor = preprocess(image, spec)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert tensor.shape == (1, 224, 224)
    # Without its fixed allowance for what tracemalloc cannot see, the bound still covers every traced array.
    assert 0 < peak <= bound - OVERHEAD_BYTES, f"{case}: traced {peak / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"


def test_bound_grows_with_the_declared_size_not_the_file(film: np.ndarray) -> None:
    small = decode_memory_bytes(bench.dicom_bytes(film[:500, :500].copy(), "rle"))
    large = decode_memory_bytes(bench.dicom_bytes(film, "rle"))
    # 9 times the pixels: at least the float32 result and the 16-bit samples for each extra pixel.
    assert large - small >= 6 * (SIDE * SIDE - 500 * 500)


def test_bound_reads_the_header_only(film: np.ndarray) -> None:
    """No pixel is decoded: the bound of a 1500 px DICOM or PNG allocates almost nothing."""
    for data in (bench.dicom_bytes(film, "native"), bench.dicom_bytes(film, "rle"), bench.png_bytes(film)):
        tracemalloc.start()
        try:
            decode_memory_bytes(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MIB


def test_bound_of_what_the_decoder_refuses_is_small(film: np.ndarray) -> None:
    png = bench.png_bytes(film[:64, :64].copy())
    bomb = bytearray(png)
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height, then the CRC no longer matches
    assert decode_memory_bytes(b"") == REFUSED_BYTES
    assert decode_memory_bytes(b"plain text, not an image") == REFUSED_BYTES
    assert decode_memory_bytes(bytes(bomb)) == REFUSED_BYTES
    assert decode_memory_bytes(png, max_pixels=100) == REFUSED_BYTES
    dicom = bench.dicom_bytes(film, "rle")
    assert decode_memory_bytes(dicom, max_pixels=1000) == len(dicom) + REFUSED_BYTES  # its Pixel Data is read
    ds = pydicom.dcmread(io.BytesIO(dicom))
    ds.NumberOfFrames = 2
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert decode_memory_bytes(buffer.getvalue()) == len(buffer.getvalue()) + REFUSED_BYTES


def test_bound_counts_the_copy_of_a_bytes_like_input(film: np.ndarray) -> None:
    data = bench.png_bytes(film[:200, :200].copy())
    assert decode_memory_bytes(bytearray(data)) == decode_memory_bytes(data) + len(data)
    with pytest.raises(TypeError):
        decode_memory_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels"):
        decode_memory_bytes(data, max_pixels=0)


def test_deflated_dicom_is_bounded_by_the_image_it_declares() -> None:
    """pydicom inflates a Deflated dataset whole: the bound counts the compressed and inflated copies, and the
    decoder lets the dataset inflate to no more than its declared image needs."""
    data = pydicom_test_bytes("image_dfl.dcm")
    bound = decode_memory_bytes(data)
    tracemalloc.start()
    try:
        assert decode_image(data).pixels.shape == (512, 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= bound - OVERHEAD_BYTES < 64 * MIB


def test_deflate_bomb_is_refused_before_pydicom_inflates_it() -> None:
    """A Deflated DICOM declaring a 512 x 512 image whose dataset inflates to 64 MiB more (trailing padding) is
    refused while it is counted, a piece at a time, and its bound stays that of the image it declares."""
    ds = pydicom.dcmread(io.BytesIO(pydicom_test_bytes("image_dfl.dcm")))
    ds.DataSetTrailingPadding = bytes(64 * MIB)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    bomb = buffer.getvalue()
    assert len(bomb) < MIB
    assert decode_memory_bytes(bomb) < decode_memory_bytes(pydicom_test_bytes("image_dfl.dcm")) + 4 * MIB
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImageError, match="inflates to more than"):
            decode_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * MIB


# --- the pixels are unchanged -------------------------------------------------------------------------------------


def _real_files() -> dict[str, Callable[[], bytes]]:
    return {
        "RG1_UNCR.dcm": lambda: pydicom_data_bytes("RG1_UNCR.dcm"),
        "RG1_J2KI.dcm": lambda: pydicom_data_bytes("RG1_J2KI.dcm"),
        "RG3_UNCR.dcm": lambda: pydicom_data_bytes("RG3_UNCR.dcm"),
        "SC_rgb_rle.dcm": lambda: pydicom_test_bytes("SC_rgb_rle.dcm"),
        "SC_ybr_full_422_uncompressed.dcm": lambda: pydicom_test_bytes("SC_ybr_full_422_uncompressed.dcm"),
        "siim": lambda: shared_bytes("originals/siim-chest-cr-jpeg-baseline.dcm"),
        "nih-png": lambda: shared_bytes("originals/00000075_000.png"),
        "nih-rgba-png": lambda: shared_bytes("originals/00005813_000.png"),
    }


@pytest.mark.parametrize("name", sorted(_real_files()))
def test_block_size_does_not_change_a_single_pixel(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float arithmetic runs a block of rows at a time; one block the size of the image is the whole-array
    arithmetic of before, and blocks of a row or less must give the same bits."""
    data = _real_files()[name]()
    default = decode_image(data)
    for block_pixels in (1, 2**62):
        monkeypatch.setattr(decoded, "BLOCK_PIXELS", block_pixels)
        other = decode_image(data)
        assert np.array_equal(other.pixels, default.pixels), (name, block_pixels)
        assert other.warnings == default.warnings


def test_windowed_dicom_matches_the_whole_array_float64_transform() -> None:
    """NEMA's chest CR: modality LUT, window, full output range, MONOCHROME1 inverted, in float64 on the whole
    array, as decode_image computed it before it worked a block at a time."""
    data = pydicom_data_bytes("RG1_UNCR.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    windowed = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds, 0)
    full_scale = float(2**ds.BitsStored - 1)
    expected = np.clip(1.0 - np.asarray(windowed, dtype=np.float64) / full_scale, 0.0, 1.0).astype(np.float32)
    np.testing.assert_allclose(decode_image(data).pixels, expected, rtol=0, atol=1e-6)


def test_sixteen_bit_and_colour_png_match_the_whole_array_arithmetic(film: np.ndarray) -> None:
    np.testing.assert_allclose(
        decode_image(bench.png_bytes(film)).pixels, film.astype(np.float32) / np.float32(65535), rtol=0, atol=1e-6
    )
    rgb = bench.rgb_film(film).astype(np.float64)
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    image = decode_image(bench.png_bytes(bench.rgb_film(film)))
    np.testing.assert_allclose(image.pixels, (luminance / 255.0).astype(np.float32), rtol=0, atol=1e-6)
    assert image.warnings == ("colour image converted to grayscale",)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_exif_orientation_of_a_jpeg_gives_pillows_pixels(film: np.ndarray, orientation: int, mode: str) -> None:
    """Strict-decoded JPEG samples are turned upright as numpy views: the same pixels as Pillow's transposition."""
    samples = bench.rgb_film(film[:300, :200].copy()) if mode == "RGB" else (film[:300, :200] >> 4).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format="JPEG", quality=90, exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened))
    if mode == "L":
        expected = upright.astype(np.float32) / np.float32(255)
    else:
        rgb = upright.astype(np.float64)
        expected = ((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0).astype(np.float32)
    assert np.array_equal(decode_image(buffer.getvalue()).pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "P"])
def test_exif_orientation_of_a_png_gives_pillows_pixels(
    film: np.ndarray, orientation: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow images are read upright a strip of stored rows or columns at a time (several strips here): the same
    pixels as Pillow's transposition of the whole image, converted."""
    monkeypatch.setattr(decoded, "BLOCK_PIXELS", 5000)
    crop = np.ascontiguousarray(film[:300, :200])
    stored = {
        "L": Image.fromarray((crop >> 4).astype(np.uint8)),
        "I;16": Image.fromarray(crop),
        "RGB": Image.fromarray(bench.rgb_film(crop)),
        "P": Image.fromarray(bench.rgb_film(crop)).quantize(16),
    }[mode]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        upright = ImageOps.exif_transpose(opened)
        if mode == "P":
            upright = upright.convert("RGB")
        samples = np.asarray(upright)
    if mode in ("L", "I;16"):
        expected = samples.astype(np.float32) / np.float32(255 if mode == "L" else 65535)
    else:
        rgb = samples.astype(np.float64)
        expected = ((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0).astype(np.float32)
    image = decode_image(buffer.getvalue())
    assert np.array_equal(image.pixels, expected)
    assert ("EXIF orientation" in " ".join(image.warnings)) == (orientation != 1)


# --- frames that declare another size -----------------------------------------------------------------------------


def test_jpeg_frame_declaring_a_larger_image_is_refused_before_it_is_decoded() -> None:
    """A DICOM's JPEG frame is decoded to the size its own header declares: a small frame declaring a gigantic
    image would be a decompression bomb behind the DICOM header's pixel count."""
    ds = pydicom.dcmread(io.BytesIO(shared_bytes("originals/siim-chest-cr-jpeg-baseline.dcm")))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.find(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = (30_000).to_bytes(2, "big") * 2  # height and width
    ds.PixelData = encapsulate([bytes(frame)])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImageError, match="declares 30000 x 30000"):
            decode_image(buffer.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB


def test_jpeg2000_frame_declaring_another_size_is_refused() -> None:
    ds = pydicom.dcmread(io.BytesIO(pydicom_data_bytes("RG1_J2KI.dcm")))
    ds.Rows = ds.Rows // 2
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(CorruptImageError, match="JPEG 2000 pixel data in the DICOM file declares"):
        decode_image(buffer.getvalue())


def test_rle_frame_that_panics_the_rust_decoder_is_a_corrupt_image(film: np.ndarray) -> None:
    """pylibjpeg-rle panics (pyo3's PanicException, a BaseException) on a segment that runs past the image;
    decode_image's contract still holds: any bytes give a result or an ImageError."""
    ds = pydicom.dcmread(io.BytesIO(bench.dicom_bytes(np.ascontiguousarray(film[:16, :16]), "rle")))
    overflowing = bytes([0x81, 0x00]) * 3  # three runs of 128 bytes, for a 256-byte segment
    literal = (bytes([0x7F]) + bytes(128)) * 2
    header = struct.pack("<16I", 2, 64, 64 + len(overflowing), *([0] * 13))
    ds.PixelData = encapsulate([header + overflowing + literal])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(CorruptImageError, match="PanicException"):
        decode_image(buffer.getvalue())


# --- reduced-size decoding for previews ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg(film: np.ndarray) -> bytes:
    """A 1500 x 1000 gray JPEG (portrait)."""
    return bench.jpeg_bytes(np.ascontiguousarray(film[:, :1000]))


def test_jpeg_is_decoded_at_the_smallest_scale_still_at_least_max_side(large_jpeg: bytes) -> None:
    full = decode_image(large_jpeg)
    reduced = decode_image(large_jpeg, max_side=500)
    assert (full.height, full.width) == (1500, 1000)
    assert (reduced.height, reduced.width) == (563, 375)  # 3/8 of the size: 3/8 * 1500 >= 500 > 1/4 * 1500
    assert reduced.pixels.dtype == np.float32 and reduced.warnings == full.warnings
    # The same picture: close to the full decode resampled to the same size.
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(full.pixels)[None, None], size=(563, 375), mode="bilinear", antialias=True
    )[0, 0].numpy()
    assert float(np.abs(reduced.pixels - resized).mean()) < 0.01


def test_jpeg_less_than_twice_max_side_is_decoded_at_full_size(large_jpeg: bytes) -> None:
    assert np.array_equal(decode_image(large_jpeg, max_side=751).pixels, decode_image(large_jpeg).pixels)


def test_reduced_jpeg_keeps_its_exif_orientation(film: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored landscape, shown portrait
    buffer = io.BytesIO()
    Image.fromarray((film[:1000, :] >> 4).astype(np.uint8)).save(buffer, format="JPEG", quality=90, exif=exif)
    image = decode_image(buffer.getvalue(), max_side=500)
    assert (image.height, image.width) == (563, 375)


@pytest.mark.parametrize("case", ["png16", "dicom-native", "dicom-jpeg"])
def test_other_formats_ignore_max_side(film: np.ndarray, case: str) -> None:
    data = BUILDERS[case](film)
    assert np.array_equal(decode_image(data, max_side=256).pixels, decode_image(data).pixels)


@pytest.mark.parametrize("max_side", [0, -1, True, 1.5])
def test_max_side_must_be_a_positive_integer(large_jpeg: bytes, max_side: object) -> None:
    with pytest.raises(ValueError, match="max_side"):
        decode_image(large_jpeg, max_side=max_side)  # type: ignore[arg-type]
