"""Tests of :mod:`bayesnet.imaging`: real radiographs in, display-ready pixels or a specific error out.

Real files come from ``../shared/data`` (NIH PNGs, a SIIM JPEG-baseline DICOM) and from the
``pydicom-data`` package (NEMA's chest CR in MONOCHROME1, its JPEG 2000 twin, a tibia CR, CT/MR/US).
Format edge cases are built here with Pillow, numpy and pydicom in their real formats; nothing is
mocked. Tests that need a data source skip with the reason when it is missing.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, features
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from bayesnet.errors import (
    CorruptImageError,
    DicomNoPixelDataError,
    EmptyImageError,
    ImageError,
    MultiFrameDicomError,
    NotAnImageError,
    NotRadiographError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from bayesnet.imaging import (
    DEFAULT_MAX_PIXELS,
    WARN_ALPHA,
    WARN_COLOUR,
    WARN_MONOCHROME1,
    WARN_NO_VOI,
    DecodedImage,
    ImageFacts,
    decode_image,
    sniff_format,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


# --- data sources ---------------------------------------------------------------------------------


def shared_bytes(relative: str) -> bytes:
    """Bytes of a file under ../shared/data, or skip (a user's clone has no ../shared)."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real test data {path} is absent (../shared/data ships only with the dev setup)")
    return path.read_bytes()


def pydicom_data_path(name: str) -> Path:
    """Path of a NEMA test file shipped by the ``pydicom-data`` package (module ``data_store``)."""
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    try:
        return Path(data_store.DataStore().get_path(name))
    except ValueError:
        pytest.skip(f"{name} is not in this pydicom-data version")


def pydicom_data_bytes(name: str) -> bytes:
    return pydicom_data_path(name).read_bytes()


def read_dataset(name: str) -> Dataset:
    """A pydicom-data file as an editable dataset."""
    return pydicom.dcmread(pydicom_data_path(name))


def dicom_bytes(ds: Dataset) -> bytes:
    """Serialise an (edited) dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def assert_display_ready(image: DecodedImage) -> None:
    """The contract every consumer relies on."""
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.height, image.width)
    assert np.isfinite(image.pixels).all()
    assert float(image.pixels.min()) >= 0.0
    assert float(image.pixels.max()) <= 1.0


# --- sniffing and refusals ------------------------------------------------------------------------


def test_sniff_format_reads_magic_bytes_not_names() -> None:
    assert sniff_format(shared_bytes("originals/00000075_000.png")) == "png"
    assert sniff_format(shared_bytes("originals/siim-chest-cr-jpeg-baseline.dcm")) == "dicom"
    assert sniff_format(jpeg_bytes(Image.new("L", (8, 8)))) == "jpeg"
    assert sniff_format(b"hello.png") is None
    assert sniff_format(b"") is None


def test_empty_upload_is_refused() -> None:
    with pytest.raises(EmptyImageError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize(
    "payload",
    [
        b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        b"Patient chest film, see attached\n" * 4,
        bytes(range(7, 200)),
    ],
    ids=["html", "text", "binary"],
)
def test_unknown_content_is_not_an_image(payload: bytes) -> None:
    with pytest.raises(NotAnImageError, match="PNG, JPEG or DICOM"):
        decode_image(payload)


def _other_formats() -> Iterator[tuple[str, Callable[[], bytes]]]:
    gray = Image.linear_gradient("L").resize((32, 32))

    def saved(fmt: str) -> Callable[[], bytes]:
        def build() -> bytes:
            buffer = io.BytesIO()
            gray.save(buffer, fmt)
            return buffer.getvalue()

        return build

    def zipped() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("xray.png", png_bytes(gray))
        return buffer.getvalue()

    yield "GIF", saved("GIF")
    yield "TIFF", saved("TIFF")
    yield "BMP", saved("BMP")
    yield "PDF", saved("PDF")
    if features.check("webp"):
        yield "WebP", saved("WEBP")
    yield "ZIP", zipped
    yield "gzip", lambda: gzip.compress(png_bytes(gray))


@pytest.mark.parametrize(("name", "build"), list(_other_formats()), ids=lambda v: v if isinstance(v, str) else "")
def test_other_image_formats_are_named_and_refused(name: str, build: Callable[[], bytes]) -> None:
    with pytest.raises(UnsupportedFormatError) as caught:
        decode_image(build())
    assert name in str(caught.value)
    assert "PNG, JPEG or DICOM" in str(caught.value)


def test_jpeg2000_and_jpeg_ls_codestreams_are_refused() -> None:
    # Real codestreams: the first frame of NEMA's JPEG 2000 chest CR and of a JPEG-LS MR series.
    j2k = next(generate_frames(read_dataset("RG1_J2KI.dcm").PixelData, number_of_frames=1))
    with pytest.raises(UnsupportedFormatError, match="JPEG 2000"):
        decode_image(j2k)
    jls_ds = read_dataset("emri_small_jpeg_ls_lossless.dcm")
    jls = next(generate_frames(jls_ds.PixelData, number_of_frames=int(jls_ds.NumberOfFrames)))
    with pytest.raises(UnsupportedFormatError, match="JPEG-LS"):
        decode_image(jls)


def test_twelve_bit_jpeg_is_refused_from_its_frame_header() -> None:
    # SOI, SOF1 with 12-bit precision, 64 x 64, one component; then SOS. Pillow cannot read it.
    sof = b"\xff\xc1" + struct.pack(">HBHHB", 11, 12, 64, 64, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    with pytest.raises(UnsupportedFormatError, match="12-bit"):
        decode_image(b"\xff\xd8" + sof + sos + b"\x00" * 64 + b"\xff\xd9")


def test_dicom_without_part10_header_is_refused() -> None:
    # A real NEMA file written as a bare dataset: no preamble, no 'DICM'.
    with pytest.raises(UnsupportedFormatError, match="Part 10"):
        decode_image(pydicom_data_bytes("OT-PAL-8-face.dcm"))


# --- PNG ------------------------------------------------------------------------------------------


def test_nih_png_is_8bit_gray_divided_by_255() -> None:
    data = shared_bytes("originals/00000075_000.png")
    image = decode_image(data)
    assert_display_ready(image)
    assert (image.format, image.width, image.height) == ("png", 1024, 1024)
    assert (image.bit_depth, image.photometric, image.warnings) == (8, "L", ())
    assert (image.modality, image.body_part, image.view_position) == (None, None, None)
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference, dtype=np.float32) / 255.0
    np.testing.assert_array_equal(image.pixels, expected)


def test_rgba_nih_png_gives_its_gray_channel_and_notes_alpha() -> None:
    data = shared_bytes("originals/00005813_000.png")
    image = decode_image(data)
    assert_display_ready(image)
    assert image.photometric == "RGBA"
    assert image.warnings == (WARN_ALPHA,)  # R=G=B: nothing lost, so no colour warning
    with Image.open(io.BytesIO(data)) as reference:
        red = np.asarray(reference, dtype=np.float32)[..., 0] / 255.0
    np.testing.assert_array_equal(image.pixels, red)


def test_sixteen_bit_png_spans_zero_to_one() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    image = decode_image(png_bytes(Image.fromarray(ramp)))
    assert (image.photometric, image.bit_depth) == ("I;16", 16)
    assert (image.pixels[0, 0], image.pixels[-1, -1]) == (0.0, 1.0)
    np.testing.assert_allclose(image.pixels, ramp / 65535.0, atol=1e-7)


def test_colour_png_is_reduced_by_luminance() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = decode_image(png_bytes(Image.fromarray(rgb)))
    assert image.photometric == "RGB"
    assert WARN_COLOUR in image.warnings
    np.testing.assert_allclose(image.pixels, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, rtol=1e-6)


def test_palette_png_is_converted_through_its_palette() -> None:
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 255, 255, 255])
    palette_image.putdata([0, 1, 2])
    image = decode_image(png_bytes(palette_image))
    assert image.photometric == "P"
    assert WARN_COLOUR in image.warnings
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.299, 1.0], atol=1e-6)


def test_gray_palette_png_needs_no_colour_warning() -> None:
    palette_image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P")
    image = decode_image(png_bytes(palette_image))
    assert image.photometric == "P"
    assert image.warnings == ()


def test_la_png_ignores_alpha() -> None:
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    la = Image.merge("LA", [Image.fromarray(gray), Image.new("L", (4, 4), 7)])
    image = decode_image(png_bytes(la))
    assert image.photometric == "LA"
    assert image.warnings == (WARN_ALPHA,)
    np.testing.assert_allclose(image.pixels, gray / 255.0, atol=1e-7)


def test_bilevel_png_maps_to_zero_and_one() -> None:
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)).convert("1")
    image = decode_image(png_bytes(bits))
    assert (image.photometric, image.bit_depth) == ("1", 1)
    np.testing.assert_array_equal(image.pixels, [[0.0, 1.0, 0.0, 1.0]])


def test_one_pixel_png() -> None:
    image = decode_image(png_bytes(Image.new("L", (1, 1), 128)))
    assert (image.width, image.height) == (1, 1)
    assert image.pixels[0, 0] == pytest.approx(128 / 255)


def test_png_bomb_is_refused_from_its_header_without_allocating() -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )
    tracemalloc.start()
    try:
        with pytest.raises(TooManyPixelsError, match="100000 x 100000") as caught:
            decode_image(bomb)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 1_000_000
    assert f"{DEFAULT_MAX_PIXELS:,}" in str(caught.value)


def test_pixel_limit_is_configurable() -> None:
    data = shared_bytes("originals/00000075_000.png")
    with pytest.raises(TooManyPixelsError, match="1024 x 1024"):
        decode_image(data, max_pixels=1024 * 1024 - 1)
    assert decode_image(data, max_pixels=1024 * 1024).width == 1024
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(data, max_pixels=0)


@pytest.mark.parametrize("keep_fraction", [0.05, 0.5, 0.95])
def test_truncated_png_is_reported_as_truncated(keep_fraction: float) -> None:
    data = shared_bytes("originals/00000129_000.png")
    # Found by the chunk walk before any decoder runs (bayesnet.imaging.integrity), so nothing is chained.
    with pytest.raises(TruncatedImageError, match="truncated: it ends inside its IDAT chunk"):
        decode_image(data[: int(len(data) * keep_fraction)])


def test_png_with_bad_header_checksum_is_corrupt() -> None:
    data = bytearray(shared_bytes("originals/00000129_000.png"))
    data[20] ^= 0x01  # a bit of the declared height
    with pytest.raises(CorruptImageError, match="checksum"):
        decode_image(bytes(data))


# --- JPEG -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_jpeg() -> bytes:
    """A real radiograph (NIH PNG) re-encoded as an ordinary 8-bit baseline JPEG."""
    with Image.open(io.BytesIO(shared_bytes("nih-cxr14-sample/images/00000211_000.png"))) as png:
        return jpeg_bytes(png.convert("L"), quality=90)


def test_gray_jpeg_decodes(nih_jpeg: bytes) -> None:
    image = decode_image(nih_jpeg)
    assert_display_ready(image)
    assert (image.format, image.photometric, image.bit_depth, image.warnings) == (
        "jpeg",
        "L",
        8,
        (),
    )
    with Image.open(io.BytesIO(nih_jpeg)) as reference:
        np.testing.assert_array_equal(image.pixels, np.asarray(reference, dtype=np.float32) / 255.0)


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9])
def test_truncated_jpeg_is_reported_as_truncated(nih_jpeg: bytes, keep_fraction: float) -> None:
    with pytest.raises(TruncatedImageError):
        decode_image(nih_jpeg[: int(len(nih_jpeg) * keep_fraction)])


def test_jpeg_exif_orientation_is_applied() -> None:
    stored = np.zeros((20, 40), dtype=np.uint8)  # 40 wide, 20 high
    stored[:10, :10] = 255  # bright block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = decode_image(jpeg_bytes(Image.fromarray(stored), exif=exif.tobytes(), quality=95))
    assert (image.width, image.height) == (20, 40)
    assert "EXIF orientation 6 applied" in image.warnings
    assert image.pixels[:10, -10:].mean() > 0.9  # now top-right
    assert image.pixels[:10, :10].mean() < 0.1


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 0, 0, 255), (0, 0, 8, 8))  # full black ink on the left half
    image = decode_image(jpeg_bytes(cmyk, quality=100))
    assert image.photometric == "CMYK"
    assert image.pixels[:, :6].mean() < 0.05
    assert image.pixels[:, 10:].mean() > 0.95


def test_jpeg_bomb_is_refused_from_its_frame_header(nih_jpeg: bytes) -> None:
    data = bytearray(nih_jpeg)
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 50_000, 60_000)  # height, width
    with pytest.raises(TooManyPixelsError, match="60000 x 50000"):
        decode_image(bytes(data))


# --- DICOM ----------------------------------------------------------------------------------------


def test_siim_jpeg_baseline_chest_cr() -> None:
    data = shared_bytes("originals/siim-chest-cr-jpeg-baseline.dcm")
    image = decode_image(data)
    assert_display_ready(image)
    assert (image.format, image.width, image.height, image.bit_depth) == ("dicom", 1024, 1024, 8)
    assert (image.photometric, image.modality, image.body_part, image.view_position) == (
        "MONOCHROME2",
        "CR",
        "CHEST",
        "PA",
    )
    assert image.warnings == (WARN_NO_VOI,)
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array
    np.testing.assert_allclose(image.pixels, stored / 255.0, atol=1e-7)


@pytest.fixture(scope="module")
def rg1() -> DecodedImage:
    """NEMA's adult PA chest CR: MONOCHROME1, 15 bits stored, window 15000/30000."""
    return decode_image(pydicom_data_bytes("RG1_UNCR.dcm"))


def test_monochrome1_chest_is_inverted_so_lungs_are_dark(rg1: DecodedImage) -> None:
    assert_display_ready(rg1)
    assert (rg1.photometric, rg1.bit_depth, rg1.modality, rg1.body_part) == (
        "MONOCHROME1",
        15,
        "CR",
        "CHEST",
    )
    assert WARN_MONOCHROME1 in rg1.warnings
    h, w = rg1.pixels.shape
    rows = slice(int(0.25 * h), int(0.45 * h))
    mediastinum = rg1.pixels[rows, int(0.46 * w) : int(0.54 * w)].mean()
    right_lung = rg1.pixels[rows, int(0.20 * w) : int(0.33 * w)].mean()
    left_lung = rg1.pixels[rows, int(0.64 * w) : int(0.78 * w)].mean()
    assert mediastinum > right_lung + 0.1
    assert mediastinum > left_lung + 0.1


def test_window_maps_the_full_15bit_range_not_the_image_extremes(rg1: DecodedImage) -> None:
    stored = pydicom.dcmread(pydicom_data_path("RG1_UNCR.dcm")).pixel_array.astype(np.float64)
    # DICOM PS3.3 C.11.2.1.2.1 linear window (center 15000, width 30000) onto [0, 2**15 - 1],
    # divided by that range, then inverted for MONOCHROME1.
    center, width = 15000 - 0.5, 30000 - 1
    windowed = np.clip((stored - center) / width + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(rg1.pixels, 1.0 - windowed, atol=1e-6)
    # Real 16-bit precision (not 8 bits), and not stretched to this image's own min/max.
    assert len(np.unique(rg1.pixels)) > 5000
    assert 0.05 < rg1.pixels.min() < 0.2
    assert 0.9 < rg1.pixels.max() < 0.99


def test_jpeg2000_chest_matches_uncompressed(rg1: DecodedImage) -> None:
    j2k = decode_image(pydicom_data_bytes("RG1_J2KI.dcm"))
    assert j2k.pixels.shape == rg1.pixels.shape
    assert float(np.abs(j2k.pixels - rg1.pixels).mean()) < 0.005


def test_facts_are_the_decoded_image_without_its_pixels() -> None:
    image = decode_image(pydicom_data_bytes("RG3_UNCR.dcm"))  # a non-chest film: every DICOM field and a flag set
    facts = image.facts
    assert isinstance(facts, ImageFacts)
    assert not hasattr(facts, "pixels")
    assert facts == ImageFacts(
        format="dicom",
        width=image.width,
        height=image.height,
        bit_depth=10,
        photometric="MONOCHROME1",
        warnings=image.warnings,
        modality="CR",
        body_part="EXTREMITY",
        view_position="AP",
        population_flags=image.population_flags,
        population_verified=image.population_verified,
    )
    assert facts.population_flags  # a tibia is outside the chest population: the flag survives the pixels


def test_facts_declare_every_field_of_the_decoded_image_but_its_pixels() -> None:
    # The two classes spell out the same fields; a field added to one only would silently drop out of .facts.
    decoded = [(f.name, f.type, f.default) for f in dataclasses.fields(DecodedImage) if f.name != "pixels"]
    facts = [(f.name, f.type, f.default) for f in dataclasses.fields(ImageFacts)]
    assert decoded == facts


def test_tibia_cr_decodes_with_its_body_part() -> None:
    image = decode_image(pydicom_data_bytes("RG3_UNCR.dcm"))
    assert_display_ready(image)
    assert (image.modality, image.body_part, image.view_position, image.bit_depth) == (
        "CR",
        "EXTREMITY",
        "AP",
        10,
    )


@pytest.mark.parametrize(("name", "modality"), [("MR2_UNCR.dcm", "MR"), ("693_UNCR.dcm", "CT"), ("US1_UNCR.dcm", "US")])
def test_cross_sectional_and_ultrasound_dicoms_are_not_radiographs(name: str, modality: str) -> None:
    with pytest.raises(NotRadiographError, match=modality):
        decode_image(pydicom_data_bytes(name))


def test_without_a_window_the_full_stored_range_is_used_through_the_rescale() -> None:
    ds = read_dataset("RG3_UNCR.dcm")  # 10 bits stored, MONOCHROME1
    stored = ds.pixel_array.astype(np.float64)
    del ds.WindowCenter, ds.WindowWidth
    plain = decode_image(dicom_bytes(ds))
    assert WARN_NO_VOI in plain.warnings
    np.testing.assert_allclose(plain.pixels, 1.0 - stored / 1023.0, atol=1e-6)
    # A negative rescale slope reverses the modality values; the range [0, 1023] follows it.
    ds.RescaleSlope, ds.RescaleIntercept = "-1", "1023"
    reversed_values = decode_image(dicom_bytes(ds))
    np.testing.assert_allclose(reversed_values.pixels, stored / 1023.0, atol=1e-6)


@pytest.mark.parametrize(
    ("modality", "note"), [("DX", None), ("DR", "treated as DX"), ("OT", "OT"), (None, "no Modality")]
)
def test_radiography_modalities_are_accepted(modality: str | None, note: str | None) -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    image = decode_image(dicom_bytes(ds))
    assert image.modality == modality
    if note is not None:
        assert any(note in warning for warning in image.warnings)


def test_mammogram_is_not_a_chest_radiograph() -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    ds.Modality = "MG"
    with pytest.raises(NotRadiographError, match="mammography"):
        decode_image(dicom_bytes(ds))


def test_multiframe_dicom_is_refused() -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(MultiFrameDicomError, match="2 frames"):
        decode_image(dicom_bytes(ds))


def test_dicom_without_pixel_data_is_refused() -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    del ds.PixelData
    with pytest.raises(DicomNoPixelDataError, match="no Pixel Data"):
        decode_image(dicom_bytes(ds))


def test_dicom_with_short_pixel_data_is_truncated() -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(CorruptImageError) as caught:
        decode_image(dicom_bytes(ds))
    assert isinstance(caught.value, TruncatedImageError)


def test_truncated_compressed_dicom_is_truncated() -> None:
    data = shared_bytes("originals/siim-chest-cr-jpeg-baseline.dcm")
    # pydicom warns about the missing end of the compressed pixel data, then drops the element.
    with (
        pytest.warns(UserWarning, match="End of file reached before delimiter"),
        pytest.raises(TruncatedImageError, match="truncated"),
    ):
        decode_image(data[: len(data) // 2])


def test_dicom_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(TooManyPixelsError, match="1760 x 1760"):
        decode_image(pydicom_data_bytes("RG3_UNCR.dcm"), max_pixels=1_000_000)


def test_colour_dicom_is_converted_with_a_warning() -> None:
    image = decode_image(pydicom_data_bytes("SC_rgb.dcm"))
    assert_display_ready(image)
    assert (image.photometric, image.modality) == ("RGB", "OT")
    assert any(w.startswith(WARN_COLOUR) for w in image.warnings)


def test_voi_lut_output_is_scaled_by_its_declared_depth() -> None:
    ds = read_dataset("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [256, 0, 16]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    image = decode_image(pydicom_data_bytes("vlut_04.dcm"))
    np.testing.assert_allclose(image.pixels, lut[ds.pixel_array] / 65535.0, atol=1e-7)
    assert WARN_NO_VOI not in image.warnings


def test_patient_identifiers_never_reach_results_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = read_dataset("RG3_UNCR.dcm")
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-8675309"
    ds.AccessionNumber = "ACC-424242"
    ds.StudyDate = "19990909"
    secrets = ("Doe", "Jane", "8675309", "424242", "19990909")
    with caplog.at_level(logging.DEBUG):
        image = decode_image(dicom_bytes(ds))
        ds.Modality = "CT"
        with pytest.raises(NotRadiographError) as caught:
            decode_image(dicom_bytes(ds))
    texts = [repr(image), str(image.warnings), str(caught.value), caplog.text]
    for secret in secrets:
        assert not any(secret in text for text in texts), secret


# --- hostile input --------------------------------------------------------------------------------


def _small_native_cr() -> bytes:
    """A 96 x 96 crop of NEMA's chest CR, still MONOCHROME1 with its window, written uncompressed."""
    ds = read_dataset("RG1_UNCR.dcm")
    crop = np.ascontiguousarray(ds.pixel_array[800:896, 700:796])
    ds.Rows, ds.Columns = crop.shape
    ds.PixelData = crop.tobytes()
    return dicom_bytes(ds)


def _mutants(seed: bytes, rng: np.random.Generator, count: int) -> Iterator[bytes]:
    """Bit flips (anywhere and in the header), truncations and overwritten runs of ``seed``."""
    for i in range(count):
        data = bytearray(seed)
        kind = i % 4
        if kind in (0, 1):
            span = len(data) if kind == 0 else min(len(data), 1024)
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(span))] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            del data[int(rng.integers(1, len(data))) :]
        else:
            start = int(rng.integers(len(data)))
            run = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            data[start : start + len(run)] = run
        yield bytes(data)


def _fuzz_seeds() -> dict[str, bytes]:
    """Real radiographs in each accepted format, to be mutated.

    NEMA's chest CR as PNG, JPEG and native DICOM (pydicom-data), plus the SIIM JPEG-baseline DICOM
    when ../shared is present, so the test also runs in a user's clone.
    """
    display = decode_image(pydicom_data_bytes("RG1_UNCR.dcm")).pixels
    radiograph = Image.fromarray((display * 255).round().astype(np.uint8)).resize((192, 204))
    seeds = {
        "png": png_bytes(radiograph),
        "jpeg": jpeg_bytes(radiograph, quality=90),
        "dicom-native": _small_native_cr(),
    }
    siim = SHARED_DATA / "originals" / "siim-chest-cr-jpeg-baseline.dcm"
    if siim.is_file():
        seeds["dicom-jpeg"] = siim.read_bytes()
    return seeds


def test_random_mutations_only_ever_return_or_raise_image_error() -> None:
    seeds = _fuzz_seeds()
    rng = np.random.default_rng(20240607)
    outcomes: dict[str, int] = {}
    for seed in seeds.values():
        for mutant in _mutants(seed, rng, count=100):
            try:
                image = decode_image(mutant)
            except ImageError as err:
                outcomes[type(err).__name__] = outcomes.get(type(err).__name__, 0) + 1
            else:
                assert_display_ready(image)
                outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    assert sum(outcomes.values()) == 100 * len(seeds)
    assert outcomes.get("decoded", 0) > 0, outcomes
    assert outcomes.get("TruncatedImageError", 0) > 0, outcomes
