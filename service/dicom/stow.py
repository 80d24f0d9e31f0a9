"""The STOW-RS receiver (PS3.18 10.5): score each DICOM instance of a ``multipart/related`` upload.

Each part is screened (a DICOM file, one frontal chest radiograph by its header), scored by the same pipeline as
``POST /v1/predict`` under its own audit record and, when a PACS is configured, turned into an SR
(``service.dicom.sr``) that is handed to the forwarding outbox. One part's failure is a Failed SOP Sequence item
with a Failure Reason and an explanation; it never touches its siblings. The answer is the STOW-RS response
dataset in DICOM JSON (PS3.18 F.2): Referenced SOP Sequence for the instances scored, Failed SOP Sequence for the
others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from bayesnet.imaging import POPULATION_LATERAL, POPULATION_NON_CHEST, population_flags
from service.dicom.multipart import MultipartError, Part, TooManyPartsError, media_type_params, split_related
from service.dicom.objects import pacs_objects
from service.dicom.sr import DicomSourceError, checked_source, with_header_warnings
from service.errors import ServiceError, UploadTooLargeError
from service.problems import problem_for
from service.runtime.heatmaps import AUTO
from service.runtime.pipeline import PredictionPipeline
from service.schemas import PredictionResponse

#: Failure Reason (0008,1197) values (PS3.4 Annex GG.4, PS3.18 10.5.3.1) this receiver answers.
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

#: Media type of the STOW-RS response body.
DICOM_JSON = "application/dicom+json"


class StowMediaTypeError(ServiceError):
    status = 415
    title = "Unsupported media type"


class StowBodyError(ServiceError):
    status = 400
    title = "Malformed multipart/related body"


def split_request(content_type: str, body: bytes, *, max_parts: int) -> list[Part]:
    """The instances of a STOW-RS request body; request-level errors (415, 400, 413) as ``ServiceError``."""
    kind, params = media_type_params(content_type)
    part_type = params.get("type", "application/dicom").lower()
    if kind != "multipart/related" or part_type != "application/dicom":
        raise StowMediaTypeError(
            'Send STOW-RS as Content-Type: multipart/related; type="application/dicom"; boundary=..., one DICOM '
            f"file per part (PS3.18 10.5); got {content_type[:200]!r}."
        )
    try:
        return split_related(content_type, body, max_parts=max_parts)
    except TooManyPartsError as err:
        raise UploadTooLargeError(f"At most {max_parts} instances per request; split the study.") from err
    except MultipartError as err:
        raise StowBodyError(f"The multipart/related body cannot be split: {err}.") from err


class NotADicomInstanceError(ServiceError):
    """A part that is not a DICOM instance an SR can reference (not DICOM, or without its UIDs)."""

    status = 415
    title = "Not a DICOM instance"


class OutsideScopeError(ServiceError):
    """A DICOM instance whose header says it is not a frontal chest radiograph (lateral view, other body part)."""

    status = 422
    title = "Not a frontal chest radiograph"


@dataclass(frozen=True)
class InstanceOutcome:
    """What became of one part: scored (``failure_reason`` None) or failed, and why."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure_reason: int | None = None
    detail: str | None = None


def read_instance(part: Part) -> tuple[Dataset, list[str]]:
    """The part's DICOM header and what it left out (``service.dicom.sr.checked_source``;
    ``NotADicomInstanceError`` for a part that is not a DICOM instance)."""
    if part.content_type not in ("", "application/dicom"):
        raise NotADicomInstanceError(
            f"The part's Content-Type is {part.content_type[:100]}; STOW-RS parts must be application/dicom files."
        )
    try:
        return checked_source(part.data)
    except DicomSourceError as err:
        raise NotADicomInstanceError(f"This part cannot be scored: {err}. Send DICOM Part 10 files.") from err


def check_scope(header: Dataset) -> None:
    """``OutsideScopeError`` unless the header allows a frontal chest radiograph (a header that is silent does).

    Header values are read to decide and never kept, returned or logged.
    """
    flags = population_flags(
        body_part=str(header.get("BodyPartExamined") or ""),
        view_position=str(header.get("ViewPosition") or ""),
        age=None,
    )
    if POPULATION_LATERAL in flags:
        raise OutsideScopeError(
            "This is a lateral or oblique view; the model reads frontal (PA or AP) chest films only."
        )
    if POPULATION_NON_CHEST in flags:
        raise OutsideScopeError("Its Body Part Examined is not the chest; the model reads chest radiographs only.")


def failure_reason_for(status: int) -> int:
    """The Failure Reason of a refused instance, from the HTTP status ``/v1/predict`` would have answered."""
    if status in (413, 503, 504):
        return OUT_OF_RESOURCES  # too big or too busy: the sender may retry later or send less
    if status == 415:
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


Audited = Callable[[int, bytes, Awaitable[PredictionResponse]], Awaitable[PredictionResponse]]


async def results_for_pacs(
    data: bytes, header: Dataset, result: PredictionResponse, pipeline: PredictionPipeline
) -> list[bytes]:
    """The objects a PACS receives for one scored instance (``service.dicom.objects.pacs_objects``), built in the
    pipeline's bounded decode pool: the heatmaps decode the film once more (the pipeline keeps no pixels), and the
    pool bounds how many films are in memory at once."""

    def build() -> list[bytes]:
        return pacs_objects(
            data,
            header,
            result,
            spec=pipeline.spec,
            max_pixels=pipeline.max_pixels,
            created=datetime.now(timezone.utc),
        )

    return await asyncio.get_running_loop().run_in_executor(pipeline.decode_pool, build)


async def receive(
    parts: list[Part],
    *,
    pipeline: PredictionPipeline,
    audited: Audited,
    request_id: str,
    max_upload_bytes: int,
    forward: Callable[[bytes], Awaitable[None]] | None = None,
) -> list[InstanceOutcome]:
    """Score every part concurrently (the batcher groups them); one outcome per part, in order.

    ``audited(index, data, prediction)`` wraps each instance's work in its own audit record. ``forward`` receives
    each result object (Part 10 bytes), one call per object: the SR, then one Secondary Capture per Grad-CAM
    heatmap (``service.dicom.heatmaps``); it is the outbox, which makes each durable before returning. Every object
    of an instance is built before the first is forwarded, so an instance that fails forwards nothing. Without
    ``forward`` no heatmap is computed (``cams=none``): they exist only for a PACS to receive them.
    """
    received_at = time.perf_counter()
    cams = AUTO if forward is not None else "none"

    async def one(index: int, part: Part) -> InstanceOutcome:
        header: Dataset | None = None

        async def score() -> PredictionResponse:
            nonlocal header
            source, warnings = await asyncio.to_thread(read_instance, part)
            header = source
            check_scope(source)
            result, _ = await pipeline.predict(
                part.data, request_id=f"{request_id}-{index}", cams=cams, mc_samples=None, received_at=received_at
            )
            return with_header_warnings(result, warnings)

        try:
            if len(part.data) > max_upload_bytes:
                raise UploadTooLargeError(f"The instance exceeds the limit of {max_upload_bytes} bytes.")
            result = await audited(index, part.data, score())
            assert header is not None
            if forward is not None:  # the SR and heatmaps are built only for a PACS to receive them
                for instance in await results_for_pacs(part.data, header, result, pipeline):
                    await forward(instance)
            return InstanceOutcome(str(header.SOPClassUID), str(header.SOPInstanceUID))
        except Exception as err:  # each instance's failure is reported in its own item, never hidden
            status, title, detail, _ = problem_for(err)
            return InstanceOutcome(
                str(header.SOPClassUID) if header is not None else None,
                str(header.SOPInstanceUID) if header is not None else None,
                failure_reason=failure_reason_for(status),
                detail=f"{title}: {detail}",
            )

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(parts))))


def response_status(outcomes: list[InstanceOutcome]) -> int:
    """PS3.18 10.5.3: 200 all scored, 202 some failed, 409 none scored."""
    failed = sum(outcome.failure_reason is not None for outcome in outcomes)
    if failed == 0:
        return 200
    return 409 if failed == len(outcomes) else 202


def response_json(outcomes: list[InstanceOutcome]) -> dict[str, Any]:
    """The STOW-RS response dataset in DICOM JSON: Referenced and Failed SOP Sequences (present when not empty).

    A failed item carries, besides its Failure Reason, the explanation in Text Value (0040,A160): PS3.18 has no
    attribute for it, and a code alone does not tell the sender what to fix.
    """
    referenced, failed = DicomSequence(), DicomSequence()
    for outcome in outcomes:
        item = Dataset()
        if outcome.sop_class_uid is not None:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
        if outcome.sop_instance_uid is not None:
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.failure_reason is None:
            referenced.append(item)
        else:
            item.FailureReason = outcome.failure_reason
            item.TextValue = outcome.detail or ""
            failed.append(item)
    response = Dataset()
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    body: dict[str, Any] = response.to_json_dict()
    return body
