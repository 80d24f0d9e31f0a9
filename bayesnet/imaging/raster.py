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
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, UnidentifiedImageError

from bayesnet.errors import CorruptImageError, ImageError, TruncatedImageError, UnsupportedFormatError
from bayesnet.imaging.decoded import WARN_ALPHA, DecodedImage, luminance
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


@dataclass(frozen=True)
class _RasterHeader:
    """Size and sample depth read from a PNG IHDR or JPEG SOFn header without decoding pixels."""

    width: int
    height: int
    bit_depth: int


def _png_header(data: bytes) -> _RasterHeader:
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


def decode_png(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a PNG; the size guard reads IHDR, and the chunk check IDAT and IEND, before Pillow touches the data."""
    header = _png_header(data)
    check_pixel_count("PNG file", header.width, header.height, 1, _pillow_limit(max_pixels))
    check_png_chunks(data)
    return _decode_with_pillow(data, "png", header, max_pixels, complete=True)


def decode_jpeg(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode an 8-bit JPEG; the size guard reads the SOFn frame header before Pillow does."""
    header = _jpeg_header(data)
    check_pixel_count("JPEG file", header.width, header.height, 1, _pillow_limit(max_pixels))
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
            check_pixel_count(f"{name} file", width, height, 1, _pillow_limit(max_pixels))
            mode = opened.mode
            image = _load(data, opened, fmt)
            warnings: list[str] = []
            if getattr(opened, "n_frames", 1) > 1:
                warnings.append("only the first frame of a multi-frame file was read")
            image = _apply_exif_orientation(image, opened.getexif().get(0x0112, 1), warnings)
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


def _load(data: bytes, opened: ImageFile.ImageFile, fmt: str) -> Image.Image:
    """The decoded pixels of an opened file: gray and RGB JPEG by libjpeg-turbo's strict decode, the rest by Pillow.

    The strict decode refuses a JPEG whose scan data is truncated or damaged; a JPEG in another mode (CMYK) is
    checked the same way and then decoded by Pillow (a second decode, for a mode no radiograph is stored in), as
    is one the strict decode gives no verdict on (:func:`~bayesnet.imaging.integrity.decode_jpeg_strict`).
    """
    if fmt == "jpeg":
        what = _COMPRESSED_DATA[fmt]
        colorspace = _STRICT_JPEG_MODES.get(opened.mode)
        if colorspace is None:
            check_jpeg_complete(data, what=what, rows=opened.height, columns=opened.width)
        else:
            pixels = decode_jpeg_strict(data, colorspace, what=what)
            if pixels is not None:
                if pixels.shape[:2] != (opened.height, opened.width):
                    raise CorruptImageError(
                        f"The JPEG file is damaged: its data decodes to {pixels.shape[1]} x {pixels.shape[0]} "
                        f"pixels, not the {opened.width} x {opened.height} its header declares."
                    )
                return Image.fromarray(pixels[..., 0] if colorspace == "GRAY" else pixels)
    opened.load()
    return opened


def _apply_exif_orientation(image: Image.Image, orientation: object, warnings: list[str]) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag (2..8) so pixels are in display orientation."""
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return image
    warnings.append(f"EXIF orientation {orientation} applied")
    return image.transpose(method)


def _to_unit_float(image: Image.Image, full_scale: float) -> npt.NDArray[np.float32]:
    """Samples as float32 divided by ``full_scale``, in place: one full-size float array, not two (the division
    is the same IEEE operation either way; a 512 px film is 1 MB of float32, a 3,000 px one 36 MB)."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels /= np.float32(full_scale)
    return pixels


def _pillow_to_gray(image: Image.Image, bit_depth: int, warnings: list[str]) -> npt.NDArray[np.float32]:
    """Convert a loaded Pillow image to float32 ``(H, W)`` in [0, 1] without any per-image scaling.

    Gray samples are divided by the maximum of their stored depth; colour is reduced by luminance
    in float (a warning only when the channels actually differ); alpha is ignored.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode in {"I;16", "I;16L", "I;16B", "I;16N"}:
        return _to_unit_float(image, 65535.0)
    if mode == "I":
        # 32-bit container Pillow may use for 16-bit (or lower) grayscale PNG.
        depth = bit_depth if bit_depth in (8, 16) else 16
        gray = np.asarray(image, dtype=np.float64) / float(2**depth - 1)
        return np.clip(gray, 0.0, 1.0).astype(np.float32)
    if mode == "L":
        return _to_unit_float(image, 255.0)
    if mode == "LA":
        warnings.append(WARN_ALPHA)
        return _to_unit_float(image.getchannel("L"), 255.0)
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
    return (luminance(rgb, warnings) / 255.0).astype(np.float32)
