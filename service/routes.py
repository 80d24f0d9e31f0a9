"""HTTP routes: parse, call the pipeline, return schemas. Errors are mapped in ``service.errors``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bayesnet.population import Declared, DeclaredView
from service import fhir
from service.audit import Auditor, AuditSubject, AuditTrail, client_id_for
from service.dicom import DicomSourceError, dicom_source, sr_answer, stow
from service.disconnect import cancel_on_disconnect
from service.errors import (
    BadRequestError,
    MissingFileError,
    NotAcceptableError,
    NotReadyError,
    UnauthorizedError,
    UnsupportedUploadError,
    UploadTooLargeError,
    problem_for,
    problem_response,
)
from service.keys import key_matches, offered_api_key
from service.negotiation import DICOM, FHIR_JSON, FHIR_JSON_R4, JSON, choose_media_type
from service.pipeline import PredictionPipeline
from service.responses import can_clear, evidence, ood_gate_info, referral_info
from service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    Health,
    ModelCard,
    PredictionResponse,
    Problem,
    Readiness,
)
from service.state import ServiceState
from service.uploads import Upload

router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Routes whose requests go through the model: AdmissionMiddleware bounds how many are in progress.
PREDICT_PATHS = frozenset({"/v1/predict", "/predict", "/v1/predict/batch", "/dicomweb/studies"})
#: Routes that decode an upload without the model: bounded apart, decoded in threads of their own.
PREVIEW_PATHS = frozenset({"/v1/preview"})

_ERRORS = {
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
    return {200: ok, **_NOT_ACCEPTABLE, **_ERRORS}


CamsQuery = Annotated[
    str,
    Query(
        description="Grad-CAM heatmaps: auto (positive or uncertain findings, at most 4), all, none, "
        "or comma-separated finding names",
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


def _declared(patient_age: float | None, view: str | None) -> Declared | None:
    return None if patient_age is None and view is None else Declared(age_years=patient_age, view=view)


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


# The dependencies below are ``async def`` although they never await: FastAPI runs a plain ``def``
# dependency in a worker thread, i.e. three thread round trips per prediction for a few header reads (a
# py-spy profile of the server showed them; docs/benchmarks.md). None of them may block.


async def require_api_key(request: Request) -> None:
    """When API keys are configured, accept ``X-API-Key: k`` or ``Authorization: Bearer k``."""
    keys = _state(request).settings.api_keys
    if not keys:
        return
    offered = offered_api_key(request)
    if not key_matches(offered, keys):
        raise UnauthorizedError(
            "Send a valid API key in the X-API-Key header (or Authorization: Bearer).",
            headers={"WWW-Authenticate": 'Bearer realm="bayesnet-cxr"'},
        )
    request.state.client_id = client_id_for(offered)  # what the audit trail keeps: never the key itself


def _audit_subject(request: Request, pipeline: PredictionPipeline, item_index: int | None = None) -> AuditSubject:
    route = getattr(request.scope.get("route"), "path", request.url.path)
    return AuditSubject(
        route=route,
        request_id=request.state.request_id,
        client_id=getattr(request.state, "client_id", None),
        model=pipeline.model_ref,
        item_index=item_index,
    )


def _auditor(request: Request) -> Auditor:
    trail = request.app.state.audit
    if not isinstance(trail, AuditTrail):
        raise NotReadyError("The audit trail is not open yet; retry shortly.", headers={"Retry-After": "5"})
    return trail.auditor


async def ready_pipeline(request: Request) -> PredictionPipeline:
    state = _state(request)
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


def _fhir_json(body: dict[str, object]) -> JSONResponse:
    """A FHIR R4 JSON body; ``Vary: Accept`` because the same URL also answers plain JSON."""
    return JSONResponse(body, media_type=FHIR_JSON_R4, headers={"Vary": "Accept"})


def _now() -> datetime:
    return datetime.now(timezone.utc)


Protected = [Depends(require_api_key)]


async def _read_upload(upload: UploadFile, request: Request) -> bytes:
    limit = _state(request).settings.max_upload_bytes
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


async def _read_image(request: Request, file: UploadFile | None) -> bytes:
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
        return await _read_upload(file, request)
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
    limit = _state(request).settings.max_upload_bytes
    if len(data) > limit:
        raise UploadTooLargeError(f"The file exceeds the limit of {limit} bytes; send a smaller image.")
    if not data:
        raise MissingFileError("The request body is empty: send the radiograph's bytes as the body.")
    return data


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
    cams: CamsQuery = "auto",
    mc_samples: SamplesQuery = None,
    patient_age: AgeQuery = None,
    view: ViewQuery = None,
) -> PredictionResponse | Response:
    received_at = time.perf_counter()
    auditor = _auditor(request)
    data = await _read_image(request, file)
    source = None
    if media_type == DICOM:  # checked before any inference: an SR can only answer a DICOM image
        try:
            source = await asyncio.to_thread(dicom_source, data)
        except DicomSourceError as err:
            raise NotAcceptableError(
                f"A DICOM SR ({DICOM}) can only answer a DICOM upload, and {err}. Send the DICOM file, or "
                f"Accept: {JSON} or {FHIR_JSON} for this image."
            ) from err
    upload = Upload(data)  # one object for the auditor and the pipeline: the digest is taken while decoding
    result, batch_size = await cancel_on_disconnect(
        request,
        auditor.audited(
            _audit_subject(request, pipeline),
            upload,
            pipeline.predict(
                upload,
                request_id=request.state.request_id,
                cams=cams,
                mc_samples=mc_samples,
                received_at=received_at,
                declared=_declared(patient_age, view),
            ),
        ),
    )
    request.state.batch_size = batch_size
    if media_type == FHIR_JSON:
        study = None
        if result.image.format == "dicom":
            try:  # the report references the source study by its UIDs (DICOM SR to FHIR mapping)
                study = fhir.study_ref(await asyncio.to_thread(dicom_source, data))
            except DicomSourceError:
                study = None  # a DICOM image without study UIDs: the report simply has no imagingStudy
        return _fhir_json(fhir.diagnostic_report(result, issued=_now(), study=study))
    if source is not None:
        body = await asyncio.to_thread(sr_answer, source, result, _now())
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
    cams: CamsQuery = "auto",
    mc_samples: SamplesQuery = None,
    patient_age: AgeQuery = None,
    view: ViewQuery = None,
) -> BatchResponse | Response:
    settings = _state(request).settings
    if len(files) > settings.max_files_per_request:
        raise UploadTooLargeError(f"At most {settings.max_files_per_request} files per request; got {len(files)}.")
    pipeline.parse_cams(cams)  # a bad parameter fails the whole request, before any work
    request_id: str = request.state.request_id
    received_at = time.perf_counter()
    auditor = _auditor(request)

    async def one(index: int, upload: UploadFile) -> BatchItem:
        try:
            data = Upload(await _read_upload(upload, request))
            result, _ = await auditor.audited(  # one audit record per file
                _audit_subject(request, pipeline, index),
                data,
                pipeline.predict(
                    data,
                    request_id=f"{request_id}-{index}",
                    cams=cams,
                    mc_samples=mc_samples,
                    received_at=received_at,
                    declared=_declared(patient_age, view),
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
        return _fhir_json(fhir.batch_bundle(request_id, items, issued=_now()))
    response.headers["Vary"] = "Accept"
    return BatchResponse(request_id=request_id, results=list(items))


@router.post(
    "/dicomweb/studies",
    response_class=Response,
    responses={
        200: {"content": {stow.DICOM_JSON: {}}, "description": "Every instance scored (Referenced SOP Sequence)"},
        202: {"content": {stow.DICOM_JSON: {}}, "description": "Some instances failed (Failed SOP Sequence)"},
        409: {"content": {stow.DICOM_JSON: {}}, "description": "No instance could be scored"},
        **_ERRORS,  # type: ignore[dict-item]
    },
    dependencies=Protected,
    summary="STOW-RS: score each DICOM instance; the SRs and heatmaps go to the configured PACS (docs/dicom.md)",
    tags=["dicomweb"],
)
async def stow_studies(request: Request, pipeline: Pipeline) -> Response:
    state = _state(request)
    settings = state.settings
    auditor = _auditor(request)
    parts = stow.split_request(
        request.headers.get("content-type", ""), await request.body(), max_parts=settings.max_files_per_request
    )

    def audited(
        index: int, data: bytes | Upload, prediction: Awaitable[PredictionResponse]
    ) -> Awaitable[PredictionResponse]:
        return auditor.audited(_audit_subject(request, pipeline, index), data, prediction)  # one record per instance

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


@router.post(
    "/v1/preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "8-bit grayscale PNG"}, **_ERRORS},  # type: ignore[dict-item]
    dependencies=Protected,
    summary="The decoded radiograph as a PNG a browser can show (DICOM included)",
    tags=["predict"],
    openapi_extra=RAW_UPLOAD_OPENAPI,
)
async def preview(
    request: Request,
    pipeline: Pipeline,
    file: Annotated[
        UploadFile | None, File(description="PNG, JPEG or DICOM radiograph; or send the image as the raw body")
    ] = None,
) -> Response:
    data = await _read_image(request, file)
    return Response(await pipeline.preview(data), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/v1/model", response_model=ModelCard, dependencies=Protected, summary="The model card", tags=["model"])
async def model_card(request: Request) -> ModelCard:
    state = _state(request)
    loaded = state.loaded
    if loaded is None:
        raise NotReadyError("The model is still loading; retry shortly.", headers={"Retry-After": "5"})
    spec = loaded.spec
    metrics = loaded.metadata.get("metrics") or spec.extra.get("metrics") or {}
    return ModelCard(
        name=spec.name,
        version=spec.version,
        sha256=loaded.sha256,
        arch=spec.arch,
        labels=list(spec.labels),
        trained_labels=list(spec.trained_labels),
        untrained_labels=list(spec.untrained_labels),
        image_size=spec.image_size,
        in_chans=spec.in_chans,
        mc_samples=state.settings.mc_samples or spec.mc_samples,
        mc_dropout_blocks=spec.mc_dropout_blocks,
        dropout=spec.dropout,
        temperature=dict(zip(spec.labels, spec.temperature, strict=True)),
        threshold=dict(zip(spec.labels, spec.threshold, strict=True)),
        uncertainty_threshold=dict(zip(spec.labels, spec.uncertainty_threshold, strict=True)),
        provenance=spec.provenance,
        intended_use=loaded.intended_use,
        trained=loaded.trained,
        metrics=dict(metrics),
        card_markdown=loaded.card_markdown,
        ood=ood_gate_info(spec, state.settings.ood_action),
        referral=referral_info(spec),
        can_clear=can_clear(spec),
        evidence=evidence(spec, metrics),
    )


def _stalled(state: ServiceState) -> str | None:
    """Why the inference worker counts as hung, or None: a batch has run for longer than a request may wait."""
    if state.batcher is None:
        return None
    busy_s = state.batcher.busy_for_s
    if busy_s <= state.settings.request_timeout_s:
        return None
    return (
        f"inference worker stalled: one batch has run for {busy_s:.0f} s, longer than the request timeout "
        f"({state.settings.request_timeout_s:g} s); restart the process"
    )


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {
            "model": Problem,
            "content": {"application/problem+json": {}},
            "description": "The inference worker is hung: restart the process",
        }
    },
    summary="Liveness: the process answers and its inference worker is not hung",
    tags=["ops"],
)
async def healthz(request: Request) -> Health | JSONResponse:
    # A hung worker (a batch running past the request timeout: a deadlocked kernel, a device that stopped
    # answering) does not recover by itself; failing liveness lets the supervisor restart the process.
    stalled = _stalled(_state(request))
    if stalled is not None:
        return problem_response(request, 503, "Inference worker stalled", stalled)
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready"}},
    summary="Readiness: model loaded, warmed up, inference worker alive",
    tags=["ops"],
)
async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    alive = state.batcher is not None and state.batcher.alive and state.batcher.accepting
    stalled = _stalled(state)
    ready = state.ready and alive and stalled is None
    detail = "inference worker is not running" if state.ready and not alive else stalled or state.detail
    body = Readiness(
        ready=ready,
        detail=detail,
        queue_depth=state.batcher.queue_depth if state.batcher is not None else 0,
        model=state.model_ref,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.queue_depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="bayesnet-cxr API",
        swagger_js_url="/swagger-assets/swagger-ui-bundle.js",
        swagger_css_url="/swagger-assets/swagger-ui.css",
        swagger_favicon_url="/swagger-assets/favicon-32x32.png",
    )


@router.get("/", include_in_schema=False)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return HTMLResponse("<h1>bayesnet-cxr</h1><p>The web page is not installed; see <a href='/docs'>/docs</a>.</p>")
    return FileResponse(page, headers={"Cache-Control": "no-cache"})
