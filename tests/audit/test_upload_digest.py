"""The audit record's sha256 of the upload: taken beside the prediction, the same whatever became of it."""

from __future__ import annotations

import asyncio
import hashlib
import io
from concurrent.futures import Future
from typing import Any

import pytest

from service.audit.recorder import Auditor, AuditSubject
from service.errors import BadRequestParameterError
from service.schemas import AuditRecord, ModelRef

MODEL = ModelRef(name="m", version="1", sha256="ab" * 32)
SUBJECT = AuditSubject(route="/v1/predict", request_id="r-1", client_id=None, model=MODEL)


class _Writer:
    """Stands in for the audit writer: every record is durable at once."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def submit(self, record: AuditRecord) -> Future[None]:
        self.records.append(record)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _audit(data: bytes, prediction: Any) -> AuditRecord:
    writer = _Writer()
    auditor = Auditor(writer, rolling_window=4)  # type: ignore[arg-type]
    with pytest.raises(BadRequestParameterError):
        asyncio.run(auditor.audited(SUBJECT, data, prediction))
    (record,) = writer.records
    return record


@pytest.mark.parametrize("size", [0, 5000, (1 << 20) + 1])
def test_the_record_carries_the_uploads_sha256_and_size(size: int) -> None:
    data = b"\x89PNG" + bytes(size)

    async def prediction() -> None:
        await asyncio.sleep(0)
        raise BadRequestParameterError("refused after decoding")

    record = _audit(data, prediction())
    assert record.input_sha256 == hashlib.sha256(data).hexdigest() and record.input_bytes == len(data)


def test_the_digest_is_taken_in_a_thread_beside_the_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing a multi-megabyte DICOM takes milliseconds: never on the event loop, never after the answer."""
    hashed_in: list[str] = []
    real_to_thread = asyncio.to_thread

    async def to_thread(fn: Any, *args: Any) -> Any:
        hashed_in.append(fn.__name__)
        return await real_to_thread(fn, *args)

    async def prediction() -> None:
        await asyncio.sleep(0)  # the prediction's first wait (decoding, in the service)
        assert hashed_in == ["_fingerprint"]  # the digest is already on its way, in a thread
        raise BadRequestParameterError("refused")

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    data = b"not an image"
    assert _audit(data, prediction()).input_sha256 == hashlib.sha256(data).hexdigest()


def test_a_dicom_upload_is_known_by_its_uids_digests_and_never_by_its_uids() -> None:
    """How a verdict sent by Study or SOP Instance UID finds its film: the record holds their sha256 only."""
    import pydicom

    from service.audit.uids import uid_digest
    from tests.dicom.dicom_files import chest_cr

    data = chest_cr()
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)

    async def prediction() -> None:
        raise BadRequestParameterError("refused")

    record = _audit(data, prediction())
    assert record.study_uid_sha256 == uid_digest(str(header.StudyInstanceUID))
    assert record.sop_uid_sha256 == uid_digest(str(header.SOPInstanceUID))
    assert str(header.StudyInstanceUID) not in record.model_dump_json()
    png = _audit(b"\x89PNG" + bytes(100), prediction())
    assert png.study_uid_sha256 is None and png.sop_uid_sha256 is None
