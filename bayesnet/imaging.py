"""Decode an uploaded radiograph (PNG, JPEG or DICOM bytes) into display-ready grayscale pixels.

This is the first step of the upload path: ``bytes -> decode_image -> spec preprocessing -> model``.
Its job is to turn whatever a user sends into one well-defined array, or to say precisely why it
cannot, so that nothing downstream has to know about file formats:

* The format is sniffed from the content (magic bytes), never from a file name.
* The declared pixel count is read from the header *before* any pixels are decoded, so a tiny file
  that declares a gigantic image (a decompression bomb) is refused without allocating memory.
* The result is ``float32`` ``(H, W)`` in ``[0, 1]`` in *display orientation*: dense tissue (bone,
  mediastinum) bright, air (lungs) dark, exactly as a radiologist would see it on screen.
* Every failure raises a specific :class:`bayesnet.errors.ImageError` subclass whose message says
  what to do; for *any* input bytes, :func:`decode_image` either returns or raises ``ImageError``
  (third-party exceptions are converted and chained).
* No patient identifier (name, ID, dates, accession number...) is ever read into the result, an
  error message or a log line: DICOM files are parsed with an explicit list of the technical
  elements this module needs (``specific_tags``), so identifying elements are never decoded.

Decisions worth knowing (see the individual functions for details):

* **DICOM without the Part 10 header.** Only DICOM Part 10 files (``"DICM"`` at byte 128) are
  read. A bare dataset without preamble and file meta information is recognised by a heuristic and
  refused with :class:`UnsupportedFormatError`: reading it would need ``pydicom``'s ``force=True``,
  which parses almost any bytes as "DICOM" and has to guess the transfer syntax.
* **Accepted DICOM modalities.** ``CR``, ``DX`` and ``RG`` (projection radiography), the
  non-standard ``DR`` (treated as ``DX``), ``OT`` (other: secondary captures and digitised films,
  where converted radiographs usually end up) and a missing/empty Modality; the last three add a
  warning. Everything else, including ``MG`` (mammography is not a chest radiograph), ``XA``/``RF``
  (angiography/fluoroscopy), ``CT``, ``MR``, ``US``, ``NM``, ``PT`` and non-image objects, raises
  :class:`NotRadiographError`. Whether the image shows a *chest* is another component's question.
* **Colour DICOM** (``RGB``, ``YBR_*``) is converted to grayscale by luminance with a warning, the
  same policy as colour PNG/JPEG (secondary captures of radiographs are sometimes stored in
  colour). ``PALETTE COLOR`` is refused: no radiograph is stored that way.
* **Intensity range.** PNG/JPEG samples are divided by the maximum of their stored bit depth
  (255 or 65535). DICOM goes through the modality transform (Modality LUT or rescale), then the
  first VOI LUT or window, and is mapped to [0, 1] using the *output range of that transform*
  (the range ``pydicom`` maps to, see :func:`_modality_output_range`); with no VOI the full range
  implied by BitsStored/PixelRepresentation, passed through the modality transform, is used. An
  image is never normalised by its own minimum and maximum: that would erase the difference
  between a dense and a lucent film. ``MONOCHROME1`` is inverted after the VOI transform;
  Presentation LUT Shape is not applied separately (for DX it only restates MONOCHROME1/2).
  A damaged window (width < 1, non-numeric) is ignored with a warning rather than refusing an
  otherwise readable image; a DX "For Processing" object is read with a warning.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import UID

from bayesnet.errors import (
    CorruptImageError,
    DicomNoPixelDataError,
    EmptyImageError,
    ImageError,
    ImageGeometryError,
    MultiFrameDicomError,
    NotAnImageError,
    NotRadiographError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedFormatError,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "MIN_SIDE_PX",
    "WARN_ALPHA",
    "WARN_COLOUR",
    "WARN_MONOCHROME1",
    "WARN_NO_VOI",
    "DecodedImage",
    "check_radiograph_geometry",
    "decode_image",
    "sniff_format",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: Final[int] = 50_000_000
"""Largest accepted ``width * height`` (times frames for DICOM), checked before decoding.

The largest chest detectors are 43 x 43 cm at 100 um pitch, about 4300 x 4300 = 18.5 million
pixels; 50 million leaves room for finer pitch (about 7000 x 7000) while bounding memory: the DICOM
path holds a few float64 copies of the image, roughly 1 GB at the limit. It is also below Pillow's
own decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 million), so Pillow's
``DecompressionBombWarning`` never fires; a larger ``max_pixels`` is capped at that threshold for
PNG/JPEG rather than changing Pillow's global setting.
"""

ACCEPTED_FORMATS: Final[str] = "PNG, JPEG or DICOM"

MIN_SIDE_PX: Final[int] = 32
"""Shortest side, in pixels, of an image read as a radiograph (see :func:`check_radiograph_geometry`)."""

MAX_ASPECT_RATIO: Final[float] = 4.0
"""Largest long-side / short-side ratio of an image read as a radiograph (chest films are 0.8 to 1.25)."""

# Human-readable notes carried in DecodedImage.warnings; fixed strings so callers can match them.
WARN_COLOUR: Final[str] = "colour image converted to grayscale"
WARN_ALPHA: Final[str] = "alpha channel ignored"
WARN_MONOCHROME1: Final[str] = "MONOCHROME1 inverted for display"
WARN_NO_VOI: Final[str] = "no VOI window: full BitsStored range used"

_PNG_SIGNATURE: Final[bytes] = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE: Final[bytes] = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET: Final[int] = 128
_DICOM_MAGIC: Final[bytes] = b"DICM"

# Luminance weights (ITU-R BT.601), the same ones Pillow's "L" conversion uses, applied in float.
_LUMA_WEIGHTS: Final[tuple[float, float, float]] = (0.299, 0.587, 0.114)

# JPEG markers (the byte after 0xFF), classified exactly as Pillow's JpegImagePlugin.MARKER does, so
# the header walk below sees every frame header Pillow will. SOFn frame headers carry the image
# size (DHP, 0xDE, is a frame header in Pillow too); JPG (C8), RSTn, SOI, EOI and JPGn (F0-FD) have
# no length field; every other marker from C0 to FE is a segment with a length. F7 (JPGn in
# Pillow) is JPEG-LS's SOF55, only noted to name the format.
_JPEG_SOF_MARKERS: Final[frozenset[int]] = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE}
)
_JPEG_NO_LENGTH_MARKERS: Final[frozenset[int]] = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_LS_SOF: Final[int] = 0xF7
_JPEG_SOS: Final[int] = 0xDA

# DICOM elements read from uploads. Only these are parsed, so patient identifiers never are.
_DICOM_TAGS: Final[list[str]] = [
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
]

# (7FE0,0010) Pixel Data as tag bytes, little and big endian.
_PIXEL_DATA_TAG_LE: Final[bytes] = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE: Final[bytes] = b"\x7f\xe0\x00\x10"
# (FFFE,E0DD) Sequence Delimitation Item with zero length: the end of encapsulated pixel data.
_SEQUENCE_DELIMITER: Final[bytes] = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

_RADIOGRAPHY_MODALITIES: Final[frozenset[str]] = frozenset({"CR", "DX", "RG"})
_MODALITY_NAMES: Final[dict[str, str]] = {
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PT": "PET",
    "MG": "mammography",
    "XA": "X-ray angiography",
    "RF": "radiofluoroscopy",
    "IO": "intra-oral radiography",
    "PX": "panoramic dental X-ray",
    "ES": "endoscopy",
    "XC": "external camera photography",
    "OP": "ophthalmic photography",
    "SR": "structured report",
    "SEG": "segmentation",
    "PR": "presentation state",
    "KO": "key object selection",
    "DOC": "document",
}

_MONOCHROME: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR_PHOTOMETRICS: Final[frozenset[str]] = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded radiograph, ready for model preprocessing.

    ``pixels`` is ``float32`` ``(H, W)`` in ``[0, 1]``, display orientation (bone bright, lungs dark),
    after EXIF rotation for PNG/JPEG; ``width``/``height`` describe that array. The array belongs to
    the caller (it is writable and not shared). ``eq=False`` because array fields make field-wise
    equality ambiguous; compare ``pixels`` explicitly.

    ``bit_depth`` is the stored bits per sample (8 or 16 for PNG/JPEG, BitsStored for DICOM, e.g.
    15). ``photometric`` is the Pillow mode read for PNG/JPEG (``"L"``, ``"I;16"``, ``"RGBA"``...)
    and the PhotometricInterpretation for DICOM. ``warnings`` are human-readable notes about
    conversions that changed or assumed something. ``modality``, ``body_part`` and
    ``view_position`` are copied from DICOM (None when absent or for PNG/JPEG); none of them
    identifies a patient.
    """

    pixels: npt.NDArray[np.float32]
    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    warnings: tuple[str, ...]
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None

    def __post_init__(self) -> None:
        """Check the invariants every consumer relies on (cheap: shape and dtype only)."""
        if self.pixels.dtype != np.float32 or self.pixels.shape != (self.height, self.width):
            raise ValueError(
                f"DecodedImage.pixels must be float32 of shape (height, width) = "
                f"({self.height}, {self.width}), got {self.pixels.dtype} {self.pixels.shape}"
            )


# --- sniffing ------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """Return ``"png"``, ``"jpeg"`` or ``"dicom"`` from the magic bytes of ``data``, else None.

    Only the content is looked at. DICOM means a Part 10 file (``"DICM"`` at byte 128); it is
    checked first because the 128-byte preamble may legitimately hold another format's header
    (dual-personality DICOM/TIFF files exist).
    """
    if (
        len(data) >= _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)
        and data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)] == _DICOM_MAGIC
    ):
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    return None


def _known_unsupported_format(data: bytes) -> str | None:
    """Name a recognised image/container format that this service does not read, else None."""
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if data.startswith(b"BM") and len(data) >= 18:
        # BMP: the DIB header size at byte 14 is one of a few fixed values; checking it keeps
        # text that happens to start with "BM" out.
        (dib_size,) = struct.unpack_from("<I", data, 14)
        if dib_size in {12, 16, 40, 52, 56, 64, 108, 124}:
            return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "JPEG 2000 (JP2)"
    if data.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000 codestream"
    if data.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n") or data.startswith(b"\xff\x0a"):
        return "JPEG XL"
    if data[4:8] == b"ftyp" and data[8:12] in {b"heic", b"heix", b"hevc", b"mif1", b"msf1"}:
        return "HEIF/HEIC"
    if data[4:8] == b"ftyp" and data[8:12] in {b"avif", b"avis"}:
        return "AVIF"
    if data.startswith(b"%PDF-"):
        return "PDF"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "ZIP archive"
    if data.startswith(b"\x1f\x8b"):
        return "gzip archive"
    if _looks_like_bare_dicom(data):
        return "DICOM dataset without the Part 10 header (no 'DICM' at byte 128)"
    return None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """Heuristic for a DICOM dataset written without preamble and file meta information.

    Such files start with an element of group 0x0002 or 0x0008 (little endian), followed either by
    a two-letter explicit VR or by an implicit-VR length that fits in the file.
    """
    if len(data) < 8 or data[:2] not in {b"\x02\x00", b"\x08\x00"}:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return 0 < length <= len(data) - 8 and data[3] == 0


def _raise_unrecognised(data: bytes) -> NoReturn:
    """Raise UnsupportedFormatError for a known other format, NotAnImageError for anything else."""
    other = _known_unsupported_format(data)
    if other is not None:
        raise UnsupportedFormatError(
            f"The file is a {other}, which this service does not read. Send the radiograph as {ACCEPTED_FORMATS}."
        )
    hint = ""
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        hint = " It looks like an HTML page (perhaps an error page saved instead of the image)."
    elif head.startswith((b"<", b"{", b"[")):
        hint = " It looks like XML or JSON text."
    elif _is_mostly_text(data[:512]):
        hint = " It looks like plain text."
    raise NotAnImageError(
        f"The upload is not a {ACCEPTED_FORMATS} image (checked from its content, not its name).{hint}"
    )


def _is_mostly_text(head: bytes) -> bool:
    """True when a file's first bytes are printable ASCII or common whitespace."""
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


# --- entry point ---------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode PNG, JPEG or DICOM bytes into a :class:`DecodedImage` (float32 ``(H, W)`` in [0, 1]).

    ``max_pixels`` bounds the declared ``width * height`` (times frames for DICOM); it is checked
    from the header before any pixel is decoded. For any ``data`` this returns or raises an
    :class:`~bayesnet.errors.ImageError` subclass; ``MemoryError`` is the one exception passed on
    unchanged, since it describes the machine, not the file.

    Raises:
        EmptyImageError: ``data`` is empty.
        NotAnImageError: the content is not a recognised image.
        UnsupportedFormatError: a recognised format or variant that is not read (GIF, TIFF,
            12-bit JPEG, palette DICOM, an unavailable transfer syntax...).
        TooManyPixelsError: the declared size is above ``max_pixels``.
        TruncatedImageError: the file ends before its pixel data does.
        CorruptImageError: the content is damaged or inconsistent.
        DicomNoPixelDataError, MultiFrameDicomError, NotRadiographError: DICOM-specific refusals.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    data = bytes(data)
    if not data:
        raise EmptyImageError("The upload is empty (0 bytes). Select the image file and send it again.")

    fmt = sniff_format(data)
    decoders: dict[str, Callable[[bytes, int], DecodedImage]] = {
        "png": _decode_png,
        "jpeg": _decode_jpeg,
        "dicom": _decode_dicom,
    }
    if fmt is None:
        _raise_unrecognised(data)
    try:
        image = decoders[fmt](data, max_pixels)
    except (ImageError, MemoryError):
        raise
    except Exception as err:
        # The hostile-input contract: whatever a third-party decoder (or a warning turned into an
        # error by the caller's filters) raises on damaged bytes becomes a CorruptImageError. Only
        # the exception type is shown, never its text, which may quote header values.
        raise CorruptImageError(
            f"The {fmt.upper()} file is damaged and could not be decoded ({type(err).__name__}). "
            "Export the image again from its source."
        ) from err
    logger.debug(
        "decoded %s %dx%d bit_depth=%d photometric=%s warnings=%s",
        image.format,
        image.width,
        image.height,
        image.bit_depth,
        image.photometric,
        image.warnings,
    )
    return image


def check_radiograph_geometry(
    image: DecodedImage, *, min_side_px: int = MIN_SIDE_PX, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> None:
    """Raise :class:`ImageGeometryError` when ``image`` cannot be a radiograph by its size or shape.

    :func:`decode_image` reads any valid file, whatever its size (training crops and tests use tiny
    images); a model input is resized to a fixed square, so a 1 x 1 pixel or a 20000 x 1 strip would
    still produce confident-looking numbers about nothing. Callers that score uploads (the service)
    call this after decoding to refuse such images with the reason instead.
    """
    short, long = sorted((image.width, image.height))
    if short < min_side_px:
        raise ImageGeometryError(
            f"The image is {image.width} x {image.height} pixels; a radiograph needs at least {min_side_px} "
            "pixels on each side. Send the full-resolution film, not a thumbnail or icon."
        )
    if long / short > max_aspect_ratio:
        raise ImageGeometryError(
            f"The image is {image.width} x {image.height} pixels, an aspect ratio of {long / short:.1f}:1; a "
            f"radiograph is at most {max_aspect_ratio:g}:1. Send the whole film, not a strip or a collage."
        )


def _check_pixel_count(kind: str, width: int, height: int, frames: int, max_pixels: int) -> None:
    """Raise TooManyPixelsError when the declared size is above ``max_pixels``."""
    total = width * height * frames
    if total > max_pixels:
        size = f"{width} x {height}" + (f" x {frames} frames" if frames != 1 else "")
        raise TooManyPixelsError(
            f"The {kind} declares {size} = {total:,} pixels, above the limit of {max_pixels:,}. "
            "Send a smaller export of the radiograph."
        )


# --- PNG and JPEG (Pillow) -----------------------------------------------------------------------


@dataclass(frozen=True)
class _RasterHeader:
    """Size and sample depth read from a PNG IHDR or JPEG SOFn header without decoding pixels."""

    width: int
    height: int
    bit_depth: int


def _png_header(data: bytes) -> _RasterHeader:
    """Parse the PNG IHDR chunk (always the first chunk) with its CRC."""
    ihdr_end = len(_PNG_SIGNATURE) + 8 + 13 + 4
    if len(data) < ihdr_end:
        raise TruncatedImageError(
            f"The PNG file is truncated: it ends inside its header ({len(data)} bytes). Upload the complete file again."
        )
    length, chunk_type = struct.unpack_from(">I4s", data, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise CorruptImageError("The PNG file is damaged: its first chunk is not a valid IHDR header.")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise CorruptImageError("The PNG file is damaged: its IHDR header fails its checksum.")
    width, height, bit_depth = struct.unpack_from(">IIB", data, 16)
    if width == 0 or height == 0:
        raise CorruptImageError(f"The PNG file declares an empty image ({width} x {height} pixels).")
    return _RasterHeader(width, height, bit_depth)


def _jpeg_header(data: bytes) -> _RasterHeader:
    """Walk the JPEG markers up to the first scan and return the frame header (SOFn) values.

    The walk follows Pillow's own (junk bytes between segments skipped, the same markers with and
    without a length), so every frame header Pillow would use is seen here first; the largest one
    is used for the pixel guard.
    """
    frames: list[tuple[int, int, int]] = []  # (precision, height, width), as stored in SOFn
    jpeg_ls = False
    pos, end = 2, len(data)
    while True:
        while pos < end and data[pos] != 0xFF:
            pos += 1
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            if jpeg_ls:
                break
            raise TruncatedImageError(
                "The JPEG file is truncated: it ends before its first scan. Upload the complete file again."
            )
        marker = data[pos]
        pos += 1
        if marker == 0x00:  # an escaped 0xFF data byte, skipped like junk
            continue
        if marker == _JPEG_LS_SOF:
            jpeg_ls = True
        if marker in _JPEG_NO_LENGTH_MARKERS:
            continue
        if marker < 0xC0:
            raise CorruptImageError(f"The JPEG file is damaged: invalid marker 0xFF{marker:02X} in its header.")
        if pos + 2 > end:
            raise TruncatedImageError("The JPEG file is truncated: it ends inside a header segment.")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise CorruptImageError("The JPEG file is damaged: a header segment has an invalid length.")
        if pos + length > end:
            raise TruncatedImageError("The JPEG file is truncated: it ends inside a header segment.")
        if marker in _JPEG_SOF_MARKERS:
            if length < 8:
                raise CorruptImageError("The JPEG file is damaged: its frame header is too short.")
            frames.append(struct.unpack_from(">BHH", data, pos + 2))
        if marker == _JPEG_SOS:
            break
        pos += length
    if jpeg_ls:
        raise UnsupportedFormatError(
            f"The file is a JPEG-LS image, which this service does not read. Send the radiograph as {ACCEPTED_FORMATS}."
        )
    if not frames:
        raise CorruptImageError("The JPEG file is damaged: it has no frame header (SOF) before its data.")
    if any(precision != 8 for precision, _, _ in frames):
        bits = max(precision for precision, _, _ in frames)
        raise UnsupportedFormatError(
            f"The JPEG file uses {bits}-bit samples; only 8-bit JPEG is read. "
            "Send a 16-bit PNG or the original DICOM instead."
        )
    if any(height == 0 or width == 0 for _, height, width in frames):
        raise CorruptImageError("The JPEG file declares a zero width or height (a DNL-marker height is not supported).")
    _, height, width = max(frames, key=lambda frame: frame[1] * frame[2])
    return _RasterHeader(width, height, 8)


def _pillow_limit(max_pixels: int) -> int:
    """Cap ``max_pixels`` at Pillow's own bomb threshold so Pillow never warns or raises for size."""
    pillow_max = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow_max) if pillow_max else max_pixels


def _decode_png(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a PNG; the size guard reads IHDR before Pillow touches the data."""
    header = _png_header(data)
    _check_pixel_count("PNG file", header.width, header.height, 1, _pillow_limit(max_pixels))
    return _decode_with_pillow(data, "png", header, max_pixels, complete=data.endswith(_png_iend()))


def _png_iend() -> bytes:
    """The 12 bytes every complete PNG ends with (empty IEND chunk and its CRC)."""
    return struct.pack(">I4sI", 0, b"IEND", zlib.crc32(b"IEND"))


def _decode_jpeg(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode an 8-bit JPEG; the size guard reads the SOFn frame header before Pillow does."""
    header = _jpeg_header(data)
    _check_pixel_count("JPEG file", header.width, header.height, 1, _pillow_limit(max_pixels))
    complete = data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return _decode_with_pillow(data, "jpeg", header, max_pixels, complete=complete)


def _decode_with_pillow(
    data: bytes, fmt: str, header: _RasterHeader, max_pixels: int, *, complete: bool
) -> DecodedImage:
    """Open, size-check, load, orient and convert an image with Pillow.

    ``complete`` says whether the file ends with its format's end marker; a decode failure of a file
    without one is reported as truncation, the usual cause (an interrupted upload).
    """
    name = fmt.upper()
    try:
        with Image.open(io.BytesIO(data), formats=[name]) as opened:
            # Defence in depth: Pillow's idea of the size must agree with the header check.
            width, height = opened.size
            _check_pixel_count(f"{name} file", width, height, 1, _pillow_limit(max_pixels))
            opened.load()
            mode = opened.mode
            warnings: list[str] = []
            if getattr(opened, "n_frames", 1) > 1:
                warnings.append("only the first frame of a multi-frame file was read")
            image = _apply_exif_orientation(opened, warnings)
            pixels = _pillow_to_gray(image, header.bit_depth, warnings)
    except ImageError:
        raise
    except UnidentifiedImageError as err:
        raise CorruptImageError(
            f"The {name} file is damaged: its header could not be read. Export the image again."
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        reason = str(err)[:200]
        if not complete or "truncated" in reason.lower() or isinstance(err, EOFError):
            raise TruncatedImageError(
                f"The {name} file is truncated: it ends before its pixel data does ({reason}). "
                "Upload the complete file again."
            ) from err
        raise CorruptImageError(
            f"The {name} file is damaged and could not be decoded ({reason}). Export the image again."
        ) from err
    return DecodedImage(
        pixels=pixels,
        format=fmt,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        bit_depth=header.bit_depth,
        photometric=mode,
        warnings=tuple(warnings),
    )


def _apply_exif_orientation(image: Image.Image, warnings: list[str]) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag (2..8) so pixels are in display orientation."""
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in range(2, 9):
        return image
    transposed = ImageOps.exif_transpose(image)
    if transposed is None:  # only returned for in_place=True; keeps the type checker honest
        return image
    warnings.append(f"EXIF orientation {orientation} applied")
    return transposed


def _pillow_to_gray(image: Image.Image, bit_depth: int, warnings: list[str]) -> npt.NDArray[np.float32]:
    """Convert a loaded Pillow image to float32 ``(H, W)`` in [0, 1] without any per-image scaling.

    Gray samples are divided by the maximum of their stored depth; colour is reduced by luminance
    in float (a warning only when the channels actually differ); alpha is ignored.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in {"I;16", "I;16L", "I;16B", "I;16N"}:
        return np.asarray(image, dtype=np.float32) / np.float32(65535.0)
    if mode == "I":
        # 32-bit container Pillow may use for 16-bit (or lower) grayscale PNG.
        depth = bit_depth if bit_depth in (8, 16) else 16
        gray = np.asarray(image, dtype=np.float64) / float(2**depth - 1)
        return np.clip(gray, 0.0, 1.0).astype(np.float32)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if mode == "LA":
        warnings.append(WARN_ALPHA)
        return np.asarray(image.getchannel("L"), dtype=np.float32) / np.float32(255.0)
    if bit_depth == 16 and mode in {"RGB", "RGBA"}:
        warnings.append("16-bit colour reduced to 8 bits per channel by the decoder")
    if mode in {"P", "PA"}:
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    elif mode in {"CMYK", "YCbCr", "LAB", "HSV"}:
        warnings.append(f"{mode} image converted to RGB")
        image = image.convert("RGB")
        mode = "RGB"
    if mode == "RGBA":
        warnings.append(WARN_ALPHA)
        rgb = np.asarray(image, dtype=np.uint8)[..., :3]
    elif mode == "RGB":
        rgb = np.asarray(image, dtype=np.uint8)
    else:
        raise UnsupportedFormatError(
            f"The image uses the pixel mode {mode!r}, which this service does not read. "
            "Save it as an 8- or 16-bit grayscale PNG."
        )
    return (_luminance(rgb, warnings) / 255.0).astype(np.float32)


def _luminance(rgb: npt.NDArray[np.generic], warnings: list[str]) -> FloatArray:
    """Float luminance ``0.299 R + 0.587 G + 0.114 B`` of ``(H, W, 3)`` samples, in sample units.

    Images whose three channels are identical (gray stored as colour) are returned as-is with no
    warning: nothing was lost.
    """
    r, g, b = (rgb[..., i] for i in range(3))
    if np.array_equal(r, g) and np.array_equal(g, b):
        return np.asarray(r, dtype=np.float64)
    warnings.append(WARN_COLOUR)
    wr, wg, wb = _LUMA_WEIGHTS
    return wr * r.astype(np.float64) + wg * g.astype(np.float64) + wb * b.astype(np.float64)


# --- DICOM ---------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a single-frame projection radiograph from a DICOM Part 10 file.

    Order of checks: pixel data present, modality, frames, photometric interpretation, pixel count,
    transfer syntax decodable, pixel data length; only then are pixels decoded by pydicom's pixel
    handlers (native, RLE, JPEG, JPEG-LS, JPEG 2000 through pylibjpeg).
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(_DICOM_TAGS))
    except EOFError as err:
        raise TruncatedImageError(
            "The DICOM file is truncated: it ends inside its header. Upload the complete file again."
        ) from err
    warnings: list[str] = []

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedFormatError(
                "The DICOM file stores floating-point pixel data, which no radiograph uses. "
                "Send the original radiograph."
            )
        tag_at = max(data.rfind(_PIXEL_DATA_TAG_LE), data.rfind(_PIXEL_DATA_TAG_BE))
        if tag_at >= 0:
            # The bytes hold a Pixel Data element that the parser dropped. Without the sequence
            # delimiter that closes compressed pixel data, the file was cut short (pydicom warns
            # and drops the element); otherwise the header is damaged (e.g. a wrong length).
            if _SEQUENCE_DELIMITER not in data[tag_at:]:
                raise TruncatedImageError(
                    "The DICOM file is truncated: it ends inside its pixel data. Upload the complete file again."
                )
            raise CorruptImageError(
                "The DICOM header is damaged: its pixel data could not be reached. "
                "Export the image again from its source."
            )
        if "Rows" in ds or "Columns" in ds or _is_image_storage(ds):
            raise DicomNoPixelDataError(
                "The DICOM file describes an image but contains no Pixel Data: the upload may have "
                "been cut short, or the object is header-only. Send the complete image file."
            )
        raise DicomNoPixelDataError(
            "The DICOM file contains no image (no Pixel Data): it may be a report, a presentation "
            "state or a header-only object. Send the image object itself."
        )

    modality = _dicom_code(ds, "Modality")
    _check_modality(modality, warnings)
    if "For Processing" in _sop_class_name(ds):
        warnings.append("'For Processing' DICOM: raw detector data, not the image prepared for viewing")

    frames = _dicom_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise MultiFrameDicomError(
            f"The DICOM file holds {frames} frames (cine, tomosynthesis or a volume); one "
            "radiograph is expected. Export the single image you want read."
        )
    if frames < 1:
        raise CorruptImageError(f"The DICOM file declares an invalid Number of Frames ({frames}).")

    rows = _dicom_int(ds, "Rows")
    columns = _dicom_int(ds, "Columns")
    if rows < 1 or columns < 1:
        raise CorruptImageError(f"The DICOM file declares an empty image ({columns} x {rows} pixels).")
    _check_pixel_count("DICOM file", columns, rows, frames, max_pixels)

    photometric = _dicom_code(ds, "PhotometricInterpretation") or ""
    samples = _dicom_int(ds, "SamplesPerPixel", default=1)
    bits_stored = _dicom_int(ds, "BitsStored")
    bits_allocated = _dicom_int(ds, "BitsAllocated")
    if photometric == "PALETTE COLOR":
        raise UnsupportedFormatError(
            "The DICOM file uses PALETTE COLOR, which no radiograph uses. Send a MONOCHROME export."
        )
    if not ((photometric in _MONOCHROME and samples == 1) or (photometric in _COLOUR_PHOTOMETRICS and samples == 3)):
        raise UnsupportedFormatError(
            f"The DICOM Photometric Interpretation {photometric or '(missing)'!r} with {samples} "
            "sample(s) per pixel is not read; a radiograph is MONOCHROME1 or MONOCHROME2."
        )
    if not 1 <= bits_stored <= bits_allocated <= 32:
        raise CorruptImageError(
            f"The DICOM file declares inconsistent bit depths (Bits Stored {bits_stored}, "
            f"Bits Allocated {bits_allocated})."
        )

    transfer_syntax = _transfer_syntax(ds)
    if not transfer_syntax.is_compressed:
        _check_native_length(ds, rows * columns * frames, samples, bits_allocated, photometric)

    try:
        stored = ds.pixel_array
    except ValueError as err:
        text = str(err).lower()
        if any(word in text for word in ("length", "truncat", "premature", "insufficient", "short")):
            raise TruncatedImageError(
                "The DICOM pixel data is shorter than the image it declares. Upload the complete file again."
            ) from err
        raise CorruptImageError(
            f"The DICOM pixel data ({transfer_syntax.name}) could not be decoded "
            f"({type(err).__name__}). Export the image again from its source."
        ) from err

    expected_shape = (rows, columns) if samples == 1 else (rows, columns, 3)
    if stored.shape != expected_shape:
        raise CorruptImageError(
            f"The DICOM pixel data decodes to shape {stored.shape}, not the declared {expected_shape}."
        )

    if samples == 3:
        scaled = _luminance(stored, warnings) / float(2**bits_stored - 1)
    else:
        scaled = _monochrome_to_unit(stored, ds, bits_stored, warnings)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
            warnings.append(WARN_MONOCHROME1)
    if not np.all(np.isfinite(scaled)):
        raise CorruptImageError("The DICOM intensity transform (rescale or window values) produced invalid numbers.")
    pixels = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    return DecodedImage(
        pixels=pixels,
        format="dicom",
        width=columns,
        height=rows,
        bit_depth=bits_stored,
        photometric=photometric,
        warnings=tuple(warnings),
        modality=modality,
        body_part=_dicom_code(ds, "BodyPartExamined"),
        view_position=_dicom_code(ds, "ViewPosition"),
    )


def _sop_class_name(ds: Dataset) -> str:
    """Registered name of the file meta's SOP class (e.g. "Computed Radiography Image Storage"), or ""."""
    file_meta = getattr(ds, "file_meta", None)
    sop_class = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    return UID(str(sop_class)).name if sop_class else ""


def _is_image_storage(ds: Dataset) -> bool:
    """Whether the SOP class is an image storage class (CR, DX, Secondary Capture...).

    Reports, presentation states and key-object notes have no pixels by design; an image class
    without Pixel Data is a cut-short or header-only file.
    """
    return "Image Storage" in _sop_class_name(ds)


def _dicom_code(ds: Dataset, keyword: str) -> str | None:
    """A code-string element as a short, printable string (None when absent or empty).

    Values are sanitised (letters, digits, space, underscore; at most 64 characters) because they
    can appear in messages and logs and a hostile file controls them.
    """
    value = ds.get(keyword)
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    cleaned = "".join(c for c in value.strip() if c.isascii() and (c.isalnum() or c in " _"))[:64]
    return cleaned.upper() or None


def _dicom_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer element (US or IS); CorruptImageError when missing without default or invalid."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise CorruptImageError(f"The DICOM file lacks the required {keyword} element.")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise CorruptImageError(f"The DICOM {keyword} element is not a number.") from err
    if not math.isfinite(number) or number != int(number):
        raise CorruptImageError(f"The DICOM {keyword} element is not an integer.")
    return int(number)


def _check_modality(modality: str | None, warnings: list[str]) -> None:
    """Accept projection radiography (see the module docstring); raise NotRadiographError else."""
    if modality is None:
        warnings.append("no Modality in the DICOM header: assumed to be a projection radiograph")
        return
    if modality in _RADIOGRAPHY_MODALITIES:
        return
    if modality == "DR":
        warnings.append("non-standard Modality 'DR' treated as DX (digital radiography)")
        return
    if modality == "OT":
        warnings.append("Modality OT (other): assumed to be a digitised or converted radiograph")
        return
    described = _MODALITY_NAMES.get(modality)
    shown = f"{modality} ({described})" if described else modality[:16]
    raise NotRadiographError(
        f"The DICOM Modality is {shown}, not a projection radiograph. This service reads chest "
        "X-rays stored as CR, DX or RG (or OT secondary captures)."
    )


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, checked to be one pydicom can decode with installed plugins."""
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        raise CorruptImageError("The DICOM file meta information has no Transfer Syntax UID.")
    uid = UID(str(uid))
    if uid.is_transfer_syntax and not uid.is_compressed:
        return uid
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax {_uid_label(uid)} cannot be decoded here (video or an "
            "unknown encoding). Export the radiograph uncompressed or as JPEG/JPEG 2000."
        ) from err
    if not decoder.is_available:
        raise UnsupportedFormatError(
            f"No decoder is installed for the DICOM transfer syntax {_uid_label(uid)}. "
            "Export the radiograph uncompressed."
        )
    return uid


def _uid_label(uid: UID) -> str:
    """A UID with its registered name when pydicom knows it (the UID itself is not an identifier)."""
    name = uid.name
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)[:64]


def _check_native_length(ds: Dataset, pixel_count: int, samples: int, bits_allocated: int, photometric: str) -> None:
    """Raise TruncatedImageError when uncompressed pixel data is shorter than declared."""
    samples_stored = 2 if photometric == "YBR_FULL_422" else samples
    expected_bytes = math.ceil(pixel_count * samples_stored * bits_allocated / 8)
    actual_bytes = len(ds["PixelData"].value or b"")
    if actual_bytes < expected_bytes:
        raise TruncatedImageError(
            f"The DICOM pixel data is truncated: {actual_bytes:,} bytes for an image that needs "
            f"{expected_bytes:,}. Upload the complete file again."
        )


def _modality_output_range(ds: Dataset, bits_stored: int) -> tuple[float, float]:
    """Values that the smallest and largest storable pixel map to through the modality transform.

    This is exactly the ``(y_min, y_max)`` that :func:`pydicom.pixels.apply_windowing` uses as its
    output range (pydicom 3 ``processing.py``): a Modality LUT gives ``[0, 2**bits - 1]`` with
    ``bits`` its descriptor's third value; otherwise the BitsStored range (signed or unsigned per
    PixelRepresentation), passed through Rescale Slope/Intercept when both are present. With a
    negative slope the pair is reversed, as it is in pydicom.
    """
    if ds.get("ModalityLUTSequence"):
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**lut_bits - 1)
    if _dicom_int(ds, "PixelRepresentation", default=0) == 0:
        low, high = 0.0, float(2**bits_stored - 1)
    else:
        low, high = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI transform applies, by the rule of ``apply_voi_lut``: a VOI LUT, else a window."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
            return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _window_is_valid(ds: Dataset) -> bool:
    """Whether the first Window Center/Width pair can be applied as the standard defines.

    A damaged window (non-numeric, infinite, a LINEAR width below 1, an unknown VOI LUT Function)
    says nothing about the pixels, so the image is still read, over its full range, with a warning.
    """
    try:
        center = _first_number(ds["WindowCenter"].value)
        width = _first_number(ds["WindowWidth"].value)
    except (TypeError, ValueError, IndexError):
        return False
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if not (math.isfinite(center) and math.isfinite(width)):
        return False
    if function == "LINEAR":
        return width >= 1
    return function in {"LINEAR_EXACT", "SIGMOID"} and width > 0


def _first_number(value: object) -> float:
    """First value of a possibly multi-valued numeric element, as float."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {type(value).__name__}")
    return float(value)


def _monochrome_to_unit(
    stored: npt.NDArray[np.generic], ds: Dataset, bits_stored: int, warnings: list[str]
) -> FloatArray:
    """Modality transform, then the first VOI LUT or window, then map its output range to [0, 1].

    Result increases with the *displayed* brightness of MONOCHROME2 (the caller inverts
    MONOCHROME1). Never uses the image's own min/max.
    """
    low, high = _modality_output_range(ds, bits_stored)
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        raise CorruptImageError("The DICOM rescale values (Rescale Slope/Intercept) give an empty or invalid range.")
    values = apply_modality_lut(stored, ds)
    kind = _voi_kind(ds)
    if kind == "lut":
        item = ds.VOILUTSequence[0]
        entries, first_mapped, lut_bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        # LUT input is an integer index; clipping to the LUT's domain first is what the LUT does
        # anyway (values outside map to the first/last entry) and keeps pydicom's index arithmetic
        # inside its unsigned dtype.
        index = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
        output = apply_voi(index, ds, 0).astype(np.float64)
        return output / float(2**lut_bits - 1)
    if kind == "window":
        if _window_is_valid(ds):
            output = apply_windowing(values, ds, 0)
            return (np.asarray(output, dtype=np.float64) - low) / (high - low)
        warnings.append("invalid VOI window ignored")
    warnings.append(WARN_NO_VOI)
    low, high = min(low, high), max(low, high)
    return (np.asarray(values, dtype=np.float64) - low) / (high - low)
