"""``--forward-results``: each scored DICOM film's result objects to a PACS through the service's outbox (off by
default).

The objects are what STOW-RS forwards for a film (``service.dicom.objects``: the SR, the result page, the heatmap
images), sent by STOW-RS to ``CXR_DICOMWEB_FORWARD_URL`` through ``service.dicom.outbox.Outbox``: each made durable
on disk before the film's result line is written, then stored by a sender running in its own thread, with the
outbox's backoff and its ``rejected/`` folder for objects the PACS refuses. So a film's objects are forwarded at
least once: a run killed between the two writes scores the film again on resume and forwards a second SR (new
UIDs), never none. The outbox directory sits beside the run's output file (``results.outbox/``, one per shard);
what is still waiting when the run ends stays there, and the next run on the same output sends it first.

Only DICOM films have a header for an SR to reference: PNG and JPEG films are counted and not forwarded. When the
outbox is full (``CXR_DICOMWEB_OUTBOX_MAX_INSTANCES``, the PACS slower than scoring or down), the writer waits for
room: scoring slows to what the PACS takes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bayesnet import ModelSpec
from service.dicom.objects import pacs_objects
from service.dicom.outbox import Outbox, OutboxFullError
from service.dicom.sr import DicomSourceError, checked_source
from service.schemas import PredictionResponse
from service.settings import DicomwebSettings

__all__ = ["ResultForwarder", "outbox_dir"]

log = logging.getLogger("service.archive")

#: How often a writer waiting for room in a full outbox looks again, and how often it says so.
_FULL_POLL_S, _FULL_LOG_S = 0.5, 30.0


def outbox_dir(target: Path) -> Path:
    """The outbox of the run writing ``target`` (``results.jsonl`` -> ``results.outbox``)."""
    return target.with_suffix(".outbox")


class ResultForwarder:
    """The outbox of one archive run and the thread that sends it."""

    def __init__(self, settings: DicomwebSettings, directory: Path, *, spec: ModelSpec, max_pixels: int) -> None:
        if settings.forward_url is None:
            raise ValueError("--forward-results needs CXR_DICOMWEB_FORWARD_URL (the PACS's STOW-RS root)")
        self.spec, self.max_pixels = spec, max_pixels
        self.outbox = Outbox(
            directory,
            settings.forward_url,
            max_instances=settings.outbox_max_instances,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
        )
        self.films = self.not_dicom = self.failed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="archive-outbox", daemon=True)
        self._started = threading.Event()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._begin)
        self._loop.run_forever()

    def _begin(self) -> None:
        self.outbox.start()
        self._started.set()

    def start(self) -> ResultForwarder:
        waiting = len(self.outbox.pending())
        self._thread.start()
        self._started.wait()
        log.info("forwarding results to the PACS through %s (%d waiting from before)", self.outbox.directory, waiting)
        return self

    def forward(self, key: str, data: bytes, result: PredictionResponse) -> None:
        """Build the film's objects and make them durable in the outbox (blocking; waits while it is full). A film
        whose objects cannot be built is logged and counted: it is scored, and the run goes on."""
        try:
            header, _ = checked_source(data)
        except DicomSourceError:
            self.not_dicom += 1
            return
        try:
            objects = pacs_objects(
                data, header, result, spec=self.spec, max_pixels=self.max_pixels, created=datetime.now(timezone.utc)
            )
        except Exception:  # a header highdicom cannot turn into an SR, say: this film's objects only
            self.failed += 1
            log.exception("the result objects of %s could not be built; not forwarded", key)
            return
        for item in objects:
            self._write(item)
        self.films += 1

    def _write(self, data: bytes) -> None:
        said = time.monotonic()
        while True:
            try:
                self.outbox.write(data)
                break
            except OutboxFullError:
                if time.monotonic() - said > _FULL_LOG_S:
                    log.warning("the outbox %s is full: waiting for the PACS to take results", self.outbox.directory)
                    said = time.monotonic()
                time.sleep(_FULL_POLL_S)
        self._loop.call_soon_threadsafe(self.outbox.notify)

    def close(self, wait_s: float) -> None:
        """Give the sender up to ``wait_s`` to empty the outbox, stop it, and log what became of the results; what is
        left stays on disk."""
        deadline = time.monotonic() + wait_s
        while self.outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        asyncio.run_coroutine_threadsafe(self.outbox.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        waiting = len(self.outbox.pending())
        log.info(
            "forwarded to the PACS: %d objects of %d films stored, %d refused (in %s), %d still waiting%s; %d films "
            "not DICOM (no SR), %d whose objects could not be built",
            self.outbox.forwarded,
            self.films,
            self.outbox.rejected,
            self.outbox.directory / "rejected",
            waiting,
            " (the next run on this output sends them first)" if waiting else "",
            self.not_dicom,
            self.failed,
        )
