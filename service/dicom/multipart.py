"""``multipart/related`` bodies (RFC 2387, as DICOMweb STOW-RS uses them: PS3.18 8.6.1.2).

Starlette parses ``multipart/form-data`` only; a STOW-RS request is ``multipart/related; type="application/dicom";
boundary=...`` with one DICOM Part 10 file per part. The parts are split on the delimiter (RFC 2046 5.1.1: a part's
body ends at the CRLF that precedes the next delimiter), so binary content passes through byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass


class MultipartError(ValueError):
    """The request is not a ``multipart/related`` body this receiver can split; the message says why."""


@dataclass(frozen=True)
class Part:
    """One body part: its ``Content-Type`` (lower-case, without parameters; "" when absent) and bytes."""

    content_type: str
    data: bytes


def media_type_params(header: str) -> tuple[str, dict[str, str]]:
    """``("type/subtype", {param: value})`` of a Content-Type header; names and the type lower-cased."""
    kind, *rest = header.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, eq, value = item.partition("=")
        if eq:
            params[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), params


def split_related(content_type: str, body: bytes, *, max_parts: int) -> list[Part]:
    """The parts of a ``multipart/related`` ``body``; ``MultipartError`` for a body that is not one.

    More than ``max_parts`` parts is refused as a whole (``TooManyPartsError``) before any part is used.
    """
    kind, params = media_type_params(content_type)
    if kind != "multipart/related":
        raise MultipartError(f"expected Content-Type multipart/related, got {kind or 'none'}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("the multipart/related Content-Type has no boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    # A CRLF in front lets a body that opens with its delimiter split like the rest; chunk 0 is the preamble.
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 2:
        raise MultipartError("the body does not contain its boundary delimiter")
    parts: list[Part] = []
    closed = False
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            closed = True
            break
        if len(parts) == max_parts:
            raise TooManyPartsError(f"more than {max_parts} parts in one request")
        _padding, eol, rest = chunk.partition(b"\r\n")  # the rest of the delimiter line
        if not eol:
            raise MultipartError("a boundary delimiter is not followed by a line break")
        if rest.startswith(b"\r\n"):
            head, data = b"", rest[2:]  # a part without headers
        else:
            head, sep, data = rest.partition(b"\r\n\r\n")
            if not sep:
                raise MultipartError("a part has no blank line between its headers and its content")
        part_type = ""
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if colon and name.strip().lower() == "content-type":
                part_type = media_type_params(value)[0]
        parts.append(Part(part_type, data))
    if not closed:
        raise MultipartError("the body ends before its closing boundary delimiter (truncated upload?)")
    if not parts:
        raise MultipartError("the body holds no parts")
    return parts


class TooManyPartsError(MultipartError):
    """More parts than one request may carry."""
