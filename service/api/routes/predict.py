"""POST /v1/predict (and /predict, the original path) and /v1/predict/batch: JSON, FHIR R4 or a DICOM SR."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import Response
from pydicom.dataset import Dataset

from service import fhir
from service.api.disconnect import cancel_on_disconnect
from service.api.negotiation import DICOM, FHIR_JSON, JSON
from service.api.routes.deps import (
    ERRORS,
    RAW_UPLOAD_OPENAPI,
    AgeQuery,
    CamsQuery,
    MediaType,
    Pipeline,
    Protected,
    SamplesQuery,
    SingleMediaType,
    ViewQuery,
    audit_subject,
    auditor_of,
    declared,
    fhir_json,
    now,
    read_image,
    read_upload,
    service_state,
)
from service.dicom import DicomSourceError, checked_source, dicom_source, sr_answer, with_header_warnings
from service.dicom.heatmaps import hot_spots
from service.errors import (
    NotAcceptableError,
    UploadTooLargeError,
)
from service.problems import problem_for
from service.runtime.heatmaps import AUTO
from service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    PredictionResponse,
    Problem,
)

router = APIRouter()

# The predict endpoints answer JSON by default and FHIR R4 on request (docs/fhir.md); errors stay problem+json.
_FHIR_SCHEMA = {
    "type": "object",
    "description": "FHIR R4 resource: a DiagnosticReport with contained Observations, Media and Device "
    "(a collection Bundle of DiagnosticReports and OperationOutcomes for the batch endpoint). See docs/fhir.md.",
    "properties": {"resourceType": {"type": "string", "enum": ["DiagnosticReport", "Bundle"]}},
    "required": ["resourceType"],
}
_NOT_ACCEPTABLE: dict[int, dict[str, Any]] = {
    406: {
        "model": Problem,
        "content": {"application/problem+json": {}},
        "description": f"The Accept header allows neither {JSON} nor {FHIR_JSON} (FHIR R4)",
    }
}


_DICOM_SR_SCHEMA = {
    "type": "string",
    "format": "binary",
    "description": "A DICOM Part 10 Comprehensive 3D SR (TID 1500 measurement report, IHE AI Results) in the "
    "uploaded image's study: per finding the decision, the MC mean and SD, the rule's thresholds and the decision "
    "reason; the referral and its reasons. Only for a DICOM upload (406 otherwise). See docs/dicom.md.",
}


def _predict_responses(what: str, *, dicom: bool = False) -> dict[int, dict[str, Any]]:
    """OpenAPI responses of a predict endpoint: the 200's FHIR (and, for one DICOM image, SR) alternatives, 406,
    and the shared errors."""
    content: dict[str, Any] = {FHIR_JSON: {"schema": _FHIR_SCHEMA}}
    description = f"{what}: {JSON} by default, or FHIR R4 JSON with `Accept: {FHIR_JSON}`"
    if dicom:
        content[DICOM] = {"schema": _DICOM_SR_SCHEMA}
        description += f", or a DICOM SR with `Accept: {DICOM}` (DICOM uploads only)"
    ok: dict[str, Any] = {"description": description, "content": content}
    return {200: ok, **_NOT_ACCEPTABLE, **ERRORS}


@router.post(
    "/v1/predict",
    response_model=PredictionResponse,
    responses=_predict_responses("The findings", dicom=True),  # type: ignore[arg-type]
    dependencies=Protected,
    summary="Findings, uncertainty and heatmaps for one radiograph",
    tags=["predict"],
    openapi_extra=RAW_UPLOAD_OPENAPI,
)
async def predict(
    request: Request,
    response: Response,
    pipeline: Pipeline,
    media_type: SingleMediaType,
    file: Annotated[
        UploadFile | None,
        File(description="PNG, JPEG or DICOM radiograph (sniffed by content); or send the image as the raw body"),
    ] = None,
    cams: CamsQuery = AUTO,
    mc_samples: SamplesQuery = None,
    patient_age: AgeQuery = None,
    view: ViewQuery = None,
) -> PredictionResponse | Response:
    received_at = time.perf_counter()
    auditor = auditor_of(request)
    data = await read_image(request, file)
    source: Dataset | None = None
    header_warnings: list[str] = []
    if media_type == DICOM:  # checked before any inference: an SR can only answer a DICOM image
        try:
            source, header_warnings = await asyncio.to_thread(checked_source, data)
        except DicomSourceError as err:
            raise NotAcceptableError(
                f"A DICOM SR ({DICOM}) can only answer a DICOM upload, and {err}. Send the DICOM file, or "
                f"Accept: {JSON} or {FHIR_JSON} for this image."
            ) from err

    async def predicted() -> tuple[PredictionResponse, int]:
        result, batch_size = await pipeline.predict(
            data,
            request_id=request.state.request_id,
            cams=cams,
            mc_samples=mc_samples,
            received_at=received_at,
            declared=declared(patient_age, view),
        )
        # What the SR leaves out of the header is part of the answer, and so of its audit record.
        return with_header_warnings(result, header_warnings), batch_size

    result, batch_size = await cancel_on_disconnect(
        request, auditor.audited(audit_subject(request, pipeline), data, predicted())
    )
    request.state.batch_size = batch_size
    if media_type == FHIR_JSON:
        study = None
        if result.image.format == "dicom":
            try:  # the report references the source study by its UIDs (DICOM SR to FHIR mapping)
                study = fhir.study_ref(await asyncio.to_thread(dicom_source, data))
            except DicomSourceError:
                study = None  # a DICOM image without study UIDs: the report simply has no imagingStudy
        return fhir_json(fhir.diagnostic_report(result, issued=now(), study=study))
    if source is not None:
        film = (int(source.Rows), int(source.Columns))

        def sr() -> bytes:  # the heatmaps' hot spots become the findings' regions (off the event loop)
            return sr_answer(source, result, now(), (), hot_spots(result, film, pipeline.spec.resize))

        body = await asyncio.to_thread(sr)
        return Response(body, media_type=DICOM, headers={"Vary": "Accept", "Cache-Control": "no-store"})
    response.headers["Vary"] = "Accept"
    return result


router.add_api_route(
    "/predict",
    predict,
    methods=["POST"],
    response_model=PredictionResponse,
    responses=_predict_responses("The findings", dicom=True),  # type: ignore[arg-type]
    dependencies=Protected,
    summary="Same as /v1/predict, at the original project's path",
    tags=["predict"],
    operation_id="predict_legacy",
    openapi_extra=RAW_UPLOAD_OPENAPI,
)


@router.post(
    "/v1/predict/batch",
    response_model=BatchResponse,
    responses=_predict_responses("One result or error per file"),  # type: ignore[arg-type]
    dependencies=Protected,
    summary="Several radiographs in one request: one result (or error) each, in order",
    tags=["predict"],
)
async def predict_batch(
    request: Request,
    response: Response,
    pipeline: Pipeline,
    media_type: MediaType,
    files: Annotated[list[UploadFile], File(description="Radiographs, repeated field 'files'")],
    cams: CamsQuery = AUTO,
    mc_samples: SamplesQuery = None,
    patient_age: AgeQuery = None,
    view: ViewQuery = None,
) -> BatchResponse | Response:
    settings = service_state(request).settings
    if len(files) > settings.max_files_per_request:
        raise UploadTooLargeError(f"At most {settings.max_files_per_request} files per request; got {len(files)}.")
    pipeline.parse_cams(cams)  # a bad parameter fails the whole request, before any work
    request_id: str = request.state.request_id
    received_at = time.perf_counter()
    auditor = auditor_of(request)

    async def one(index: int, upload: UploadFile) -> BatchItem:
        try:
            data = await read_upload(upload, request)
            result, _ = await auditor.audited(  # one audit record per file
                audit_subject(request, pipeline, index),
                data,
                pipeline.predict(
                    data,
                    request_id=f"{request_id}-{index}",
                    cams=cams,
                    mc_samples=mc_samples,
                    received_at=received_at,
                    declared=declared(patient_age, view),
                ),
            )
            return BatchItem(index=index, filename=upload.filename, result=result)
        except Exception as err:  # each file's failure is reported in its slot, never hidden
            status, title, detail, _ = problem_for(err)
            return BatchItem(
                index=index, filename=upload.filename, error=BatchItemError(status=status, title=title, detail=detail)
            )

    items = await cancel_on_disconnect(request, asyncio.gather(*(one(i, f) for i, f in enumerate(files))))
    if media_type == FHIR_JSON:
        return fhir_json(fhir.batch_bundle(request_id, items, issued=now()))
    response.headers["Vary"] = "Accept"
    return BatchResponse(request_id=request_id, results=list(items))
