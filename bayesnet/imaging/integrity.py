"""Whether an image's compressed pixel data is complete and undamaged, before any of its pixels is trusted.

A file cut short (an interrupted upload or copy) is not always an error for the decoders. libjpeg fills the
rows a JPEG no longer holds with flat grey when a marker (an appended end-of-image marker, say) stops its scan
early, and Pillow ignores libjpeg's warnings; a bit flipped inside a PNG's IDAT can inflate to plausible wrong
pixels, since Pillow does not check IDAT checksums; a DICOM's JPEG frame cut short is decoded the same way. A
radiograph whose lower half is grey would still be scored. This module refuses such files with
:class:`~bayesnet.errors.TruncatedImageError` (the data ends early) or :class:`~bayesnet.errors.CorruptImageError`
(it is damaged), with a message that says which:

* **JPEG** is decoded by libjpeg-turbo through ``simplejpeg`` with ``strict=True``: libjpeg's warnings become
  errors instead of patched pixels. "Premature end of JPEG file" (the data ends inside a scan) and "Corrupt JPEG
  data: premature end of data segment" (a marker, such as an appended EOI, before the scans cover every block)
  are truncation; every other "Corrupt JPEG data" warning (a bad Huffman or arithmetic code, extraneous bytes
  before a marker, a missing restart marker) and an inconsistent progressive sequence are damage. Extraneous
  bytes are refused too: a bit flip in the scan data desynchronises the decoder, which then finds bytes left
  before the next marker, and this is how most such flips show. Any other outcome (an unknown JFIF revision, a
  variant libjpeg-turbo does not read, such as 12-bit data) gives no answer here, and the caller decodes as
  before (Pillow, or pydicom's decoders). The strict decode *is* the pixel decode for gray and RGB JPEG (its
  output equals Pillow's: both run libjpeg-turbo's accurate integer IDCT and fancy upsampling), so the check
  costs no second decode there. :func:`check_jpeg_complete` decodes at full size and keeps only the answer:
  libjpeg-turbo's DCT scaling would save little (the entropy decoding, which finds the problems, is the same at
  any scale), and simplejpeg 1.9 corrupts the heap when asked to scale a lossless (SOF3) JPEG.
* **PNG**: :func:`check_png_chunks` walks the chunks up to IEND (their lengths only) and checks the CRC-32 of
  every IDAT chunk (a small fraction of inflating them). A file that ends inside a chunk or without IEND is
  truncated, an IDAT whose checksum fails is damaged. A zlib stream that stops before the last row inside whole
  chunks is reported by the caller from Pillow's error (:func:`data_ends_early`).
* **DICOM**: uncompressed pixel data is measured against its declared size by the DICOM decoder. An encapsulated
  frame is checked here by :func:`check_encapsulated_frame`: a JPEG frame as a JPEG file is, a JPEG 2000
  codestream by its tile-part lengths (``Psot`` in each SOT marker segment), which must stay inside the
  codestream and end at its EOC marker.
"""

from __future__ import annotations

import logging
import struct
import zlib
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import simplejpeg
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGTransferSyntaxes

from bayesnet.errors import CorruptImageError, TruncatedImageError

logger = logging.getLogger(__name__)

JpegColorspace = Literal["GRAY", "RGB", "CMYK"]

_SEND_COMPLETE: Final[str] = "(the file is truncated or damaged); send the complete file."
_EXPORT_AGAIN: Final[str] = "its pixels cannot be trusted; export the image again from its source."

# libjpeg-turbo's warning texts (jerror.h): JWRN_JPEG_EOF, JWRN_HIT_MARKER, then the damage warnings.
_JPEG_TRUNCATION_WARNINGS: Final[tuple[str, ...]] = ("Premature end of JPEG file", "premature end of data segment")
_JPEG_DAMAGE_WARNINGS: Final[tuple[str, ...]] = ("Corrupt JPEG data", "Inconsistent progression sequence")
# The colour space simplejpeg.decode_jpeg_header reports -> the output that keeps every component.
_JPEG_CHECK_COLORSPACE: Final[dict[str, JpegColorspace]] = {
    "Gray": "GRAY",
    "RGB": "RGB",
    "YCbCr": "RGB",
    "CMYK": "CMYK",
    "YCCK": "CMYK",
}

_PNG_HEADER_BYTES: Final[int] = 8  # the signature
_PNG_CHUNK_OVERHEAD: Final[int] = 12  # length, type, CRC

_J2K_SOC_SIZ: Final[bytes] = b"\xff\x4f\xff\x51"
_J2K_SOT: Final[bytes] = b"\xff\x90"
_J2K_SOT_SEGMENT_BYTES: Final[int] = 12  # marker, Lsot, Isot, Psot, TPsot, TNsot


def data_ends_early(what: str) -> TruncatedImageError:
    """The error for compressed pixel data that stops before the image is complete; ``what`` names the data."""
    return TruncatedImageError(f"The {what} ends before the last row of the image {_SEND_COMPLETE}")


def decode_jpeg_strict(data: bytes, colorspace: JpegColorspace, *, what: str) -> npt.NDArray[np.uint8] | None:
    """Decode a JPEG with libjpeg-turbo, refusing truncated or damaged scan data; ``(H, W, C)`` uint8.

    ``what`` names the data in messages (``"JPEG's compressed data"``). Returns None when libjpeg-turbo gives no
    verdict on the scan data (a variant it does not read, or a warning about the headers only): the caller then
    decodes the file as it otherwise would.

    Raises:
        TruncatedImageError: the scan data ends before every block of the image is coded.
        CorruptImageError: the scan data is damaged.
    """
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except ValueError as err:
        _raise_for_jpeg_warning(str(err), what, err)
        logger.debug("libjpeg-turbo gives no verdict on this JPEG (%s); decoding it another way", err)
        return None
    return np.asarray(pixels, dtype=np.uint8)


def check_jpeg_complete(data: bytes, *, what: str, rows: int, columns: int) -> None:
    """Raise when a JPEG's scan data is truncated or damaged (see :func:`decode_jpeg_strict`); no pixels kept.

    ``rows`` x ``columns`` is the size the caller has checked against its pixel limit; a JPEG whose own header
    says otherwise is not decoded here (its decoder reports the mismatch), so this check never allocates more.
    """
    try:
        height, width, source_colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=True)
    except ValueError as err:
        _raise_for_jpeg_warning(str(err), what, err)
        logger.debug("libjpeg-turbo cannot read this JPEG's header (%s); the scan data is not checked", err)
        return
    colorspace = _JPEG_CHECK_COLORSPACE.get(str(source_colorspace))
    if colorspace is not None and (int(height), int(width)) == (rows, columns):
        decode_jpeg_strict(data, colorspace, what=what)


def _raise_for_jpeg_warning(message: str, what: str, err: ValueError) -> None:
    """Raise the domain error a libjpeg-turbo warning means; return for any other message."""
    if any(text in message for text in _JPEG_TRUNCATION_WARNINGS):
        raise data_ends_early(what) from err
    if message.startswith(_JPEG_DAMAGE_WARNINGS):
        # libjpeg's texts hold only counts and marker codes, nothing from the image's metadata.
        raise CorruptImageError(f"The {what} is damaged (libjpeg-turbo: {message[:120]}): {_EXPORT_AGAIN}") from err


def check_png_chunks(data: bytes) -> None:
    """Check that a PNG's chunks reach IEND whole and that every IDAT chunk passes its CRC-32.

    The IHDR chunk is the caller's (it is parsed, with its CRC, before this). Chunks other than IDAT are not
    checksummed here: Pillow checks those before the image data, and those after it carry no pixels.

    Raises:
        TruncatedImageError: the file ends inside a chunk, or without IEND.
        CorruptImageError: an IDAT chunk fails its checksum, or there is no IDAT chunk.
    """
    pos, end, idat_count = _PNG_HEADER_BYTES, len(data), 0
    view = memoryview(data)  # the checksummed chunks are not copied
    while pos + 8 <= end:
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        chunk_end = pos + _PNG_CHUNK_OVERHEAD + length
        name = chunk_type.decode("latin-1") if chunk_type.isalpha() else "unnamed"
        if chunk_end > end:
            present = max(0, end - pos - 8)
            raise TruncatedImageError(
                f"The PNG file is truncated: it ends inside its {name} chunk ({present:,} of its {length:,} "
                "data bytes present); send the complete file."
            )
        if chunk_type == b"IDAT":
            idat_count += 1
            (stored_crc,) = struct.unpack_from(">I", data, chunk_end - 4)
            if zlib.crc32(view[pos + 4 : chunk_end - 4]) != stored_crc:
                raise CorruptImageError(
                    f"The PNG's image data is damaged: IDAT chunk {idat_count} (at byte {pos:,}) fails its CRC-32 "
                    f"checksum; {_EXPORT_AGAIN}"
                )
        elif chunk_type == b"IEND":
            if idat_count == 0:
                raise CorruptImageError(
                    "The PNG file has no image data (no IDAT chunk before IEND); export the image again from its "
                    "source."
                )
            return
        pos = chunk_end
    raise TruncatedImageError(
        "The PNG file is truncated: it ends without the IEND chunk that closes every PNG; send the complete file."
    )


def check_encapsulated_frame(pixel_data: bytes, transfer_syntax: UID, *, rows: int, columns: int) -> None:
    """Check the one frame of a DICOM's encapsulated (compressed) Pixel Data, for the JPEG and JPEG 2000 families.

    ``rows`` x ``columns`` is the image size the DICOM header declares. Other transfer syntaxes (RLE, JPEG-LS...)
    and encapsulations pydicom cannot split are left to the pixel decoder, which reports them when it fails.
    """
    is_jpeg = transfer_syntax in JPEGTransferSyntaxes
    if not (is_jpeg or transfer_syntax in JPEG2000TransferSyntaxes):
        return
    try:
        frame = next(generate_frames(pixel_data, number_of_frames=1), b"")
    except (ValueError, struct.error) as err:
        # Not swallowed: pydicom's pixel decoder meets the same encapsulation and reports it.
        logger.debug("encapsulated pixel data not split into frames (%s); left to the decoder", err)
        return
    if is_jpeg and frame.startswith(b"\xff\xd8"):
        check_jpeg_complete(frame, what="JPEG pixel data in the DICOM file", rows=rows, columns=columns)
    elif frame.startswith(_J2K_SOC_SIZ):
        _check_j2k_tile_parts(frame)


def _check_j2k_tile_parts(codestream: bytes) -> None:
    """Raise TruncatedImageError when a JPEG 2000 codestream ends before its tile-parts do.

    Every main-header marker after SOC has a length; each tile-part starts with an SOT segment whose ``Psot`` is
    its length in bytes (ISO/IEC 15444-1, A.4.2), so the tile-parts must tile the codestream exactly up to EOC.
    ``Psot = 0`` (the last tile-part runs to EOC) and an unexpected marker end the walk with no verdict: the
    decoder is then the judge.
    """
    pos, end = 2, len(codestream)
    while pos + 4 <= end and codestream[pos : pos + 2] != _J2K_SOT:
        (length,) = struct.unpack_from(">H", codestream, pos + 2)
        pos += 2 + length
    while True:
        at_sot = codestream[pos : pos + 2] == _J2K_SOT
        if pos + 2 > end or (at_sot and pos + _J2K_SOT_SEGMENT_BYTES > end):
            raise TruncatedImageError(
                f"The JPEG 2000 pixel data in the DICOM file ends before its last tile {_SEND_COMPLETE}"
            )
        if not at_sot:  # EOC, or a marker this walk does not know
            return
        (tile_part_bytes,) = struct.unpack_from(">I", codestream, pos + 6)
        if tile_part_bytes < _J2K_SOT_SEGMENT_BYTES:
            return
        pos += tile_part_bytes
