"""Truncated or damaged films are refused with a message that says what is wrong; whole films still decode.

Every cut is made from a real film and measured in its *pixel data* (a JPEG's scan data, a PNG's IDAT data, a
DICOM's Pixel Data or its compressed frame), not in the file, so 10% really leaves 90% of the image missing.
Before ``bayesnet.imaging.integrity``, a JPEG cut this way with its end-of-image marker appended decoded, its
missing rows filled with grey by libjpeg, and so did a DICOM's JPEG frame cut short. Real films come from
``../shared/data`` and the ``pydicom-data`` package; each test skips with the reason when its source is missing.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from bayesnet.errors import CorruptImageError, TruncatedImageError
from bayesnet.imaging import decode_image

FRACTIONS = (0.1, 0.5, 0.9)
NIH_FILM = "nih-cxr14-sample/images/00000211_000.png"
SIIM_DICOM = "originals/siim-chest-cr-jpeg-baseline.dcm"

SEND_COMPLETE = "(the file is truncated or damaged); send the complete file."
JPEG_ENDS_EARLY = f"The JPEG's compressed data ends before the last row of the image {SEND_COMPLETE}"
PNG_STREAM_ENDS_EARLY = f"The PNG's compressed image data (IDAT) ends before the last row of the image {SEND_COMPLETE}"
DICOM_JPEG_ENDS_EARLY = f"The JPEG pixel data in the DICOM file ends before the last row of the image {SEND_COMPLETE}"
DICOM_J2K_ENDS_EARLY = f"The JPEG 2000 pixel data in the DICOM file ends before its last tile {SEND_COMPLETE}"


# --- real films -----------------------------------------------------------------------------------------------


def pydicom_data_path(name: str) -> Path:
    """A NEMA test file from the ``pydicom-data`` package, or skip when the package is absent."""
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    return Path(data_store.DataStore().get_path(name))


def jpeg_of(image: Image.Image, *, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def film_png(shared_data: Path) -> bytes:
    """A real 512 px NIH radiograph, 8-bit gray PNG."""
    return (shared_data / NIH_FILM).read_bytes()


@pytest.fixture(scope="module", params=[False, True], ids=["baseline", "progressive"])
def film_jpeg(request: pytest.FixtureRequest, film_png: bytes) -> bytes:
    """The same film as a quality-90 JPEG, baseline and progressive."""
    with Image.open(io.BytesIO(film_png)) as film:
        return jpeg_of(film.convert("L"), progressive=request.param)


@pytest.fixture(scope="module")
def siim_dicom(shared_data: Path) -> Path:
    """A real chest CR, 1024 px, JPEG Baseline transfer syntax."""
    return shared_data / SIIM_DICOM


# --- cutting a file in its pixel data -------------------------------------------------------------------------


def jpeg_scan_span(data: bytes) -> tuple[int, int]:
    """``(start, end)`` of a JPEG's scan data: from the end of the first SOS segment to the final EOI marker."""
    pos = 2
    while data[pos + 1] != 0xDA:  # every marker before the first SOS has a length
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    (sos_length,) = struct.unpack_from(">H", data, pos + 2)
    return pos + 2 + sos_length, data.rindex(b"\xff\xd9")


def cut_jpeg(data: bytes, fraction: float, *, eoi: bool) -> bytes:
    """``data`` with only ``fraction`` of its scan data, then an EOI marker when ``eoi`` (as a careless tool adds)."""
    start, end = jpeg_scan_span(data)
    return data[: start + int((end - start) * fraction)] + (b"\xff\xd9" if eoi else b"")


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """``(offset, type, payload)`` of each chunk of a whole PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        chunks.append((pos, chunk_type, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def idat_offset(data: bytes, fraction: float) -> int:
    """File offset of the byte at ``fraction`` of a PNG's IDAT data (its chunks' payloads, in order)."""
    idats = [(pos, payload) for pos, chunk_type, payload in png_chunks(data) if chunk_type == b"IDAT"]
    target = int(sum(len(payload) for _, payload in idats) * fraction)
    for pos, payload in idats:
        if target < len(payload):
            return pos + 8 + target
        target -= len(payload)
    raise AssertionError("fraction beyond the IDAT data")


def cut_png_file(data: bytes, fraction: float) -> bytes:
    """The file cut at ``fraction`` of its IDAT data: no IEND, the last chunk shorter than it declares."""
    return data[: idat_offset(data, fraction)]


def cut_png_stream(data: bytes, fraction: float) -> bytes:
    """A well-formed PNG whose zlib stream holds only ``fraction`` of the film's: one valid IDAT chunk, then IEND."""
    chunks = png_chunks(data)
    stream = b"".join(payload for _, chunk_type, payload in chunks if chunk_type == b"IDAT")
    head = b"".join(png_chunk(t, p) for _, t, p in chunks if t not in {b"IDAT", b"IEND"})
    return data[:8] + head + png_chunk(b"IDAT", stream[: int(len(stream) * fraction)]) + png_chunk(b"IEND", b"")


def damage_png_idat(data: bytes, fraction: float) -> bytes:
    """One byte of IDAT data changed (the chunk's CRC-32 no longer matches), as a bad disk or transfer leaves it."""
    damaged = bytearray(data)
    damaged[idat_offset(data, fraction)] ^= 0x5A
    return bytes(damaged)


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def cut_dicom_pixel_data(path: Path, fraction: float) -> bytes:
    """An uncompressed DICOM whose Pixel Data element holds ``fraction`` of its bytes (its length says so too)."""
    ds = pydicom.dcmread(path)
    keep = int(len(ds.PixelData) * fraction) // 2 * 2
    ds.PixelData = ds.PixelData[:keep]
    return dicom_bytes(ds)


def cut_dicom_file(path: Path, fraction: float) -> bytes:
    """An uncompressed DICOM file cut at ``fraction`` of its pixel data (the element's length still says whole)."""
    data = path.read_bytes()
    pixel_bytes = len(pydicom.dcmread(path).PixelData)
    return data[: len(data) - pixel_bytes + int(pixel_bytes * fraction)]


def cut_dicom_frame(path: Path, fraction: float, *, end_marker: bool) -> bytes:
    """A compressed DICOM whose one frame keeps ``fraction`` of its data, encapsulated properly again.

    A JPEG frame is cut in its scan data, a JPEG 2000 codestream in its bytes; ``end_marker`` appends FFD9 (EOI,
    or EOC for JPEG 2000), as a tool that "repairs" a cut stream does.
    """
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if frame.startswith(b"\xff\xd8"):
        cut = cut_jpeg(frame, fraction, eoi=end_marker)
    else:
        cut = frame[: int(len(frame) * fraction)] + (b"\xff\xd9" if end_marker else b"")
    ds.PixelData = encapsulate([cut + b"\x00" * (len(cut) % 2)])
    return dicom_bytes(ds)


# --- JPEG -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eoi", [True, False], ids=["eoi-appended", "no-eoi"])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_jpeg_with_short_scan_data_is_refused(film_jpeg: bytes, fraction: float, eoi: bool) -> None:
    with pytest.raises(TruncatedImageError) as caught:
        decode_image(cut_jpeg(film_jpeg, fraction, eoi=eoi))
    assert str(caught.value) == JPEG_ENDS_EARLY


def test_jpeg_with_damaged_scan_data_is_refused(film_jpeg: bytes) -> None:
    start, end = jpeg_scan_span(film_jpeg)
    middle = (start + end) // 2
    damaged = film_jpeg[:middle] + b"\x00" * 64 + film_jpeg[middle:]  # junk inside the scan: the decoder loses sync
    with pytest.raises(CorruptImageError, match=re.escape("The JPEG's compressed data is damaged (libjpeg-turbo: ")):
        decode_image(damaged)


def test_whole_jpeg_decodes_to_pillows_pixels(film_jpeg: bytes) -> None:
    image = decode_image(film_jpeg)
    assert (image.format, image.photometric, image.warnings) == ("jpeg", "L", ())
    with Image.open(io.BytesIO(film_jpeg)) as reference:
        np.testing.assert_array_equal(image.pixels, np.asarray(reference, dtype=np.float32) / np.float32(255.0))


def test_whole_colour_jpeg_decodes_to_pillows_pixels(film_png: bytes) -> None:
    """A colour JPEG (4:2:0, upsampled on decode) of a film with a tint: luminance of Pillow's RGB."""
    with Image.open(io.BytesIO(film_png)) as film:
        gray = np.asarray(film.convert("L"), dtype=np.uint8)
    tinted = np.stack([gray, gray // 2 + 64, gray // 3], axis=-1)
    data = jpeg_of(Image.fromarray(tinted))
    image = decode_image(data)
    with Image.open(io.BytesIO(data)) as reference:
        rgb = np.asarray(reference, dtype=np.float64)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    assert image.photometric == "RGB"
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))


# --- PNG ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_png_cut_inside_its_image_data_is_refused(film_png: bytes, fraction: float) -> None:
    with pytest.raises(TruncatedImageError, match=r"^The PNG file is truncated: it ends inside its IDAT chunk \("):
        decode_image(cut_png_file(film_png, fraction))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_png_cut_with_iend_appended_is_refused(film_png: bytes, fraction: float) -> None:
    """Appending IEND does not hide the cut: the IDAT chunk still declares more bytes than follow."""
    cut = cut_png_file(film_png, fraction) + png_chunk(b"IEND", b"")
    with pytest.raises(TruncatedImageError, match="it ends inside its IDAT chunk"):
        decode_image(cut)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_png_whose_zlib_stream_ends_early_is_refused(film_png: bytes, fraction: float) -> None:
    with pytest.raises(TruncatedImageError) as caught:
        decode_image(cut_png_stream(film_png, fraction))
    assert str(caught.value) == PNG_STREAM_ENDS_EARLY
    assert caught.value.__cause__ is not None  # Pillow's own error, chained


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_png_with_a_damaged_idat_chunk_is_refused(film_png: bytes, fraction: float) -> None:
    damaged = r"^The PNG's image data is damaged: IDAT chunk \d+ \(at byte [\d,]+\) fails its CRC-32 checksum"
    with pytest.raises(CorruptImageError, match=damaged):
        decode_image(damage_png_idat(film_png, fraction))


def test_png_without_iend_is_refused(film_png: bytes) -> None:
    """Cut at a chunk boundary: every IDAT whole, the closing IEND chunk missing."""
    assert film_png.endswith(png_chunk(b"IEND", b""))
    with pytest.raises(TruncatedImageError, match="it ends without the IEND chunk that closes every PNG"):
        decode_image(film_png[:-12])


def test_png_without_idat_is_refused(film_png: bytes) -> None:
    header_only = b"".join([film_png[:8], *(png_chunk(t, p) for _, t, p in png_chunks(film_png) if t != b"IDAT")])
    with pytest.raises(CorruptImageError, match=re.escape("The PNG file has no image data (no IDAT chunk")):
        decode_image(header_only)


def test_whole_png_decodes(film_png: bytes) -> None:
    image = decode_image(film_png)
    assert (image.format, image.width, image.height) == ("png", 512, 512)


# --- DICOM ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_uncompressed_dicom_with_short_pixel_data_is_refused(fraction: float) -> None:
    path = pydicom_data_path("RG1_UNCR.dcm")
    needed = len(pydicom.dcmread(path).PixelData)
    for data in (cut_dicom_pixel_data(path, fraction), cut_dicom_file(path, fraction)):
        with pytest.raises(TruncatedImageError, match=r"^The DICOM pixel data is truncated: ([\d,]+) bytes") as caught:
            decode_image(data)
        assert f"for an image that needs {needed:,}." in str(caught.value)


@pytest.mark.parametrize("end_marker", [True, False], ids=["eoi-appended", "no-eoi"])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_jpeg_dicom_with_a_cut_frame_is_refused(siim_dicom: Path, fraction: float, end_marker: bool) -> None:
    with pytest.raises(TruncatedImageError) as caught:
        decode_image(cut_dicom_frame(siim_dicom, fraction, end_marker=end_marker))
    assert str(caught.value) == DICOM_JPEG_ENDS_EARLY


@pytest.mark.parametrize("end_marker", [True, False], ids=["eoc-appended", "no-eoc"])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_jpeg2000_dicom_with_a_cut_frame_is_refused(fraction: float, end_marker: bool) -> None:
    data = cut_dicom_frame(pydicom_data_path("RG1_J2KI.dcm"), fraction, end_marker=end_marker)
    with pytest.raises(TruncatedImageError) as caught:
        decode_image(data)
    assert str(caught.value) == DICOM_J2K_ENDS_EARLY


def test_whole_dicoms_decode(siim_dicom: Path) -> None:
    films = {
        "RG1_UNCR": pydicom_data_path("RG1_UNCR.dcm").read_bytes(),
        "RG1_J2KI": pydicom_data_path("RG1_J2KI.dcm").read_bytes(),
        "siim": siim_dicom.read_bytes(),
    }
    images = {name: decode_image(data) for name, data in films.items()}
    assert (images["siim"].width, images["siim"].height) == (1024, 1024)
    assert images["RG1_UNCR"].pixels.shape == images["RG1_J2KI"].pixels.shape
