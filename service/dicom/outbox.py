"""Forwarding results to a PACS: a bounded, persistent outbox drained by STOW-RS (``dicomweb-client``).

``put`` makes an SR durable first (written to a temporary file, fsynced, renamed into the outbox directory) and
returns only then, so a PACS that is down, or a restart of the service, loses no result: the sender task stores
the files in arrival order and deletes each one once the PACS has acknowledged it. A failed store is retried with
exponential backoff (``retry_initial_s`` doubling up to ``retry_max_s``); a store the PACS refuses outright (a
4xx other than 408/429: it will never accept that object) moves to ``rejected/`` for an administrator instead of
blocking the queue. When the outbox holds ``max_instances`` files, ``put`` raises ``OutboxFullError`` (503): the
STOW-RS sender sees that instance fail with Out of Resources and may send it again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from service.dicom.metrics import OutboxSnapshot
from service.errors import ServiceError
from service.settings import DicomwebSettings

log = logging.getLogger("service.dicom.outbox")

_SUFFIX = ".dcm"


class OutboxFullError(ServiceError):
    status = 503
    title = "Result outbox full"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "30"})


class Outbox:
    """The directory of SRs waiting for the PACS, and the task that sends them."""

    def __init__(
        self,
        directory: Path,
        url: str,
        *,
        max_instances: int,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.directory = directory
        self.url = url
        self.max_instances = max_instances
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.timeout_s = timeout_s
        self.forwarded = 0
        self.failures = 0
        self.rejected = 0
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rejected").mkdir(exist_ok=True)
        for stale in directory.glob("*.tmp"):  # a put interrupted before its rename: never acknowledged
            stale.unlink()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def pending(self) -> list[Path]:
        """The files waiting, oldest first (names start with the time of the put in nanoseconds)."""
        return sorted(self.directory.glob(f"*{_SUFFIX}"))

    def snapshot(self) -> OutboxSnapshot:
        return OutboxSnapshot(len(self.pending()), self.forwarded, self.failures, self.rejected)

    def write(self, data: bytes) -> None:
        """Make ``data`` (a Part 10 file) durable in the outbox (blocking; :meth:`put` from the event loop, or this
        and then :meth:`notify` in the loop's thread). Raises ``OutboxFullError`` when ``max_instances`` wait."""
        if len(self.pending()) >= self.max_instances:
            raise OutboxFullError(
                f"{self.max_instances} results are already waiting for the PACS, which may be down; send this "
                "instance again later."
            )
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        temporary = self.directory / f"{name}.tmp"
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(self.directory / f"{name}{_SUFFIX}")
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # the rename itself survives a power cut
        finally:
            os.close(directory_fd)

    async def put(self, data: bytes) -> None:
        """Make ``data`` (a Part 10 file) durable in the outbox; the sender forwards it later."""
        await asyncio.to_thread(self.write, data)
        self.notify()

    def notify(self) -> None:
        """Wake the sender: something was written (call in the event loop's thread)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dicomweb-outbox")

    async def stop(self) -> None:
        """Stop sending; what is still waiting stays on disk for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _store(self, path: Path) -> None:
        """One STOW-RS store (blocking); raises on any failure."""
        client = DICOMwebClient(url=self.url)
        client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
        dataset = pydicom.dcmread(io.BytesIO(path.read_bytes()))
        client.store_instances(datasets=[dataset])

    async def _run(self) -> None:
        delay_s = self.retry_initial_s
        while True:
            waiting = self.pending()
            if not waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            path = waiting[0]
            try:
                await asyncio.wait_for(asyncio.to_thread(self._store, path), timeout=self.timeout_s)
            except requests.HTTPError as err:
                status = err.response.status_code if err.response is not None else 0
                self.failures += 1
                if 400 <= status < 500 and status not in (408, 429):
                    path.rename(self.directory / "rejected" / path.name)
                    self.rejected += 1
                    log.error("PACS refused a result (HTTP %d); moved to %s", status, self.directory / "rejected")
                    continue
                log.warning("PACS store failed (HTTP %d); retrying in %.1f s", status, delay_s)
            except (requests.RequestException, TimeoutError, OSError) as err:
                self.failures += 1
                log.warning("PACS unreachable (%s); retrying in %.1f s", type(err).__name__, delay_s)
            else:
                path.unlink()
                self.forwarded += 1
                delay_s = self.retry_initial_s
                continue
            # The whole wait, whatever arrives meanwhile: new results must not turn the backoff into a retry per
            # result against a PACS that is down (they are on disk; the next attempt sends the oldest first).
            await asyncio.sleep(delay_s)
            self._wake.clear()
            delay_s = min(delay_s * 2, self.retry_max_s)


def open_outbox(settings: DicomwebSettings, *, timeout_s: float) -> Outbox | None:
    """The forwarding outbox when ``CXR_DICOMWEB_FORWARD_URL`` is set (docs/dicom.md), else None (blocking: it
    lists what waits on disk). ``timeout_s``: one store request's limit."""
    if settings.forward_url is None:
        return None
    outbox = Outbox(
        settings.outbox_path,
        settings.forward_url,
        max_instances=settings.outbox_max_instances,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        timeout_s=timeout_s,
    )
    pacs = urlsplit(settings.forward_url)
    log.info("forwarding results to %s://%s (%d waiting)", pacs.scheme, pacs.hostname, len(outbox.pending()))
    return outbox
