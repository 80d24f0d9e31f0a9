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
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

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

# The encapsulated frames whose codestream header is checked against the DICOM header, by family.
_FRAME_FAMILIES: Final[dict[str, str]] = {
    **{str(uid): "JPEG" for uid in JPEGTransferSyntaxes},
    **{str(uid): "JPEG-LS" for uid in JPEGLSTransferSyntaxes},
    **{str(uid): "JPEG 2000" for uid in JPEG2000TransferSyntaxes},
}
# JPEG frame headers (SOFn: C0-CF but DHT C4, JPG C8, DAC CC), JPEG-LS's SOF55, SOS, and the markers with no length.
_JPEG_SOF: Final[frozenset[int]] = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC})
_JPEG_LS_SOF: Final[frozenset[int]] = frozenset({0xF7})
_JPEG_SOS: Final[int] = 0xDA
_JPEG_STANDALONE: Final[frozenset[int]] = frozenset({0x01, *range(0xD0, 0xDA)})

_PNG_HEADER_BYTES: Final[int] = 8  # the signature
_PNG_CHUNK_OVERHEAD: Final[int] = 12  # length, type, CRC

_J2K_SOC_SIZ: Final[bytes] = b"\xff\x4f\xff\x51"
_J2K_SIZ_END: Final[int] = 42  # SOC, then SIZ up to and including Csiz
_J2K_SOT: Final[bytes] = b"\xff\x90"
_J2K_SOT_SEGMENT_BYTES: Final[int] = 12  # marker, Lsot, Isot, Psot, TPsot, TNsot


def data_ends_early(what: str) -> TruncatedImageError:
    """The error for compressed pixel data that stops before the image is complete; ``what`` names the data."""
    return TruncatedImageError(f"The {what} ends before the last row of the image {_SEND_COMPLETE}")


def decode_jpeg_strict(
    data: bytes, colorspace: JpegColorspace, *, what: str, min_height: int = 0, min_width: int = 0
) -> npt.NDArray[np.uint8] | None:
    """Decode a JPEG with libjpeg-turbo, refusing truncated or damaged scan data; ``(H, W, C)`` uint8.

    ``what`` names the data in messages (``"JPEG's compressed data"``). Returns None when libjpeg-turbo gives no
    verdict on the scan data (a variant it does not read, or a warning about the headers only): the caller then
    decodes the file as it otherwise would. ``min_height`` / ``min_width`` (0: unused) ask for libjpeg-turbo's DCT
    scaling, the smallest scale whose output is at least that large; the caller must only ask it of a DCT-coded
    JPEG (simplejpeg 1.9 corrupts the heap when asked to scale a lossless one). The whole scan is entropy-decoded
    at any scale, so damage is found the same way.

    Raises:
        TruncatedImageError: the scan data ends before every block of the image is coded.
        CorruptImageError: the scan data is damaged.
    """
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=colorspace, strict=True, min_height=min_height, min_width=min_width
        )
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


def check_encapsulated_frame(
    pixel_data: bytes, transfer_syntax: UID, *, rows: int, columns: int, samples: int = 1
) -> None:
    """Check the one frame of a DICOM's encapsulated (compressed) Pixel Data, for the JPEG, JPEG-LS and JPEG 2000
    families.

    ``rows`` x ``columns`` (``samples`` per pixel) is the image the DICOM header declares. The frame's own header
    must declare that size, and no more components: the codec allocates what its codestream declares, before
    pydicom compares the result with the DICOM header, so a small frame declaring a gigantic image would otherwise
    be a decompression bomb behind the pixel-count check (:func:`~bayesnet.imaging.memory.decode_memory_bytes`
    relies on this). Then a JPEG frame must be complete, as a JPEG file must be, and a JPEG 2000 codestream must
    hold all its tile-parts. Other transfer syntaxes (RLE, whose decoder works to the DICOM header's size) and
    encapsulations pydicom cannot split are left to the pixel decoder, which reports them when it fails.

    Raises:
        CorruptImageError: the frame declares another size or more components, or is damaged.
        TruncatedImageError: the frame ends early.
    """
    family = _FRAME_FAMILIES.get(str(transfer_syntax))
    if family is None:
        return
    try:
        frame = next(generate_frames(pixel_data, number_of_frames=1), b"")
    except (ValueError, struct.error) as err:
        # Not swallowed: pydicom's pixel decoder meets the same encapsulation and reports it.
        logger.debug("encapsulated pixel data not split into frames (%s); left to the decoder", err)
        return
    what = f"{family} pixel data in the DICOM file"
    size = _j2k_size(frame, what) if family == "JPEG 2000" else _jpeg_frame_size(frame, what, family == "JPEG-LS")
    if size is not None:
        height, width, components = size
        if (height, width) != (rows, columns) or components > samples:
            raise CorruptImageError(
                f"The {what} declares {width} x {height} pixels with {components} component(s), not the "
                f"{columns} x {rows} with {samples} sample(s) its header declares; {_EXPORT_AGAIN}"
            )
    if family == "JPEG" and frame.startswith(b"\xff\xd8"):
        check_jpeg_complete(frame, what=what, rows=rows, columns=columns)
    elif family == "JPEG 2000" and frame.startswith(_J2K_SOC_SIZ):
        _check_j2k_tile_parts(frame)


def _jpeg_frame_size(frame: bytes, what: str, jpeg_ls: bool) -> tuple[int, int, int] | None:
    """``(height, width, components)`` from a JPEG or JPEG-LS frame's first SOF (SOF55 for JPEG-LS); None when
    the frame does not start with SOI (the decoder reports that).

    Bytes between segments that are not a marker are skipped, as libjpeg and Pillow skip them (with a warning).
    """
    if not frame.startswith(b"\xff\xd8"):
        return None
    sof = _JPEG_LS_SOF if jpeg_ls else _JPEG_SOF
    pos, end = 2, len(frame)
    while True:
        while pos < end and frame[pos] != 0xFF:
            pos += 1
        while pos < end and frame[pos] == 0xFF:
            pos += 1
        if pos + 3 > end:
            raise data_ends_early(what)
        marker = frame[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue
        (length,) = struct.unpack_from(">H", frame, pos)
        if marker in sof and length >= 8:
            if pos + 8 > end:
                raise data_ends_early(what)
            _, height, width, components = struct.unpack_from(">BHHB", frame, pos + 2)
            return height, width, components
        if marker == _JPEG_SOS or length < 2 or marker in sof:
            raise CorruptImageError(f"The {what} is damaged: it has no valid frame header; {_EXPORT_AGAIN}")
        pos += length


def _j2k_size(codestream: bytes, what: str) -> tuple[int, int, int] | None:
    """``(height, width, components)`` of a JPEG 2000 codestream's image, from its SIZ marker segment (ISO/IEC
    15444-1, A.5.1: the image area is ``Xsiz - XOsiz`` by ``Ysiz - YOsiz``); None when the frame is not a
    codestream (a JP2 file, say: the decoder reports it)."""
    if not codestream.startswith(_J2K_SOC_SIZ):
        return None
    if len(codestream) < _J2K_SIZ_END:
        raise data_ends_early(what)
    x_siz, y_siz, x_offset, y_offset = struct.unpack_from(">IIII", codestream, 8)
    (components,) = struct.unpack_from(">H", codestream, 40)
    return max(0, y_siz - y_offset), max(0, x_siz - x_offset), components


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
