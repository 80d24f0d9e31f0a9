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
  elements this package needs (``specific_tags``), so identifying elements are never decoded.

One module per concern; each module's docstring records the decisions it makes:

* :mod:`~bayesnet.imaging.sniff`: the format from the magic bytes, and a precise refusal of the
  formats that are not read (DICOM without the Part 10 header among them).
* :mod:`~bayesnet.imaging.limits`: the pixel budget checked before decoding, and the size and shape
  a radiograph can have (:func:`check_radiograph_geometry`).
* :mod:`~bayesnet.imaging.decoded`: :class:`DecodedImage`, the result, :class:`ImageFacts` (the result without
  its pixels), and the warning strings.
* :mod:`~bayesnet.imaging.raster`: PNG and JPEG, the header parsed here and the pixels by Pillow
  (gray and RGB JPEG by libjpeg-turbo's strict decode).
* :mod:`~bayesnet.imaging.dicom`: DICOM through pydicom: accepted modalities, colour, and the
  modality and VOI intensity transforms.
* :mod:`~bayesnet.imaging.integrity`: whether the compressed pixel data is whole: a truncated or
  damaged JPEG scan, PNG IDAT or DICOM frame is refused instead of decoded with rows missing.
* :mod:`~bayesnet.imaging.memory`: :func:`decode_memory_bytes`, the bound on the memory one decode takes,
  from the header alone (so that a caller can admit decodes against a memory budget).

:func:`decode_image`, below, is the entry point: it sniffs the format, hands the bytes to that
format's decoder and turns any other exception into :class:`~bayesnet.errors.CorruptImageError`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from bayesnet.errors import CorruptImageError, EmptyImageError, ImageError
from bayesnet.imaging.decoded import (
    POPULATION_LATERAL,
    POPULATION_NON_CHEST,
    POPULATION_PAEDIATRIC,
    VERIFIED_AGE,
    VERIFIED_VIEW,
    WARN_ALPHA,
    WARN_COLOUR,
    WARN_MONOCHROME1,
    WARN_NO_VOI,
    DecodedImage,
    ImageFacts,
    population_evidence,
    population_flags,
)
from bayesnet.imaging.dicom import decode_dicom
from bayesnet.imaging.limits import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, MIN_SIDE_PX, check_radiograph_geometry
from bayesnet.imaging.memory import decode_memory_bytes
from bayesnet.imaging.raster import decode_jpeg, decode_png
from bayesnet.imaging.sniff import ACCEPTED_FORMATS, raise_unrecognised, sniff_format

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "MIN_SIDE_PX",
    "POPULATION_LATERAL",
    "POPULATION_NON_CHEST",
    "POPULATION_PAEDIATRIC",
    "VERIFIED_AGE",
    "VERIFIED_VIEW",
    "WARN_ALPHA",
    "WARN_COLOUR",
    "WARN_MONOCHROME1",
    "WARN_NO_VOI",
    "DecodedImage",
    "ImageFacts",
    "check_radiograph_geometry",
    "decode_image",
    "decode_memory_bytes",
    "population_evidence",
    "population_flags",
    "sniff_format",
]

logger = logging.getLogger(__name__)

_RUST_PANIC = "PanicException"  # pyo3_runtime.PanicException, a module that exists only once a Rust codec is loaded


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> DecodedImage:
    """Decode PNG, JPEG or DICOM bytes into a :class:`DecodedImage` (float32 ``(H, W)`` in [0, 1]).

    ``max_pixels`` bounds the declared ``width * height`` (times frames for DICOM); it is checked
    from the header before any pixel is decoded. For any ``data`` this returns or raises an
    :class:`~bayesnet.errors.ImageError` subclass; ``MemoryError`` is the one exception passed on
    unchanged, since it describes the machine, not the file. :func:`decode_memory_bytes` bounds the
    memory a call takes, from the header alone.

    ``max_side``: the caller will show the image no larger than this on its long side (a preview), so a
    JPEG at least twice that size may be decoded at a reduced scale whose long side is still ``>= max_side``
    (libjpeg's DCT scaling, :func:`~bayesnet.imaging.raster.decode_jpeg`); ``width`` and ``height`` then
    describe the reduced pixels. Other formats ignore it. ``None`` (the default, and what model inputs use):
    always the full size.

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
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side <= 0):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    data = bytes(data)
    if not data:
        raise EmptyImageError("The upload is empty (0 bytes). Select the image file and send it again.")

    fmt = sniff_format(data)
    decoders: dict[str, Callable[[bytes, int], DecodedImage]] = {
        "png": decode_png,
        "jpeg": functools.partial(decode_jpeg, max_side=max_side),
        "dicom": decode_dicom,
    }
    if fmt is None:
        raise_unrecognised(data)
    try:
        image = decoders[fmt](data, max_pixels)
    except (ImageError, MemoryError):
        raise
    except BaseException as err:
        # The hostile-input contract: whatever a third-party decoder (or a warning turned into an
        # error by the caller's filters) raises on damaged bytes becomes a CorruptImageError. Only
        # the exception type is shown, never its text, which may quote header values. A Rust codec
        # (pylibjpeg-rle) that panics on damaged data raises pyo3's PanicException, which derives
        # from BaseException so that it is not caught as an Exception; it is this contract's too.
        if not isinstance(err, Exception) and type(err).__name__ != _RUST_PANIC:
            raise
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
