"""PNG and JPEG: the size read from the header by hand, the pixels decoded by Pillow.

Decisions worth knowing (see the individual functions for details):

* **Size before pixels.** The PNG IHDR or JPEG frame header (SOFn) is parsed here, before Pillow
  sees the data, so the pixel budget (:func:`~bayesnet.imaging.limits.check_pixel_count`) is
  enforced without decoding; Pillow's own idea of the size is checked again once it has opened the
  file. Only 8-bit JPEG is read; 12-bit JPEG and JPEG-LS are refused.
* **Intensity range.** Samples are divided by the maximum of their stored bit depth (255 or 65535),
  never by the image's own maximum.
* **Colour, alpha, orientation.** Colour is reduced to gray by luminance (with a warning when the
  channels differ), alpha is ignored with a warning, and the EXIF Orientation tag is applied so the
  pixels are in display orientation.
* **Complete data only.** A PNG's chunks must reach IEND with every IDAT checksum right, and a JPEG's
  scan data must cover the whole image (:mod:`~bayesnet.imaging.integrity`): gray and RGB JPEG are
  decoded by libjpeg-turbo in strict mode (the same pixels as Pillow's, which would fill what a
  truncated scan lacks with grey); other JPEG modes are checked that way and decoded by Pillow.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, UnidentifiedImageError

from bayesnet.errors import CorruptImageError, ImageError, TruncatedImageError, UnsupportedFormatError
from bayesnet.imaging.decoded import WARN_ALPHA, DecodedImage, luminance_to_unit, rows_to_unit
from bayesnet.imaging.integrity import (
    JpegColorspace,
    check_jpeg_complete,
    check_png_chunks,
    data_ends_early,
    decode_jpeg_strict,
)
from bayesnet.imaging.limits import check_pixel_count
from bayesnet.imaging.sniff import ACCEPTED_FORMATS, PNG_SIGNATURE

# JPEG markers (the byte after 0xFF), classified exactly as Pillow's JpegImagePlugin.MARKER does, so
# the header walk below sees every frame header Pillow will. SOFn frame headers carry the image
# size (DHP, 0xDE, is a frame header in Pillow too); JPG (C8), RSTn, SOI, EOI and JPGn (F0-FD) have
# no length field; every other marker from C0 to FE is a segment with a length. F7 (JPGn in
# Pillow) is JPEG-LS's SOF55, only noted to name the format.
_JPEG_SOF_MARKERS: Final[frozenset[int]] = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE}
)
# DCT-coded frame headers (baseline, extended, progressive; Huffman or arithmetic): the ones libjpeg can decode
# at a reduced scale. Lossless (C3, CB) and hierarchical frames are always decoded at full size.
_JPEG_DCT_SOF_MARKERS: Final[frozenset[int]] = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
_JPEG_NO_LENGTH_MARKERS: Final[frozenset[int]] = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_LS_SOF: Final[int] = 0xF7
_JPEG_SOS: Final[int] = 0xDA

# What holds a format's pixels, as named in messages about it.
_COMPRESSED_DATA: Final[dict[str, str]] = {
    "png": "PNG's compressed image data (IDAT)",
    "jpeg": "JPEG's compressed data",
}
# Pillow modes of JPEG files whose pixels libjpeg-turbo's strict decode gives directly.
_STRICT_JPEG_MODES: Final[dict[str, JpegColorspace]] = {"L": "GRAY", "RGB": "RGB"}
# EXIF Orientation (2..8) -> the transposition that displays the stored pixels upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Each transposition as a numpy view of ``(H, W, C)`` samples, giving the pixels Pillow's ``transpose`` gives.
_TRANSPOSE_VIEWS: Final[dict[Image.Transpose, Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]]]] = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1],
    Image.Transpose.FLIP_TOP_BOTTOM: lambda a: a[::-1],
    Image.Transpose.ROTATE_90: lambda a: np.rot90(a, 1),
    Image.Transpose.ROTATE_180: lambda a: a[::-1, ::-1],
    Image.Transpose.ROTATE_270: lambda a: np.rot90(a, -1),
    Image.Transpose.TRANSPOSE: lambda a: a.swapaxes(0, 1),
    Image.Transpose.TRANSVERSE: lambda a: a[::-1, ::-1].swapaxes(0, 1),
}
# Transpositions that swap the axes (upright rows come from stored columns), and those whose upright rows come
# from the stored rows (or columns) counted from the other end.
_SWAPPING_TRANSPOSITIONS: Final[frozenset[Image.Transpose]] = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}
)
_REVERSING_TRANSPOSITIONS: Final[frozenset[Image.Transpose]] = frozenset(
    {Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90, Image.Transpose.TRANSVERSE}
)


@dataclass(frozen=True)
class RasterHeader:
    """Size and sample depth read from a PNG IHDR or JPEG SOFn header without decoding pixels.

    ``color_type`` is the PNG IHDR colour type (0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA), ``components``
    the JPEG frame's component count, ``scalable`` whether every JPEG frame is DCT-coded (libjpeg can then decode
    it at a reduced scale).
    """

    width: int
    height: int
    bit_depth: int
    color_type: int = 0
    components: int = 1
    scalable: bool = False


def png_header(data: bytes) -> RasterHeader:
    """Parse the PNG IHDR chunk (always the first chunk) with its CRC."""
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13 + 4
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
    width, height, bit_depth, color_type = struct.unpack_from(">IIBB", data, 16)
    if width == 0 or height == 0:
        raise CorruptImageError(f"The PNG file declares an empty image ({width} x {height} pixels).")
    return RasterHeader(width, height, bit_depth, color_type=color_type)


def jpeg_header(data: bytes) -> RasterHeader:
    """Walk the JPEG markers up to the first scan and return the frame header (SOFn) values.

    The walk follows Pillow's own (junk bytes between segments skipped, the same markers with and
    without a length), so every frame header Pillow would use is seen here first; the largest one
    is used for the pixel guard.
    """
    frames: list[tuple[int, int, int, int]] = []  # (precision, height, width, components), as stored in SOFn
    dct = True
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
            frames.append(struct.unpack_from(">BHHB", data, pos + 2))
            dct = dct and marker in _JPEG_DCT_SOF_MARKERS
        if marker == _JPEG_SOS:
            break
        pos += length
    if jpeg_ls:
        raise UnsupportedFormatError(
            f"The file is a JPEG-LS image, which this service does not read. Send the radiograph as {ACCEPTED_FORMATS}."
        )
    if not frames:
        raise CorruptImageError("The JPEG file is damaged: it has no frame header (SOF) before its data.")
    if any(frame[0] != 8 for frame in frames):
        bits = max(frame[0] for frame in frames)
        raise UnsupportedFormatError(
            f"The JPEG file uses {bits}-bit samples; only 8-bit JPEG is read. "
            "Send a 16-bit PNG or the original DICOM instead."
        )
    if any(frame[1] == 0 or frame[2] == 0 for frame in frames):
        raise CorruptImageError("The JPEG file declares a zero width or height (a DNL-marker height is not supported).")
    _, height, width, components = max(frames, key=lambda frame: frame[1] * frame[2])
    return RasterHeader(width, height, 8, components=components, scalable=dct)


def pillow_limit(max_pixels: int) -> int:
    """Cap ``max_pixels`` at Pillow's own bomb threshold so Pillow never warns or raises for size."""
    pillow_max = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow_max) if pillow_max else max_pixels


def decode_png(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a PNG; the size guard reads IHDR, and the chunk check IDAT and IEND, before Pillow touches the data."""
    header = png_header(data)
    check_pixel_count("PNG file", header.width, header.height, 1, pillow_limit(max_pixels))
    check_png_chunks(data)
    return _decode_with_pillow(data, "png", header, max_pixels, complete=True)


def decode_jpeg(data: bytes, max_pixels: int, *, max_side: int | None = None) -> DecodedImage:
    """Decode an 8-bit JPEG; the size guard reads the SOFn frame header before Pillow does.

    ``max_side``: when the long side is at least twice this, a DCT-coded gray or RGB JPEG is decoded by
    libjpeg-turbo's DCT scaling at the smallest scale (a multiple of 1/8) whose long side is still ``>= max_side``:
    a fraction of the memory and time, for a picture that will be shown smaller anyway (pixels differ slightly from
    a full decode resized, so model inputs never use it). Any other JPEG is decoded at full size.
    """
    header = jpeg_header(data)
    check_pixel_count("JPEG file", header.width, header.height, 1, pillow_limit(max_pixels))
    complete = data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return _decode_with_pillow(data, "jpeg", header, max_pixels, complete=complete, max_side=max_side)


def _decode_with_pillow(
    data: bytes, fmt: str, header: RasterHeader, max_pixels: int, *, complete: bool, max_side: int | None = None
) -> DecodedImage:
    """Open, size-check, load, orient and convert an image with Pillow.

    ``complete`` says whether the file ends with its format's end marker; a decode failure of a file
    without one is reported as truncation, the usual cause (an interrupted upload). ``max_side``: see
    :func:`decode_jpeg`.
    """
    name = fmt.upper()
    try:
        with Image.open(io.BytesIO(data), formats=[name]) as opened:
            # Defence in depth: Pillow's idea of the size must agree with the header check.
            width, height = opened.size
            check_pixel_count(f"{name} file", width, height, 1, pillow_limit(max_pixels))
            mode = opened.mode
            samples = _strict_jpeg_samples(data, opened, header, max_side) if fmt == "jpeg" else None
            if samples is None:
                opened.load()
            warnings: list[str] = []
            if getattr(opened, "n_frames", 1) > 1:
                warnings.append("only the first frame of a multi-frame file was read")
            orientation = _exif_transposition(opened.getexif().get(0x0112, 1), warnings)
            if samples is not None:
                upright = samples if orientation is None else _TRANSPOSE_VIEWS[orientation](samples)
                pixels = _samples_to_gray(upright, warnings)
            else:
                pixels = _pillow_to_gray(opened, orientation, header, warnings)
    except ImageError:
        raise
    except UnidentifiedImageError as err:
        raise CorruptImageError(
            f"The {name} file is damaged: its header could not be read. Export the image again."
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        reason = str(err)[:200]
        if not complete or "truncated" in reason.lower() or isinstance(err, EOFError):
            raise data_ends_early(_COMPRESSED_DATA[fmt]) from err
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


def _strict_jpeg_samples(
    data: bytes, opened: ImageFile.ImageFile, header: RasterHeader, max_side: int | None
) -> npt.NDArray[np.uint8] | None:
    """A gray or RGB JPEG's samples ``(H, W, 1 | 3)`` by libjpeg-turbo's strict decode; None: decode with Pillow.

    The strict decode refuses a JPEG whose scan data is truncated or damaged; a JPEG in another mode (CMYK) is
    checked the same way and then decoded by Pillow (a second decode, for a mode no radiograph is stored in), as
    is one the strict decode gives no verdict on (:func:`~bayesnet.imaging.integrity.decode_jpeg_strict`). The
    samples are used as they are, never copied into a Pillow image. ``max_side``: see :func:`decode_jpeg`.
    """
    what = _COMPRESSED_DATA["jpeg"]
    colorspace = _STRICT_JPEG_MODES.get(opened.mode)
    if colorspace is None:
        check_jpeg_complete(data, what=what, rows=opened.height, columns=opened.width)
        return None
    min_height = min_width = 0
    if max_side is not None and header.scalable and max(opened.size) >= 2 * max_side:
        if opened.width >= opened.height:
            min_width = max_side
        else:
            min_height = max_side
    pixels = decode_jpeg_strict(data, colorspace, what=what, min_height=min_height, min_width=min_width)
    scaled = min_height > 0 or min_width > 0
    if pixels is not None and not _is_scaled_size(pixels.shape[:2], (opened.height, opened.width), scaled):
        raise CorruptImageError(
            f"The JPEG file is damaged: its data decodes to {pixels.shape[1]} x {pixels.shape[0]} "
            f"pixels, not the {opened.width} x {opened.height} its header declares."
        )
    return pixels


def _is_scaled_size(decoded: tuple[int, ...], declared: tuple[int, int], scaled: bool) -> bool:
    """Whether ``decoded`` (rows, columns) is ``declared``, or with ``scaled`` libjpeg's ``ceil(n * k / 8)`` of it
    for one scale ``k / 8``, ``k`` in 1..8."""
    if not scaled:
        return tuple(decoded) == declared
    return any(tuple(decoded) == tuple(-(-side * k // 8) for side in declared) for k in range(1, 9))


def _exif_transposition(orientation: object, warnings: list[str]) -> Image.Transpose | None:
    """The transposition that displays the stored pixels upright per the EXIF Orientation tag (2..8), noted in
    ``warnings``; None for none. Applied as a numpy view of the samples or of each strip read from Pillow (the same
    pixels as Pillow's ``transpose``), never as a transposed copy of the whole image."""
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is not None:
        warnings.append(f"EXIF orientation {orientation} applied")
    return method


def _samples_to_gray(samples: npt.NDArray[np.uint8], warnings: list[str]) -> npt.NDArray[np.float32]:
    """8-bit gray ``(H, W, 1)`` or RGB ``(H, W, 3)`` samples -> float32 ``(H, W)`` in [0, 1], as the Pillow path
    converts an ``L`` or ``RGB`` image (:func:`_pillow_to_gray`)."""
    height, width = samples.shape[:2]
    if samples.shape[2] == 1:
        return rows_to_unit(height, width, lambda rows: _unit_float32(samples[rows, :, 0], 255.0))
    return luminance_to_unit(lambda rows: samples[rows], height, width, 255.0, warnings)


def _unit_float32(samples: npt.NDArray[Any], full_scale: float) -> npt.NDArray[np.float32]:
    """Samples as float32 divided by ``full_scale`` in float32 (exact for 8- and 16-bit samples' own values)."""
    pixels = np.asarray(samples, dtype=np.float32)
    pixels /= np.float32(full_scale)
    return pixels


def _pillow_rows(
    image: Image.Image, orientation: Image.Transpose | None, convert: str | None = None
) -> tuple[int, int, Callable[[slice], npt.NDArray[Any]]]:
    """``(height, width, strip)`` of ``image`` shown upright per ``orientation``: ``strip(rows)`` is that block of
    the upright image's rows as an array (converted to mode ``convert``), read from the strip of stored rows or
    columns it comes from and turned by the same view as :data:`_TRANSPOSE_VIEWS`.

    A Pillow image is read into numpy a strip at a time, never as one full-size copy (``np.asarray`` of a whole
    image copies it through ``tobytes``, and ``transpose`` makes a transposed copy).
    """
    width, height = image.size
    view = _TRANSPOSE_VIEWS[orientation] if orientation is not None else None
    swaps = orientation in _SWAPPING_TRANSPOSITIONS
    # The stored rows (or, when the axes swap, columns) that the upright rows ``rows`` come from, in order.
    reversed_rows = orientation in _REVERSING_TRANSPOSITIONS
    stored_side = width if swaps else height

    def strip(rows: slice) -> npt.NDArray[Any]:
        start, stop = (stored_side - rows.stop, stored_side - rows.start) if reversed_rows else (rows.start, rows.stop)
        box = (start, 0, stop, height) if swaps else (0, start, width, stop)
        part = image.crop(box)
        samples = np.asarray(part if convert is None else part.convert(convert))
        return samples if view is None else view(samples)

    return (width, height, strip) if swaps else (height, width, strip)


def _pillow_to_gray(
    image: Image.Image, orientation: Image.Transpose | None, header: RasterHeader, warnings: list[str]
) -> npt.NDArray[np.float32]:
    """Convert a loaded Pillow image, shown upright per ``orientation``, to float32 ``(H, W)`` in [0, 1] without
    any per-image scaling.

    Gray samples are divided by the maximum of their stored depth; colour is reduced by luminance
    in float (a warning only when the channels actually differ); alpha is ignored. Strips of rows are converted
    one at a time (:func:`_pillow_rows`), each by the same arithmetic a whole image would get.
    """
    mode = image.mode
    height, width, strips = _pillow_rows(image, orientation)
    if mode == "1":
        return rows_to_unit(height, width, lambda rows: np.asarray(strips(rows), dtype=np.float32))
    if mode in {"I;16", "I;16L", "I;16B", "I;16N"}:
        return rows_to_unit(height, width, lambda rows: _unit_float32(strips(rows), 65535.0))
    if mode == "I":
        # 32-bit container Pillow may use for 16-bit (or lower) grayscale PNG.
        full_scale = float(2 ** (header.bit_depth if header.bit_depth in (8, 16) else 16) - 1)
        return rows_to_unit(
            height, width, lambda rows: np.clip(np.asarray(strips(rows), dtype=np.float64) / full_scale, 0.0, 1.0)
        )
    if mode == "L":
        return rows_to_unit(height, width, lambda rows: _unit_float32(strips(rows), 255.0))
    if mode == "LA":
        warnings.append(WARN_ALPHA)
        return rows_to_unit(height, width, lambda rows: _unit_float32(strips(rows)[..., 0], 255.0))
    if header.bit_depth == 16 and mode in {"RGB", "RGBA"}:
        warnings.append("16-bit colour reduced to 8 bits per channel by the decoder")
    if mode in {"P", "PA"}:
        has_alpha = mode == "PA" or "transparency" in image.info
        mode = "RGBA" if has_alpha else "RGB"
        _, _, strips = _pillow_rows(image, orientation, convert=mode)
    elif mode in {"CMYK", "YCbCr", "LAB", "HSV"}:
        warnings.append(f"{mode} image converted to RGB")
        mode = "RGB"
        _, _, strips = _pillow_rows(image, orientation, convert=mode)
    if mode == "RGBA":
        warnings.append(WARN_ALPHA)
    elif mode != "RGB":
        raise UnsupportedFormatError(
            f"The image uses the pixel mode {mode!r}, which this service does not read. "
            "Save it as an 8- or 16-bit grayscale PNG."
        )
    return luminance_to_unit(strips, height, width, 255.0, warnings)
