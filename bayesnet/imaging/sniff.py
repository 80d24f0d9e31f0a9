"""Recognise an upload's format from its content (magic bytes), never from a file name.

:func:`sniff_format` names the formats that are decoded: PNG, JPEG and DICOM Part 10. For anything
else, :func:`raise_unrecognised` says what the bytes are when it can tell (GIF, TIFF, PDF, an archive,
an HTML page...), so that the error tells the user what to send instead.

* **DICOM without the Part 10 header.** Only DICOM Part 10 files (``"DICM"`` at byte 128) are
  read. A bare dataset without preamble and file meta information is recognised by a heuristic and
  refused with :class:`UnsupportedFormatError`: reading it would need ``pydicom``'s ``force=True``,
  which parses almost any bytes as "DICOM" and has to guess the transfer syntax.
"""

from __future__ import annotations

import struct
from typing import Final, NoReturn

from bayesnet.errors import NotAnImageError, UnsupportedFormatError

ACCEPTED_FORMATS: Final[str] = "PNG, JPEG or DICOM"

PNG_SIGNATURE: Final[bytes] = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE: Final[bytes] = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET: Final[int] = 128
_DICOM_MAGIC: Final[bytes] = b"DICM"


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
    if data.startswith(PNG_SIGNATURE):
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


def raise_unrecognised(data: bytes) -> NoReturn:
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
