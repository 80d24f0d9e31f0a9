"""The DIMSE listener: a C-STORE (and C-ECHO) SCP, with ``pynetdicom``, for a PACS or modality that pushes images.

Each C-STORE is one instance handed to the STOW-RS pipeline (``stow.receive`` with one part): screened, scored,
audited and, when a PACS is configured, its results (the SR and the heatmap images) made durable in the forwarding
outbox, all before the C-STORE response leaves. So 0x0000 (Success) means what STOW-RS's Referenced SOP Sequence
means: scored, and the results safe on disk. Failures answer the Failure Reason STOW-RS would have given as the
DIMSE status (PS3.4 B.2.3, PS3.7 C): 0xA700 Out of Resources (queue or outbox full, not answered in time: send
again later), 0xC000 Cannot Understand (not a readable DICOM instance), 0x0110 Processing Failure (lateral, not a
chest, pixels that cannot be decoded), each with the start of the explanation in the Error Comment.

pynetdicom runs each association in its own thread; the C-STORE handler hands the instance to the service's event
loop (``asyncio.run_coroutine_threadsafe``) and waits for the outcome, so the model, the audit trail and the outbox
are the same ones the HTTP routes use. Bounded: at most ``max_associations`` at once, each with one instance in
flight; an association that sends more than ``max_instance_bytes`` for one instance is aborted while it sends,
before the instance is complete in memory; idle associations are closed. Nothing from a header is logged: the log
says what was answered (status, request id, time), and the AE titles of a rejected association.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from service.audit import Auditor, AuditSubject
from service.dicom.multipart import Part
from service.dicom.stow import OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceOutcome, receive
from service.runtime.pipeline import PredictionPipeline
from service.schemas import PredictionResponse
from service.settings import DimseSettings

log = logging.getLogger("service.dicom.dimse")

#: The audit trail's route for an instance received by C-STORE.
ROUTE = "DIMSE C-STORE"
SUCCESS = 0x0000
#: Storage SOP classes accepted: the single-frame radiographs the model reads. Digital X-Ray "For Processing" is
#: not: raw detector values the modality has not yet processed for display, unlike every image the model was
#: trained on. Other classes (CT, MR...) are refused at association negotiation, before any byte of pixels.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,  # digitised films and dataset exports; screened like any other instance
)
#: Room beyond the instance itself in what an association may send for it: PDU headers and the command set.
FRAMING_SLACK_BYTES = 64 * 1024
#: The Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")
#: Error Comment (0000,0902) is LO: at most 64 characters.
_ERROR_COMMENT_CHARS = 64

#: ``store(data, calling_ae_title, request_id)``: score one Part 10 file; the outcome STOW-RS would report.
StoreInstance = Callable[[bytes, str, str], Coroutine[Any, Any, InstanceOutcome]]


def decodable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes to accept: the native little-endian ones and every compressed one whose pixel data an
    installed pydicom decoder plugin can read (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE with pylibjpeg, pyjpegls,
    Pillow). A syntax nothing here decodes is refused at negotiation, so the sender can fall back to another."""
    accepted = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    for uid in AllTransferSyntaxes:
        if not uid.is_compressed or uid in accepted:
            continue
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:  # video, JPIP, JPEG XL...: no pixel decoder at all
            continue
        if decoder.is_available:
            accepted.append(uid)
    return accepted


def status_for(outcome: InstanceOutcome) -> Dataset:
    """The C-STORE response status for one outcome: Success, or its Failure Reason with the explanation."""
    status = Dataset()
    status.Status = SUCCESS if outcome.failure_reason is None else outcome.failure_reason
    if outcome.failure_reason is not None and outcome.detail:
        comment = outcome.detail.encode("ascii", "replace").decode().replace("\\", "/")
        status.ErrorComment = comment[:_ERROR_COMMENT_CHARS]
    return status


def failure(reason: int, detail: str) -> Dataset:
    return status_for(InstanceOutcome(None, None, failure_reason=reason, detail=detail))


def scorer(
    *,
    pipeline: PredictionPipeline,
    auditor: Auditor,
    max_upload_bytes: int,
    forward: Callable[[bytes], Awaitable[None]] | None,
) -> StoreInstance:
    """The coroutine that scores one received instance as STOW-RS does, under its own audit record.

    The record's client is the self-declared calling AE title (``ae-`` + title): DIMSE has no API key.
    """

    async def store(data: bytes, calling_ae: str, request_id: str) -> InstanceOutcome:
        subject = AuditSubject(
            route=ROUTE, request_id=request_id, client_id=f"ae-{calling_ae}", model=pipeline.model_ref
        )

        def audited(_: int, upload: bytes, prediction: Awaitable[PredictionResponse]) -> Awaitable[PredictionResponse]:
            return auditor.audited(subject, upload, prediction)

        (outcome,) = await receive(
            [Part("application/dicom", data)],
            pipeline=pipeline,
            audited=audited,
            request_id=request_id,
            max_upload_bytes=max_upload_bytes,
            forward=forward,
        )
        return outcome

    return store


@dataclass
class _Peer:
    """The listener's view of one association."""

    received_bytes: int = 0  # P-DATA received since its last C-STORE
    oversized: bool = False  # aborted for sending too much: what it still sends is ignored
    answering: bool = False  # a C-STORE scored whose answer is not yet on the wire
    closed: bool = False
    connection: socket.socket | None = None


class DimseListener:
    """A C-STORE and C-ECHO SCP on ``host:port``, bound by ``start()`` and closed by ``stop()``."""

    def __init__(
        self,
        store: StoreInstance,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str,
        port: int,
        ae_title: str,
        allowed_calling_ae: list[str],
        max_associations: int,
        idle_timeout_s: float,
        max_instance_bytes: int,
        answer_timeout_s: float,
        stores: Counter | None = None,
    ) -> None:
        self.store = store
        self.loop = loop
        self.address = (host, port)
        self.max_received_bytes = max_instance_bytes + FRAMING_SLACK_BYTES
        self.answer_timeout_s = answer_timeout_s
        self.stores = stores
        ae = AE(ae_title=ae_title)
        ae.require_calling_aet = list(allowed_calling_ae)  # empty: any calling AE title
        ae.require_called_aet = True  # a PACS configured with the wrong title learns it at once
        ae.maximum_associations = max_associations
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        ae.network_timeout = idle_timeout_s
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)  # C-ECHO: pynetdicom's default handler answers Success
        self.ae = ae
        self._server: ThreadedAssociationServer | None = None
        self._peers: dict[Association, _Peer] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0  # C-STOREs being scored or whose answer is not yet on the wire
        self._closing = False

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the system chose for port 0)."""
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in pynetdicom's threads (raises ``OSError`` when the address is taken)."""
        self._server = self.ae.start_server(
            self.address,
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_c_store),
                (evt.EVT_DATA_RECV, self._on_data),
                (evt.EVT_PDU_SENT, self._on_sent),
                (evt.EVT_CONN_OPEN, self._on_opened),
                (evt.EVT_CONN_CLOSE, self._on_closed),
                (evt.EVT_REJECTED, self._on_rejected),
            ],
        )
        log.info("DIMSE listener %s on %s:%d", self.ae.ae_title, self.address[0], self.port)

    def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting associations, let the C-STOREs being scored answer (up to ``drain_timeout_s``), then
        abort the associations still open. Blocking: call it off the event loop, which the draining needs."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            self._closing = True
        server.shutdown()
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=drain_timeout_s)
        for association in server.active_associations:
            association.abort()
        log.info("DIMSE listener stopped")

    def _answered(self) -> None:
        """One C-STORE fewer in flight (the lock held)."""
        self._in_flight -= 1
        self._idle.notify_all()

    def _on_data(self, event: evt.Event) -> None:
        """Count what an association sends for its current instance; abort it past the limit (EVT_DATA_RECV runs
        in the association's reader thread once per PDU, so the limit holds within one PDU of its value)."""
        data: bytes = event.data
        if not data or data[0] != 0x04:  # only P-DATA-TF carries a dataset
            return
        with self._lock:
            peer = self._peers.get(event.assoc)
            if peer is None or peer.oversized:  # closed, or the PDUs already on their way after the abort
                return
            peer.received_bytes += len(data)
            peer.oversized = peer.received_bytes > self.max_received_bytes
            oversized = peer.oversized
        if oversized:
            log.warning("DIMSE association aborted: an instance exceeds %d bytes", self.max_received_bytes)
            self._count(OUT_OF_RESOURCES)
            event.assoc.abort()

    def _on_sent(self, event: evt.Event) -> None:
        """The listener only sends answers: the first PDU after a C-STORE is scored carries its answer."""
        with self._lock:
            peer = self._peers.get(event.assoc)
            if peer is not None and peer.answering:
                peer.answering = False
                self._answered()

    def _on_opened(self, event: evt.Event) -> None:
        connection = event.assoc.dul.socket
        with self._lock:  # every association starts here, before it can send anything
            self._peers[event.assoc] = _Peer(connection=connection.socket if connection is not None else None)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            peer = self._peers.pop(event.assoc, None)
            if peer is None:
                return
            peer.closed = True
            if peer.answering:  # gone before its answer: nothing left to wait for
                peer.answering = False
                self._answered()
        if peer.connection is not None:
            # pynetdicom 3.0 skips close() when shutdown() fails (a peer that already hung up) and leaves the socket
            # to the garbage collector; closing twice is harmless.
            peer.connection.close()

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "DIMSE association rejected (calling AE title %r, called AE title %r): a calling title not allowed, a "
            "called title other than %r, or too many associations",
            requestor.ae_title,
            getattr(requestor.primitive, "called_ae_title", None),
            self.ae.ae_title,
        )

    def _on_c_store(self, event: evt.Event) -> Dataset:
        """Score the instance on the event loop and answer its status; never raises (a handler's exception would
        answer pynetdicom's generic 0xC211). Counted in flight until the answer is on the wire, so that ``stop``
        aborts no association between its answer and the sending of it."""
        association: Association = event.assoc
        with self._lock:
            peer = self._peers.get(association) or _Peer(closed=True)  # gone: _on_closed has forgotten it
            oversized, peer.oversized, peer.received_bytes = peer.oversized, False, 0  # count the next one from 0
            scoring = not (oversized or self._closing or peer.closed)
            if scoring:
                self._in_flight += 1
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        answer = failure(OUT_OF_RESOURCES, "The service is shutting down; send again later.")
        try:
            if oversized:  # its last PDU arrived with the abort: counted there, never scored
                return failure(OUT_OF_RESOURCES, "The instance exceeds the size limit.")
            if scoring:
                answer = self._score(event.encoded_dataset(), association.requestor.ae_title, request_id)
        finally:
            if scoring:
                with self._lock:
                    if peer.closed:
                        self._answered()
                    else:
                        peer.answering = True  # until _on_sent or _on_closed
        status = int(answer.Status)
        self._count(status)
        log.info("C-STORE %s: status 0x%04X in %.0f ms", request_id, status, (time.perf_counter() - started) * 1000)
        return answer

    def _score(self, data: bytes, calling_ae: str, request_id: str) -> Dataset:
        if self.loop.is_closed():
            return failure(OUT_OF_RESOURCES, "The service is shutting down; send again later.")
        future = asyncio.run_coroutine_threadsafe(self.store(data, calling_ae, request_id), self.loop)
        try:
            return status_for(future.result(timeout=self.answer_timeout_s))
        except FutureTimeoutError:
            future.cancel()
            return failure(OUT_OF_RESOURCES, "Not scored in time; send again later.")
        except Exception as err:  # a bug, not the instance's fault: answered, logged, never crashing the listener
            log.error("C-STORE %s could not be scored: %s", request_id, type(err).__name__)
            return failure(PROCESSING_FAILURE, "The service failed to score this instance.")

    def _count(self, status: int) -> None:
        if self.stores is not None:
            self.stores.labels(status=f"0x{status:04X}").inc()


def open_listener(
    settings: DimseSettings,
    *,
    pipeline: PredictionPipeline,
    auditor: Auditor,
    forward: Callable[[bytes], Awaitable[None]] | None,
    loop: asyncio.AbstractEventLoop,
    max_upload_bytes: int,
    request_timeout_s: float,
    stores: Counter | None = None,
) -> DimseListener | None:
    """Bind and start the C-STORE listener when ``CXR_DIMSE_PORT`` is set (docs/dicom.md), else None. Blocking
    (binds a socket): call it off the event loop, whose ``loop`` the listener is given."""
    if settings.port is None:
        return None
    listener = DimseListener(
        scorer(pipeline=pipeline, auditor=auditor, max_upload_bytes=max_upload_bytes, forward=forward),
        loop,
        host=settings.host,
        port=settings.port,
        ae_title=settings.ae_title,
        allowed_calling_ae=settings.allowed_ae,
        max_associations=settings.max_associations,
        idle_timeout_s=settings.idle_timeout_s,
        max_instance_bytes=max_upload_bytes,
        # The pipeline's own timeout, then the audit record and the outbox write, each bounded by the same.
        answer_timeout_s=3 * request_timeout_s,
        stores=stores,
    )
    listener.start()
    return listener
