"""``create_app(settings)``: the FastAPI application, composed of parts that each open from their own settings.

The heavy resources (audit trail, outbox, model, DIMSE listener) open in the lifespan (``service.api.lifespan``),
not here; this module wires the routes, the error handlers, the OpenAPI document, the static files and the
middleware, outermost last.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from service.api.admission import AdmissionGroup, AdmissionMiddleware
from service.api.lifespan import Lifespan
from service.api.metrics import Metrics
from service.api.middleware import BodyLimitMiddleware, BodyTiming, ObservabilityMiddleware
from service.api.openapi import install_openapi
from service.api.problems import install_error_handlers
from service.api.routes import PREDICT_PATHS, PREVIEW_PATHS, ROUTERS, STATIC_DIR
from service.api.state import ServiceState
from service.audit import snapshot as audit_snapshot
from service.audit.metrics import AuditCollector
from service.dicom.metrics import OutboxCollector
from service.runtime.operating import OperatingSwitch
from service.runtime.signals import LoadSignals
from service.settings import Settings

log = logging.getLogger("service.api.app")

# Multipart framing around one file: boundaries, part headers, the query-free form fields.
MULTIPART_SLACK_BYTES = 64 * 1024


def swagger_assets_dir() -> Path:
    """Swagger UI 5 assets from the PyPI package fastapi-swagger, served locally (no CDN)."""
    return Path(str(resources.files("fastapi_swagger") / "resources"))


def create_app(settings: Settings) -> FastAPI:
    """Build the application for ``settings``; heavy work happens in the lifespan, not here."""
    metrics = Metrics.create()
    state = ServiceState(settings=settings, metrics=metrics)
    # One object through which the pipeline tells the batcher and the audit writer what is on its way.
    signals = LoadSignals()
    operating = OperatingSwitch()  # the lifespan sets it from the trail; the guarantee watch may suspend
    app = FastAPI(
        title="bayesnet-cxr",
        version="0.1.0",
        summary="Chest X-ray findings with Monte-Carlo-dropout uncertainty and Grad-CAM",
        description=(
            "POST a chest radiograph (PNG, JPEG or DICOM) and get, for each CheXpert finding, the MC-dropout "
            "mean probability and variance, a decision (positive / negative / uncertain), a referral flag "
            "and Grad-CAM heatmaps. Research and demonstration only: not a medical device."
        ),
        lifespan=Lifespan(state, signals, operating),
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.state.audit = None  # the lifespan opens the AuditTrail
    app.state.dicom_outbox = None  # the lifespan opens it when forwarding to a PACS is configured
    app.state.guarantee = None  # the lifespan starts the watch when the model has a referral rule
    app.state.operating = operating
    metrics.watch(AuditCollector(lambda: audit_snapshot(app.state.audit) if app.state.audit is not None else None))
    metrics.watch(
        OutboxCollector(lambda: app.state.dicom_outbox.snapshot() if app.state.dicom_outbox is not None else None)
    )
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_openapi(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.mount("/swagger-assets", StaticFiles(directory=swagger_assets_dir()), name="swagger-assets")
    install_middleware(app, state)
    return app


def install_middleware(app: FastAPI, state: ServiceState) -> None:
    """CORS when origins are configured, admission, body limits and, outermost, the access log and metrics."""
    settings = state.settings

    batch_limit = settings.max_upload_bytes * settings.max_files_per_request + MULTIPART_SLACK_BYTES
    single_limit = settings.max_upload_bytes + MULTIPART_SLACK_BYTES

    def limit_for(path: str) -> int:
        several = path.rstrip("/").endswith("/batch") or path.startswith("/dicomweb/")  # STOW-RS: a whole study
        return batch_limit if several else single_limit

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )

    def retry_after_s() -> float:
        return state.batcher.retry_after_s() if state.batcher is not None else 1.0

    predictions = AdmissionGroup(
        paths=PREDICT_PATHS,
        # The queue plus one batch in flight: beyond that a request could only wait to be refused.
        max_in_flight=settings.max_queue + settings.max_batch_images,
        retry_after_s=retry_after_s,
    )
    previews = AdmissionGroup(
        paths=PREVIEW_PATHS, max_in_flight=settings.max_previews_in_flight, retry_after_s=lambda: 1.0, what="previews"
    )
    app.add_middleware(AdmissionMiddleware, groups=[predictions, previews], max_receiving=settings.max_receiving)
    timing = BodyTiming(
        timeout_s=settings.body_timeout_s,
        min_rate_bytes_s=settings.body_min_rate_bytes_s,
        grace_s=settings.body_grace_s,
    )
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for, timing=timing)
    app.add_middleware(ObservabilityMiddleware, metrics=state.metrics)  # outermost: sees every response
