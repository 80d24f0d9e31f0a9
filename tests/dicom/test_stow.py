"""``POST /dicomweb/studies`` (STOW-RS): each instance scored or failed with a reason, never a lost sibling."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from service.dicom.stow import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE
from tests.dicom.conftest import ADMIN_KEY
from tests.dicom.dicom_files import SHARED_SIIM, audit_records, chest_cr, multiframe_ct, to_bytes
from tests.service.live import LiveServer, live_server, tiny_settings
from tests.service.test_api import png_bytes

# DICOM JSON tags of the STOW-RS response (PS3.18 F.2).
REFERENCED_SOP = "00081199"
FAILED_SOP = "00081198"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
TEXT_VALUE = "0040A160"


def related(parts: list[tuple[bytes, str]], part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body (PS3.18 8.6.1.2) and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for data, kind in parts)
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="{part_type}"; boundary={boundary}'


def stow(client: httpx.Client, parts: list[tuple[bytes, str]], **kwargs: str) -> httpx.Response:
    body, content_type = related(parts, **kwargs)
    return client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})


def items(body: dict[str, object], tag: str) -> list[dict[str, dict[str, list[object]]]]:
    element = body.get(tag)
    if element is None:
        return []
    assert isinstance(element, dict)
    value: list[dict[str, dict[str, list[object]]]] = element.get("Value", [])
    return value


@pytest.fixture
def client(dicom_server: LiveServer) -> Iterator[httpx.Client]:
    with dicom_server.client() as c:
        yield c


def siim(**changes: object) -> bytes:
    if not SHARED_SIIM.is_file():
        pytest.skip(f"{SHARED_SIIM} is absent (only on the project's machines)")
    ds = pydicom.dcmread(SHARED_SIIM)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return to_bytes(ds)


def uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_each_bad_instance_fails_alone_with_a_reason_and_the_good_ones_are_scored(client: httpx.Client) -> None:
    good = chest_cr()
    lateral = siim(ViewPosition="LL")
    knee = siim(BodyPartExamined="KNEE")
    complete = siim()
    truncated = complete[: len(complete) // 2]
    parts = [
        (good, "application/dicom"),
        (png_bytes(), "application/dicom"),  # a PNG sent as if DICOM: sniffed, not trusted
        (multiframe_ct(), "application/dicom"),
        (lateral, "application/dicom"),
        (knee, "application/dicom"),
        (truncated, "application/dicom"),
        (complete, "application/dicom"),
    ]
    response = stow(client, parts)
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()

    scored = items(body, REFERENCED_SOP)
    assert [item[SOP_INSTANCE]["Value"][0] for item in scored] == [uid_of(good), uid_of(complete)]
    failed = items(body, FAILED_SOP)
    assert len(failed) == 5
    reasons = [item[FAILURE_REASON]["Value"][0] for item in failed]
    texts = [str(item[TEXT_VALUE]["Value"][0]) for item in failed]
    assert reasons[0] == CANNOT_UNDERSTAND and "PNG" in texts[0] and SOP_INSTANCE not in failed[0]
    assert reasons[1] == PROCESSING_FAILURE and ("CT" in texts[1] or "frames" in texts[1])
    assert reasons[2] == PROCESSING_FAILURE and "lateral" in texts[2]
    assert failed[2][SOP_INSTANCE]["Value"][0] == uid_of(lateral)
    assert reasons[3] == PROCESSING_FAILURE and "Body Part" in texts[3]
    assert reasons[4] == PROCESSING_FAILURE and ("truncated" in texts[4] or "damaged" in texts[4])

    # One audit record per instance, scored or refused.
    records = audit_records(client, response.headers["x-request-id"], ADMIN_KEY)
    assert sorted(record["item_index"] for record in records) == list(range(len(parts)))
    assert sorted(record["status"] for record in records) == [200, 200, 415, 422, 422, 422, 422]


def test_all_scored_is_200_and_none_scored_is_409(client: httpx.Client) -> None:
    ok = stow(client, [(chest_cr(), "application/dicom")])
    assert ok.status_code == 200, ok.text
    assert FAILED_SOP not in ok.json() and len(items(ok.json(), REFERENCED_SOP)) == 1
    none = stow(client, [(b"not dicom at all", "application/dicom"), (png_bytes(), "image/png")])
    assert none.status_code == 409, none.text
    assert [item[FAILURE_REASON]["Value"][0] for item in items(none.json(), FAILED_SOP)] == [CANNOT_UNDERSTAND] * 2
    assert REFERENCED_SOP not in none.json()


def test_request_level_errors_are_problems(client: httpx.Client) -> None:
    wrong_type = stow(client, [(chest_cr(), "application/dicom")], part_type="application/dicom+json")
    assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.json()["detail"]
    form = client.post("/dicomweb/studies", files={"file": ("a.dcm", chest_cr())})
    assert form.status_code == 415
    body, content_type = related([(b"x", "application/dicom")])
    cut = client.post("/dicomweb/studies", content=body[:-20], headers={"Content-Type": content_type})
    assert cut.status_code == 400 and "closing boundary" in cut.json()["detail"]


def test_over_the_limits_is_413_and_an_oversized_instance_fails_alone(
    dicom_checkpoint: Path,
) -> None:
    settings = tiny_settings(dicom_checkpoint, max_upload_bytes=1024 * 1024, max_files_per_request=8)
    small = siim()
    with live_server(settings) as live, live.client() as client:
        too_many = stow(client, [(small, "application/dicom")] * 9)
        assert too_many.status_code == 413 and "At most 8" in too_many.json()["detail"]
        # 7 MB: under the body limit (8 instances of 1 MiB), over the limit of one instance.
        one_big = stow(client, [(small, "application/dicom"), (chest_cr(), "application/dicom")])
        assert one_big.status_code == 202, one_big.text
        (failed,) = items(one_big.json(), FAILED_SOP)
        assert failed[FAILURE_REASON]["Value"][0] == OUT_OF_RESOURCES
        body, content_type = related([(chest_cr(), "application/dicom")] * 2)
        huge = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
        assert huge.status_code == 413
        assert client.get("/readyz").status_code == 200
