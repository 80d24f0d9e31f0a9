"""Where an upload's sha256 is taken: in the decode thread for a small upload (no hop of its own), beside the
prediction for a big one, after the refusal when nothing decoded it; the recorded digest is the same."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Future
from typing import Any

import pytest

from service.audit.recorder import Auditor, AuditSubject
from service.errors import BadRequestParameterError
from service.schemas import AuditRecord, ModelRef
from service.uploads import INLINE_HASH_BYTES, Upload, as_upload

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


def _audit(upload: Upload, prediction: Any) -> AuditRecord:
    writer = _Writer()
    auditor = Auditor(writer, rolling_window=4)  # type: ignore[arg-type]
    with pytest.raises(BadRequestParameterError):
        asyncio.run(auditor.audited(SUBJECT, upload, prediction))
    (record,) = writer.records
    return record


def test_upload_hashes_once_and_wraps_bytes_only_once() -> None:
    upload = Upload(b"radiograph")
    assert not upload.hashed and as_upload(upload) is upload and as_upload(b"x").data == b"x"
    assert upload.sha256() == hashlib.sha256(b"radiograph").hexdigest() and upload.hashed and len(upload) == 10


def test_a_small_upload_is_hashed_by_the_decoder_without_a_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\x89PNG" + bytes(5000)
    upload = Upload(data)

    async def no_hop(*_: Any, **__: Any) -> None:
        raise AssertionError("the digest took a thread hop of its own")

    async def prediction() -> None:
        assert upload.hash_when_decoded  # what the pipeline's decode thread checks
        upload.sha256()  # ... and does, right after decoding
        raise BadRequestParameterError("refused after decoding")

    monkeypatch.setattr(asyncio, "to_thread", no_hop)
    record = _audit(upload, prediction())
    assert record.input_sha256 == hashlib.sha256(data).hexdigest() and record.input_bytes == len(data)


def test_a_big_upload_is_hashed_beside_the_prediction() -> None:
    data = bytes(INLINE_HASH_BYTES + 1)
    upload = Upload(data)

    async def prediction() -> None:
        assert not upload.hash_when_decoded  # milliseconds of hashing stay out of the decode thread
        raise BadRequestParameterError("refused")

    assert _audit(upload, prediction()).input_sha256 == hashlib.sha256(data).hexdigest()


def test_an_upload_refused_before_decoding_is_hashed_afterwards() -> None:
    data = b"not an image"

    async def prediction() -> None:
        raise BadRequestParameterError("refused before decoding")

    assert _audit(Upload(data), prediction()).input_sha256 == hashlib.sha256(data).hexdigest()
