"""``create_app(settings)``: the FastAPI application, its lifespan and its middleware.

The lifespan owns the heavy resources: load the checkpoint, build the predictor, warm up with one real
batch, start the batcher, then report ready. On shutdown (SIGTERM) it stops being ready, lets the batcher
finish every request already accepted, and releases the thread pools.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from bayesnet import model_thread, single_threaded_torch, tune_allocator
from service.audit import AuditTrail
from service.audit import snapshot as audit_snapshot
from service.audit.api import router as audit_router
from service.batcher import MicroBatcher
from service.dicom.dimse import DimseListener, scorer
from service.dicom.outbox import Outbox
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import (
    AdmissionGroup,
    AdmissionMiddleware,
    BodyLimitMiddleware,
    BodyTiming,
    ObservabilityMiddleware,
)
from service.model_loading import LoadedModel, build_predictor, load_model
from service.openapi import install_openapi
from service.pipeline import Job, JobResult, PredictionPipeline, batch_processor
from service.predictor import resolve_device
from service.routes import PREDICT_PATHS, PREVIEW_PATHS, STATIC_DIR, router
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service.app")

# Multipart framing around one file: boundaries, part headers, the query-free form fields.
MULTIPART_SLACK_BYTES = 64 * 1024


def swagger_assets_dir() -> Path:
    """Swagger UI 5 assets from the PyPI package fastapi-swagger, served locally (no CDN)."""
    return Path(str(resources.files("fastapi_swagger") / "resources"))


def open_audit_trail(settings: Settings) -> AuditTrail:
    """Connect to ``settings.audit_url``, migrate it and start its writer (blocking)."""
    trail = AuditTrail.open(
        settings.audit_url,
        policy=settings.audit_policy,
        spool_dir=settings.audit_spool_path,
        spool_max_records=settings.audit_spool_max_records,
        retention_days=settings.audit_retention_days,
        rolling_window=settings.audit_rolling_window,
        durable_timeout_s=settings.request_timeout_s,
        sqlite_synchronous=settings.audit_sqlite_synchronous,
        group_commit_s=settings.audit_group_commit_ms / 1e3,
    )
    log.info("audit trail: %s (%s)", trail.store.engine.url.render_as_string(hide_password=True), settings.audit_policy)
    return trail


def open_outbox(settings: Settings) -> Outbox | None:
    """The forwarding outbox when ``settings.dicomweb_forward_url`` is set (docs/dicom.md), else None."""
    if settings.dicomweb_forward_url is None:
        return None
    outbox = Outbox(
        settings.dicomweb_outbox_path,
        settings.dicomweb_forward_url,
        max_instances=settings.dicomweb_outbox_max_instances,
        retry_initial_s=settings.dicomweb_retry_initial_s,
        retry_max_s=settings.dicomweb_retry_max_s,
        timeout_s=settings.request_timeout_s,
    )
    pacs = urlsplit(settings.dicomweb_forward_url)
    log.info("forwarding results to %s://%s (%d waiting)", pacs.scheme, pacs.hostname, len(outbox.pending()))
    return outbox


def open_dimse_listener(
    settings: Settings,
    state: ServiceState,
    trail: AuditTrail,
    outbox: Outbox | None,
    loop: asyncio.AbstractEventLoop,
) -> DimseListener | None:
    """Bind the DIMSE C-STORE listener when ``settings.dimse_port`` is set (docs/dicom.md), else None. Called once
    the model is ready; blocking (binds a socket), so off the event loop, whose loop the listener is given."""
    if settings.dimse_port is None:
        return None
    assert state.pipeline is not None
    store = scorer(
        pipeline=state.pipeline,
        auditor=trail.auditor,
        max_upload_bytes=settings.max_upload_bytes,
        forward=outbox.put if outbox is not None else None,
    )
    listener = DimseListener(
        store,
        loop,
        host=settings.dimse_host,
        port=settings.dimse_port,
        ae_title=settings.dimse_ae_title,
        allowed_calling_ae=settings.dimse_allowed_ae,
        max_associations=settings.dimse_max_associations,
        idle_timeout_s=settings.dimse_idle_timeout_s,
        max_instance_bytes=settings.max_upload_bytes,
        # The pipeline's own timeout, then the audit record and the outbox write, each bounded by the same.
        answer_timeout_s=3 * settings.request_timeout_s,
        stores=state.metrics.dimse_stores,
    )
    listener.start()
    return listener


def create_app(settings: Settings) -> FastAPI:
    """Build the application for ``settings``; heavy work happens in the lifespan, not here."""
    metrics = Metrics.create()
    state = ServiceState(settings=settings, metrics=metrics)
    # Read here, on the thread that builds the app, before the lifespan's helper threads change torch's default.
    intraop_threads = settings.torch_threads or torch.get_num_threads()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trail: AuditTrail | None = None
        try:
            # The audit trail first: a service that cannot keep its trail must not start answering (docs/audit.md).
            trail = await asyncio.to_thread(open_audit_trail, settings)
            # Group commit: hold a transaction open while answers (each with its record) are being finished.
            trail.writer.more_coming = lambda: state.pipeline is not None and state.pipeline.answers_coming()
            app.state.audit = trail
            outbox = await asyncio.to_thread(open_outbox, settings)  # before the model: it fails fast and cheaply
            app.state.dicom_outbox = outbox
            batcher, pools = await start_up()
        except Exception as err:
            # Never a half-alive server: uvicorn exits before it binds; `python -m service` reports this on stderr.
            state.fatal_error, state.detail = err, f"start-up failed: {err}"
            log.critical("cannot start: %s", err)
            if trail is not None:
                await asyncio.to_thread(trail.close)
            raise
        supervisor = asyncio.get_running_loop().create_task(supervise_worker(batcher), name="worker-supervisor")
        if outbox is not None:
            outbox.start()
        dimse: DimseListener | None = None
        try:
            try:
                dimse = await asyncio.to_thread(
                    open_dimse_listener, settings, state, trail, outbox, asyncio.get_running_loop()
                )
            except Exception as err:  # the port is taken, most likely: stop what started (finally) and exit
                state.fatal_error, state.detail = err, f"start-up failed: {err}"
                log.critical("cannot start the DIMSE listener: %s", err)
                raise
            yield
        finally:
            state.ready, state.detail = False, "shutting down" if state.fatal_error is None else state.detail
            if dimse is not None:  # first: its C-STOREs in flight still need the batcher, the trail and the outbox
                await asyncio.to_thread(dimse.stop, settings.request_timeout_s)
            supervisor.cancel()
            await batcher.stop(drain=True)
            if outbox is not None:
                await outbox.stop()  # what is not yet forwarded stays in the outbox for the next start
            for pool in pools:
                pool.shutdown(wait=True)
            assert trail is not None
            await asyncio.to_thread(trail.close)  # writes every record still queued
            log.info("stopped")

    async def supervise_worker(batcher: MicroBatcher[Job, JobResult]) -> None:
        """Crash-only policy for the inference worker: if its loop dies, stop being ready and end the process.

        A dead worker means a bug or a broken device in an unknown state; a fresh process (started by
        systemd, Kubernetes or the Gunicorn arbiter) is the only state we can vouch for, so we do not restart
        the worker in place. The batcher has already failed every pending request with a 503.
        """
        await batcher.wait_ended()
        if batcher.last_error is None:
            return  # stopped by the lifespan: a normal shutdown
        state.ready, state.detail = False, "inference worker died; the process is exiting to be restarted"
        state.fatal_error = batcher.last_error
        log.critical(
            "inference worker died (%r): shutting down so the supervisor starts a fresh process", batcher.last_error
        )
        state.request_exit()

    async def start_up() -> tuple[MicroBatcher[Job, JobResult], tuple[ThreadPoolExecutor, ...]]:
        """Load, build, warm up, start the batcher; fills ``state`` and returns what shutdown must release."""
        if settings.tune_allocator:
            tune_allocator()

        # One OpenMP team per process, owned by the inference thread; every other thread that touches tensors
        # (loading here, decoding and preprocessing in the pool) runs its operations inline (bayesnet/runtime.py).
        def load_single_threaded() -> LoadedModel:
            single_threaded_torch()
            return load_model(settings)

        loaded = await asyncio.to_thread(load_single_threaded)
        state.loaded = loaded
        metrics.model_info.labels(name=loaded.spec.name, version=loaded.spec.version).set(1)
        predictor = build_predictor(
            loaded, settings, device=resolve_device(settings.device), max_batch=settings.max_batch_images
        )
        batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
            batch_processor(
                predictor,
                threads=intraop_threads if predictor.device.type == "cpu" else None,
                busy_threads=settings.busy_torch_threads if predictor.device.type == "cpu" else None,
                quiet=lambda: (
                    state.pipeline is not None
                    and not state.pipeline.more_coming()
                    and state.batcher is not None
                    and state.batcher.queue_depth == 0
                ),
            ),
            max_batch_size=settings.max_batch_images,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            name="inference",
            on_batch=metrics.observe_batch,
            more_coming=lambda: state.pipeline is not None and state.pipeline.more_coming(),
            thread_initializer=functools.partial(model_thread, intraop_threads),
        )
        decode_pool = ThreadPoolExecutor(
            settings.decode_workers, thread_name_prefix="decode", initializer=single_threaded_torch
        )
        # Previews decode in threads of their own: a flood of them cannot hold the threads predictions need.
        preview_pool = ThreadPoolExecutor(
            settings.preview_workers, thread_name_prefix="preview", initializer=single_threaded_torch
        )
        pools = (decode_pool, preview_pool)
        await batcher.start()
        try:
            if settings.warmup:  # on the inference thread itself: its thread team and kernel caches get warm
                state.detail = "warming up"
                await batcher.run_in_worker(predictor.warmup)
        except BaseException:
            await batcher.stop(drain=False)
            for pool in pools:
                pool.shutdown(wait=False)
            raise
        state.batcher = batcher
        state.predictor = predictor
        model_ref = state.model_ref
        assert model_ref is not None
        state.pipeline = PredictionPipeline(
            spec=loaded.spec,
            model_ref=model_ref,
            batcher=batcher,
            decode_pool=decode_pool,
            preview_pool=preview_pool,
            max_decode_bytes=settings.max_decode_bytes,
            max_pixels=settings.max_pixels,
            default_samples=settings.mc_samples or loaded.spec.mc_samples,
            timeout_s=settings.request_timeout_s,
            ood_action=settings.ood_action,
            stage=predictor.stage,
            seed=predictor.seed_for,
        )
        state.ready, state.detail = True, "ready"
        log.info("ready: model %s %s on %s", loaded.spec.name, loaded.spec.version, predictor.device)
        return batcher, pools

    app = FastAPI(
        title="bayesnet-cxr",
        version="0.1.0",
        summary="Chest X-ray findings with Monte-Carlo-dropout uncertainty and Grad-CAM",
        description=(
            "POST a chest radiograph (PNG, JPEG or DICOM) and get, for each CheXpert finding, the MC-dropout "
            "mean probability and variance, a decision (positive / negative / uncertain), a referral flag "
            "and Grad-CAM heatmaps. Research and demonstration only: not a medical device."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.state.audit = None  # the lifespan opens the AuditTrail
    app.state.dicom_outbox = None  # the lifespan opens it when forwarding to a PACS is configured
    metrics.watch_audit(lambda: audit_snapshot(app.state.audit) if app.state.audit is not None else None)
    metrics.watch_outbox(lambda: app.state.dicom_outbox.snapshot() if app.state.dicom_outbox is not None else None)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(audit_router)
    install_openapi(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.mount("/swagger-assets", StaticFiles(directory=swagger_assets_dir()), name="swagger-assets")

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
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every response
    return app
