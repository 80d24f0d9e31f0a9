"""What the route modules share: dependencies (API key, readiness, auditor, Accept), upload reading, query types."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from bayesnet.population import Declared, DeclaredView
from service.api.keys import key_matches, offered_api_key
from service.api.negotiation import DICOM, FHIR_JSON, FHIR_JSON_R4, JSON, choose_media_type
from service.api.state import ServiceState
from service.audit import Auditor, AuditSubject, AuditTrail, client_id_for
from service.errors import (
    BadRequestError,
    MissingFileError,
    NotAcceptableError,
    NotReadyError,
    UnauthorizedError,
    UnsupportedUploadError,
    UploadTooLargeError,
)
from service.runtime.heatmaps import AUTO, AUTO_CAM_LIMIT
from service.runtime.pipeline import PredictionPipeline
from service.schemas import (
    Problem,
)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # service/api/static
#: Routes whose requests go through the model: AdmissionMiddleware bounds how many are in progress.
PREDICT_PATHS = frozenset({"/v1/predict", "/predict", "/v1/predict/batch", "/dicomweb/studies"})
#: Routes that decode an upload without the model: bounded apart, decoded in threads of their own.
PREVIEW_PATHS = frozenset({"/v1/preview"})

ERRORS = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {
        400: "Malformed multipart/form-data body (no boundary, damaged framing, too many fields)",
        401: "Missing or invalid API key",
        413: "Upload over the byte or pixel limit",
        415: "Not a PNG, JPEG or DICOM image",
        422: "Damaged or unusable image, or invalid parameters",
        503: "Queue full (Retry-After), not ready, or the audit trail cannot be written (docs/audit.md)",
    }.items()
}

# The predict endpoints answer JSON by default and FHIR R4 on request (docs/fhir.md); errors stay problem+json.


CamsQuery = Annotated[
    str,
    Query(
        description=f"Grad-CAM heatmaps: {AUTO} (positive or uncertain findings, at most {AUTO_CAM_LIMIT}), all, "
        "none, or comma-separated finding names",
        max_length=1024,
    ),
]
SamplesQuery = Annotated[
    int | None, Query(ge=1, le=100, description="Monte-Carlo samples T (default: the model's, usually 20)")
]
AgeQuery = Annotated[
    float | None,
    Query(
        ge=0,
        le=150,
        description="The patient's age in years, declared by the sender (PNG and JPEG carry no header). Under 18: "
        "outside the intended population. Without patient_age and view a PNG or JPEG is scored but never cleared "
        "(population_unverified). A DICOM header's Patient's Age is used first; a declaration can only add to it. "
        "Never logged or returned",
    ),
]
ViewQuery = Annotated[
    DeclaredView | None,
    Query(
        description="The film's view, declared by the sender: PA or AP (frontal, the intended population) or a "
        "lateral, oblique or decubitus view (outside it). Never logged or returned",
    ),
]


def declared(patient_age: float | None, view: str | None) -> Declared | None:
    return None if patient_age is None and view is None else Declared(age_years=patient_age, view=view)


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


# The dependencies below are ``async def`` although they never await: FastAPI runs a plain ``def``
# dependency in a worker thread, i.e. three thread round trips per prediction for a few header reads (a
# py-spy profile of the server showed them; docs/benchmarks.md). None of them may block.


async def require_api_key(request: Request) -> None:
    """When API keys are configured, accept ``X-API-Key: k`` or ``Authorization: Bearer k``."""
    keys = service_state(request).settings.api_keys
    if not keys:
        return
    offered = offered_api_key(request)
    if not key_matches(offered, keys):
        raise UnauthorizedError(
            "Send a valid API key in the X-API-Key header (or Authorization: Bearer).",
            headers={"WWW-Authenticate": 'Bearer realm="bayesnet-cxr"'},
        )
    request.state.client_id = client_id_for(offered)  # what the audit trail keeps: never the key itself


def audit_subject(request: Request, pipeline: PredictionPipeline, item_index: int | None = None) -> AuditSubject:
    route = getattr(request.scope.get("route"), "path", request.url.path)
    return AuditSubject(
        route=route,
        request_id=request.state.request_id,
        client_id=getattr(request.state, "client_id", None),
        model=pipeline.model_ref,
        item_index=item_index,
    )


def auditor_of(request: Request) -> Auditor:
    trail = request.app.state.audit
    if not isinstance(trail, AuditTrail):
        raise NotReadyError("The audit trail is not open yet; retry shortly.", headers={"Retry-After": "5"})
    return trail.auditor


async def ready_pipeline(request: Request) -> PredictionPipeline:
    state = service_state(request)
    if not state.ready or state.pipeline is None or state.batcher is None or not state.batcher.alive:
        raise NotReadyError(f"The service is not ready ({state.detail}); retry shortly.", headers={"Retry-After": "5"})
    pipeline: PredictionPipeline = state.pipeline
    return pipeline


Pipeline = Annotated[PredictionPipeline, Depends(ready_pipeline)]


def _negotiator(offers: tuple[str, ...], described: str) -> Callable[[Request], Awaitable[str]]:
    """A dependency answering the offer the Accept header prefers (the first on a tie, :func:`choose_media_type`),
    or 406. Checked before the upload is read, so a client that cannot use any answer costs no inference."""

    async def negotiate(request: Request) -> str:
        accept = request.headers.get("accept")
        chosen = choose_media_type(accept, offers)
        if chosen is None:
            raise NotAcceptableError(
                f"This endpoint answers {described}; the Accept header {(accept or '')[:200]!r} allows none of them. "
                f"Send Accept: {JSON}, {FHIR_JSON} or */*."
            )
        return chosen

    return negotiate


#: JSON (the default) or FHIR R4 JSON: every predict endpoint.
negotiated_media_type = _negotiator((JSON, FHIR_JSON), f"{JSON} (the default) or {FHIR_JSON_R4}")
#: The single-image endpoint also answers a DICOM SR, for a DICOM upload, when asked for by name (docs/dicom.md).
negotiated_single_media_type = _negotiator(
    (JSON, FHIR_JSON, DICOM), f"{JSON} (the default), {FHIR_JSON_R4} or {DICOM} (a DICOM SR, for a DICOM upload)"
)


MediaType = Annotated[str, Depends(negotiated_media_type)]
SingleMediaType = Annotated[str, Depends(negotiated_single_media_type)]


def fhir_json(body: dict[str, object]) -> JSONResponse:
    """A FHIR R4 JSON body; ``Vary: Accept`` because the same URL also answers plain JSON."""
    return JSONResponse(body, media_type=FHIR_JSON_R4, headers={"Vary": "Accept"})


def now() -> datetime:
    return datetime.now(timezone.utc)


Protected = [Depends(require_api_key)]


async def read_upload(upload: UploadFile, request: Request) -> bytes:
    limit = service_state(request).settings.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLargeError(f"The file exceeds the limit of {limit} bytes; send a smaller image.")
    return data


#: Content-Types of a raw-body upload: the whole request body is the image (no multipart form to parse).
RAW_UPLOAD_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")
_RAW_BODY_SCHEMA = {"type": "string", "format": "binary"}
#: OpenAPI: the single-image endpoints also take the image itself as the body (merged into FastAPI's form).
RAW_UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {media: {"schema": _RAW_BODY_SCHEMA} for media in RAW_UPLOAD_TYPES},
        "description": "Either a multipart/form-data form with the image in the field `file`, or the image itself "
        "as the whole body with Content-Type image/png, image/jpeg, application/dicom or application/octet-stream "
        "(the format is sniffed from the bytes either way; the raw body skips the form parsing).",
    }
}


async def read_image(request: Request, file: UploadFile | None) -> bytes:
    """The uploaded image: the form's ``file`` field, or the raw body for an image Content-Type (415 otherwise).

    Raw bodies are bounded by ``BodyLimitMiddleware`` before they are read (413), as forms are.
    """
    if file is not None:
        if len((await request.form()).getlist("file")) > 1:  # the form FastAPI parsed, cached: no second parse
            # Which of several images would be scored? Never guess (the framework would take the last one).
            raise BadRequestError(
                "The form has more than one field named 'file': send one radiograph per request, or several as "
                "the field 'files' of POST /v1/predict/batch."
            )
        return await read_upload(file, request)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        raise MissingFileError(
            "The multipart/form-data body has no field named 'file' (or it never closes its boundary): send the "
            "radiograph as the form field 'file'."
        )
    if media_type not in RAW_UPLOAD_TYPES:
        raise UnsupportedUploadError(
            f"Content-Type {media_type[:100]!r} is not an upload this endpoint reads. Send multipart/form-data "
            f"with the image in the field 'file', or the image itself as the body with Content-Type "
            f"{', '.join(RAW_UPLOAD_TYPES)}."
        )
    data = await request.body()
    limit = service_state(request).settings.max_upload_bytes
    if len(data) > limit:
        raise UploadTooLargeError(f"The file exceeds the limit of {limit} bytes; send a smaller image.")
    if not data:
        raise MissingFileError("The request body is empty: send the radiograph's bytes as the body.")
    return data
