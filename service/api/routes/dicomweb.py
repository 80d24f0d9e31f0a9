"""POST /dicomweb/studies: STOW-RS, each instance scored; SRs and heatmaps forwarded to the PACS (docs/dicom.md)."""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.disconnect import cancel_on_disconnect
from service.api.routes.deps import (
    ERRORS,
    Pipeline,
    Protected,
    audit_subject,
    auditor_of,
    service_state,
)
from service.dicom import stow
from service.schemas import (
    PredictionResponse,
)

router = APIRouter()


@router.post(
    "/dicomweb/studies",
    response_class=Response,
    responses={
        200: {"content": {stow.DICOM_JSON: {}}, "description": "Every instance scored (Referenced SOP Sequence)"},
        202: {"content": {stow.DICOM_JSON: {}}, "description": "Some instances failed (Failed SOP Sequence)"},
        409: {"content": {stow.DICOM_JSON: {}}, "description": "No instance could be scored"},
        **ERRORS,  # type: ignore[dict-item]
    },
    dependencies=Protected,
    summary="STOW-RS: score each DICOM instance; the SRs and heatmaps go to the configured PACS (docs/dicom.md)",
    tags=["dicomweb"],
)
async def stow_studies(request: Request, pipeline: Pipeline) -> Response:
    state = service_state(request)
    settings = state.settings
    auditor = auditor_of(request)
    parts = stow.split_request(
        request.headers.get("content-type", ""), await request.body(), max_parts=settings.max_files_per_request
    )

    def audited(index: int, data: bytes, prediction: Awaitable[PredictionResponse]) -> Awaitable[PredictionResponse]:
        return auditor.audited(audit_subject(request, pipeline, index), data, prediction)  # one record per instance

    outbox = request.app.state.dicom_outbox  # service.dicom.outbox.Outbox when CXR_DICOMWEB_FORWARD_URL is set
    outcomes = await cancel_on_disconnect(
        request,
        stow.receive(
            parts,
            pipeline=pipeline,
            audited=audited,
            request_id=request.state.request_id,
            max_upload_bytes=settings.max_upload_bytes,
            forward=outbox.put if outbox is not None else None,
        ),
    )
    return JSONResponse(
        stow.response_json(outcomes), status_code=stow.response_status(outcomes), media_type=stow.DICOM_JSON
    )
