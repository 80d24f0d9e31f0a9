"""Splitting STOW-RS bodies (``multipart/related``) and the forwarding settings, without a server."""

from __future__ import annotations

import pytest

from service.dicom.multipart import MultipartError, Part, TooManyPartsError, split_related
from service.dicom.stow import StowBodyError, StowMediaTypeError, split_request
from service.errors import UploadTooLargeError
from service.settings import Settings

TYPE = 'multipart/related; type="application/dicom"; boundary="b-1"'


def test_parts_keep_their_bytes_exactly_and_a_preamble_is_ignored() -> None:
    binary = b"\r\n--b-\r\n\x00\xff"  # looks like CRLF and a delimiter prefix, but is not the delimiter
    body = (
        b"preamble\r\n--b-1\r\nContent-Type: application/dicom\r\n\r\n"
        + binary
        + b"\r\n--b-1\r\n\r\nsecond\r\n--b-1--\r\nepilogue"
    )
    assert split_related(TYPE, body, max_parts=4) == [Part("application/dicom", binary), Part("", b"second")]


def test_bodies_that_cannot_be_split_say_why() -> None:
    with pytest.raises(MultipartError, match="no boundary"):
        split_related("multipart/related", b"", max_parts=4)
    with pytest.raises(MultipartError, match="closing boundary"):
        split_related(TYPE, b"--b-1\r\n\r\nx", max_parts=4)
    with pytest.raises(TooManyPartsError):
        split_related(TYPE, b"--b-1\r\n\r\nx\r\n--b-1\r\n\r\ny\r\n--b-1--", max_parts=1)


def test_request_level_errors_map_to_http_problems() -> None:
    with pytest.raises(StowMediaTypeError):
        split_request("multipart/form-data; boundary=b-1", b"", max_parts=4)
    with pytest.raises(StowMediaTypeError):
        split_request('multipart/related; type="application/dicom+json"; boundary=b-1', b"", max_parts=4)
    with pytest.raises(StowBodyError):
        split_request(TYPE, b"no delimiter", max_parts=4)
    with pytest.raises(UploadTooLargeError):
        split_request(TYPE, b"--b-1\r\n\r\nx\r\n--b-1\r\n\r\ny\r\n--b-1--", max_parts=1)


def test_forwarding_is_configured_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DICOMWEB_FORWARD_URL", "http://pacs:8042/dicom-web")
    settings = Settings()
    assert settings.dicomweb.forward_url == "http://pacs:8042/dicom-web"
    assert settings.dicomweb.outbox_path.name == "dicomweb-outbox"
