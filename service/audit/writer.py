"""The audit writer: one thread that takes records from a queue and commits them in batches.

The event loop only enqueues (microseconds) and, for the prediction's answer, awaits a future; the database
round trip, the fsync and any retry happen on this thread. Several records waiting together go into one
transaction (group commit), so the cost per record falls as the load rises. Under load the writer also holds
a transaction open for up to ``group_commit_s`` while the service says more answers are being finished
(``more_coming``, in the service ``LoadSignals.answers_coming``): the answers of one inference batch are
completed moments apart, and without the wait each would pay for a commit of its own (SQLAlchemy, SQLite and the
wake-ups; docs/benchmarks.md measures the cost). A lone request never waits: nothing else is coming.

When a record counts as durable (what resolving its future means):

* ``fail-closed``: its transaction has committed (SQLite WAL with ``synchronous=FULL``: fsynced; PostgreSQL:
  ``COMMIT`` returned, with the server's default ``synchronous_commit=on`` flushed to its WAL). The route
  answers only after that, so every answer a client received has its record in the database; a write that
  fails fails the future and the route answers 503 instead.
* ``buffer``: committed as above, or, while the database fails, fsynced into the on-disk spool
  (:mod:`service.audit.spool`) that is replayed into the database when it answers again. A full spool fails
  the future (503).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from service.audit.spool import Spool, SpoolFullError
from service.audit.store import AuditStore
from service.errors import AuditUnavailableError
from service.schemas import AuditRecord

log = logging.getLogger("service.audit")

AuditPolicy = Literal["fail-closed", "buffer"]


@dataclass
class _Pending:
    record: AuditRecord
    enqueued_at: float
    future: Future[None] = field(default_factory=Future)


@dataclass
class WriterStats:
    """Read by /metrics; written only by the writer thread (plain ints and floats: atomic enough to read)."""

    written: int = 0
    commits: int = 0  # transactions that wrote new records: written / commits is the group size
    failures: int = 0
    spooled: int = 0
    replayed: int = 0
    purged: int = 0
    oldest_pending_since: float | None = None


class AuditWriter:
    def __init__(
        self,
        store: AuditStore,
        *,
        policy: AuditPolicy,
        spool: Spool | None,
        max_batch: int = 256,
        retention_days: int | None = None,
        purge_every_s: float = 3600.0,
        retry_s: float = 1.0,
        group_commit_s: float = 0.0,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        """``group_commit_s``: the longest a transaction waits for more records while ``more_coming()`` says
        more are about to be submitted (0: never waits). ``more_coming`` is called on the writer thread; it
        must be cheap and thread-safe (reading a counter)."""
        if policy == "buffer" and spool is None:
            raise ValueError("the buffer policy needs a spool directory")
        self.store = store
        self.policy = policy
        self.spool = spool
        self.max_batch = max_batch
        self.retention_days = retention_days
        self.purge_every_s = purge_every_s
        self.retry_s = retry_s
        self.group_commit_s = group_commit_s
        self._more_coming = more_coming
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0
        self._next_replay = 0.0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def lag_s(self) -> float:
        """Age of the oldest record not yet durable (0 when none waits)."""
        since = self.stats.oldest_pending_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    @property
    def spool_depth(self) -> int:
        return 0 if self.spool is None else self.spool.depth

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.error("the audit writer did not finish within %.0f s; %d records not written", timeout_s, self.queued)
        self._thread = None

    def submit(self, record: AuditRecord) -> Future[None]:
        """Queue ``record``; the future resolves when it is durable (see the module docstring) or fails with
        :class:`AuditUnavailableError`."""
        pending = _Pending(record, time.monotonic())
        if not self.alive:
            pending.future.set_exception(AuditUnavailableError("the audit writer is not running"))
            return pending.future
        self._queue.put(pending)
        return pending.future

    def _take(self) -> tuple[list[_Pending], bool]:
        """Wait for one record (or the stop marker), then take whatever else is already queued, and, while more
        are coming, what arrives within ``group_commit_s``."""
        batch: list[_Pending] = []
        try:
            first = self._queue.get(timeout=self.retry_s)
        except queue.Empty:
            return batch, False
        stopping = self._add(batch, first)
        stopping = self._drain(batch) or stopping
        more_coming = self._more_coming
        if stopping or self.group_commit_s <= 0 or more_coming is None:
            return batch, stopping
        # Woken only by arrivals (or the window's end): no polling, which would take the GIL from the threads
        # finishing those very answers.
        deadline = time.monotonic() + self.group_commit_s
        while len(batch) < self.max_batch and more_coming():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if self._add(batch, item) or self._drain(batch):
                return batch, True
        return batch, stopping

    def _drain(self, batch: list[_Pending]) -> bool:
        """Move what is queued now into ``batch`` (up to ``max_batch``); True if the stop marker was among it."""
        stopping = False
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            stopping = self._add(batch, item) or stopping
        return stopping

    @staticmethod
    def _add(batch: list[_Pending], item: _Pending | None) -> bool:
        if item is None:
            return True
        batch.append(item)
        return False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        stopping = False
        batch: list[_Pending] = []
        try:
            while True:
                batch, stop_now = self._take()
                stopping = stopping or stop_now
                if batch:
                    self.stats.oldest_pending_since = batch[0].enqueued_at
                    self._write(batch)
                self.stats.oldest_pending_since = None
                self._maintain()
                if stopping and self._queue.empty():
                    return
        except BaseException as err:
            # A bug, not a database failure (those are handled in _write): fail every waiting record rather than
            # leave its request hanging, and end the thread; submit() then fails at once (503).
            log.critical("the audit writer died: %r", err)
            failure = AuditUnavailableError(f"the audit writer died ({type(err).__name__}); restart the process")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item.future.set_exception(failure)
            raise

    def _write(self, batch: list[_Pending]) -> None:
        records = [p.record for p in batch]
        error: BaseException | None = None
        try:
            if self.spool is not None and self.spool.depth:
                self._replay()  # the spool first, so that the database keeps the order records arrived in
            if self.spool is not None and self.spool.depth:
                raise AuditUnavailableError("the spool could not be replayed yet")
            self.store.insert(records)
            self.stats.written += len(records)
            self.stats.commits += 1
        except (SQLAlchemyError, AuditUnavailableError, OSError) as err:
            self.stats.failures += 1
            error = err
            log.error("audit write of %d records failed: %s", len(records), err)
        if error is not None and self.spool is not None:
            try:
                self.spool.append(records)
                self.stats.spooled += len(records)
                error = None
            except (SpoolFullError, OSError) as spool_error:
                error = spool_error
                log.error("audit spool refused %d records: %s", len(records), spool_error)
        for pending in batch:
            if error is None:
                pending.future.set_result(None)
            else:
                pending.future.set_exception(AuditUnavailableError(f"the audit trail cannot be written: {error}"))

    def _replay(self) -> None:
        assert self.spool is not None
        for path in self.spool.files():
            records = self.spool.read(path)
            self.stats.replayed += self.store.insert(records, skip_existing=True)
            self.spool.remove(path)
            log.info("replayed %d spooled audit records from %s", len(records), path.name)

    def _maintain(self) -> None:
        """Between batches: retry the spool while idle, and purge past the retention period once an interval."""
        now = time.monotonic()
        if self.spool is not None and self.spool.depth and now >= self._next_replay:
            self._next_replay = now + self.retry_s
            try:
                self._replay()
            except (SQLAlchemyError, OSError) as err:
                log.warning("audit spool replay failed (%d records wait): %s", self.spool.depth, err)
        if self.retention_days is not None and now >= self._next_purge:
            self._next_purge = now + self.purge_every_s
            cutoff = datetime.now(timezone.utc) - timedelta(days=self.retention_days)
            try:
                self.stats.purged += self.store.purge(cutoff)
            except SQLAlchemyError as err:
                log.warning("audit retention purge failed: %s", err)
