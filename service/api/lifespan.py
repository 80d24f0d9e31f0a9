"""What one app starts before it answers and stops after its last answer, in order (the FastAPI lifespan).

Start-up: the audit trail first (a service that cannot keep its trail must not answer, docs/audit.md), then the
DICOMweb outbox (fails fast and cheaply), then the model (``InferenceEngine``: load, warm up, start the batcher),
the supervisor of its worker thread, and last the DIMSE listener, which needs all of them. Any failure ends
start-up with the reason in ``state.detail``: never a half-alive server. Shutdown runs the same in reverse: stop
being ready, let the listener finish its C-STOREs, let the batcher finish every request it accepted, keep what
the outbox has not forwarded for the next start, write every queued audit record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import torch
from fastapi import FastAPI

from service.api.state import ServiceState
from service.audit import AuditTrail
from service.dicom.dimse import open_listener
from service.dicom.outbox import open_outbox
from service.guarantee.live import GuaranteeCollector, GuaranteeMonitor
from service.runtime.engine import InferenceEngine, load_single_threaded
from service.runtime.operating import Operating, OperatingSwitch
from service.runtime.signals import LoadSignals

log = logging.getLogger("service.api.lifespan")


class Lifespan:
    """The lifespan of the app built around ``state``; ``signals``: shared by the pipeline, batcher and writer."""

    def __init__(self, state: ServiceState, signals: LoadSignals, operating: OperatingSwitch) -> None:
        self.state = state
        self.signals = signals
        self.operating = operating
        # Read here, on the thread that builds the app, before the lifespan's helper threads change torch's default.
        self.intraop_threads = state.settings.torch_threads or torch.get_num_threads()

    @asynccontextmanager
    async def __call__(self, app: FastAPI) -> AsyncIterator[None]:
        state, settings = self.state, self.state.settings
        async with AsyncExitStack() as stack:
            try:
                trail = await asyncio.to_thread(
                    AuditTrail.from_settings,
                    settings.audit,
                    durable_timeout_s=settings.request_timeout_s,
                    more_coming=self.signals.answers_coming,
                )
                stack.push_async_callback(asyncio.to_thread, trail.close)  # writes every record still queued
                app.state.audit = trail
                outbox = await asyncio.to_thread(open_outbox, settings.dicomweb, timeout_s=settings.request_timeout_s)
                app.state.dicom_outbox = outbox
                engine = await self._start_engine()
                if outbox is not None:
                    stack.push_async_callback(outbox.stop)  # what is not yet forwarded waits for the next start
                stack.push_async_callback(engine.stop)
                supervisor = asyncio.get_running_loop().create_task(self._supervise(engine), name="worker-supervisor")
                stack.callback(supervisor.cancel)
                if outbox is not None:
                    outbox.start()
                rule = engine.loaded.spec.referral
                self.operating.set(Operating(mode=settings.guarantee.mode))
                if rule is not None:  # the rule's promise in operation: its recorded state, watched on the verdicts
                    monitor = GuaranteeMonitor(
                        trail.store,
                        rule,
                        engine.loaded.spec.trained_labels,
                        model_sha256=engine.loaded.sha256,
                        switch=self.operating,
                        settings=settings.guarantee,
                    )
                    await asyncio.to_thread(monitor.load_state)
                    await asyncio.to_thread(monitor.refresh)  # the first answer already has its live status
                    watching = asyncio.get_running_loop().create_task(monitor.run(), name="guarantee-watch")
                    stack.callback(watching.cancel)
                    app.state.guarantee = monitor
                    state.metrics.watch(GuaranteeCollector(monitor))
                dimse = await asyncio.to_thread(
                    open_listener,
                    settings.dimse,
                    pipeline=engine.pipeline,
                    auditor=trail.auditor,
                    forward=outbox.put if outbox is not None else None,
                    loop=asyncio.get_running_loop(),
                    max_upload_bytes=settings.max_upload_bytes,
                    request_timeout_s=settings.request_timeout_s,
                    stores=state.metrics.dimse_stores,
                )
                if dimse is not None:  # stopped first: its C-STOREs in flight need the batcher, trail and outbox
                    stack.push_async_callback(asyncio.to_thread, dimse.stop, settings.request_timeout_s)
            except Exception as err:
                # Never a half-alive server: uvicorn exits before it binds; `python -m service` reports this.
                state.fatal_error, state.detail = err, f"start-up failed: {err}"
                log.critical("cannot start: %s", err)
                raise
            state.ready, state.detail = True, "ready"
            log.info("ready: model %s on %s", engine.pipeline.model_ref.name, engine.predictor.device)
            try:
                yield
            finally:
                state.ready, state.detail = False, "shutting down" if state.fatal_error is None else state.detail
        log.info("stopped")

    async def _start_engine(self) -> InferenceEngine:
        state, settings = self.state, self.state.settings
        state.detail = "loading the model"
        loaded = await load_single_threaded(settings)
        state.loaded = loaded
        state.metrics.model_info.labels(name=loaded.spec.name, version=loaded.spec.version).set(1)
        state.detail = "warming up"
        engine = await InferenceEngine.start(
            loaded,
            settings,
            intraop_threads=self.intraop_threads,
            signals=self.signals,
            operating=self.operating,
            on_batch=state.metrics.observe_batch,
        )
        state.batcher, state.predictor, state.pipeline = engine.batcher, engine.predictor, engine.pipeline
        return engine

    async def _supervise(self, engine: InferenceEngine) -> None:
        """Crash-only policy for the inference worker: if its loop dies, stop being ready and end the process.

        A dead worker means a bug or a broken device in an unknown state; a fresh process (started by systemd,
        Kubernetes or the Gunicorn arbiter) is the only state we can vouch for, so the worker is not restarted in
        place. The batcher has already failed every pending request with a 503.
        """
        await engine.batcher.wait_ended()
        if engine.batcher.last_error is None:
            return  # stopped by the lifespan: a normal shutdown
        self.state.ready, self.state.detail = False, "inference worker died; the process is exiting to be restarted"
        self.state.fatal_error = engine.batcher.last_error
        log.critical(
            "inference worker died (%r): shutting down so the supervisor starts a fresh process", self.state.fatal_error
        )
        self.state.request_exit()
