"""An explicit, bounded asyncio micro-batcher: many concurrent ``submit`` calls -> one ``process(list)`` call.

Why: the model is far cheaper per image in a batch than one image at a time, and it must run off the event loop
and on one thread per device. So requests wait in a bounded queue; a single worker task gathers up to
``max_batch_size`` of them (waiting at most ``max_wait_ms`` after the oldest one arrived) and runs
``process(items)`` in the batcher's own one-thread executor, then routes result ``i`` to the caller of item ``i``.

The limits are explicit and the failure modes are contained:

* a full queue rejects at once (:class:`QueueFullError` with a ``retry_after_s`` hint), it never makes callers wait
  for space, so overload turns into fast 503s instead of piling up timeouts;
* a caller that gives up (its task is cancelled, e.g. the client disconnected) has its item dropped before
  inference when that is still possible;
* ``process`` raising, or returning the wrong number of results, fails only that batch;
* a bug in the worker loop itself fails every pending caller with :class:`BatcherError` and leaves ``alive`` False
  (for the readiness probe) instead of leaving callers waiting forever.

The lifespan owns it: ``await start()`` after the model is loaded, ``await stop()`` on shutdown (drains by default).
The design follows Ray Serve's ``serve/batching.py``; the single executor thread and the bounded queue are ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "BatchSizeMismatchError",
    "BatchStats",
    "BatcherClosedError",
    "BatcherError",
    "MicroBatcher",
    "QueueFullError",
]

logger = logging.getLogger("service.runtime.batcher")

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

# How many recent batch latencies feed the Retry-After estimate.
_LATENCY_WINDOW = 16


class BatcherError(Exception):
    """Base class of everything the batcher raises to a caller of :meth:`MicroBatcher.submit`."""


class QueueFullError(BatcherError):
    """The queue already holds ``max_queue`` items; ``retry_after_s`` estimates when there will be room."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosedError(BatcherError):
    """The batcher is not accepting work: not started yet, or :meth:`MicroBatcher.stop` has begun."""


class BatchSizeMismatchError(BatcherError):
    """``process`` returned a different number of results than it was given items (a bug in ``process``)."""


@dataclass(frozen=True)
class BatchStats:
    """What one processed batch did, handed to ``on_batch`` (e.g. to feed Prometheus histograms).

    ``size`` items went into ``process``; ``queue_wait_s[i]`` is how long item ``i`` waited from ``submit`` to the
    batch starting; ``process_s`` is the wall time of the ``process`` call; ``failed`` is True when it raised or
    returned the wrong number of results; ``dropped_cancelled`` counts items whose caller gave up before inference
    since the previous report (they never reached ``process``).
    """

    size: int
    queue_wait_s: tuple[float, ...]
    process_s: float
    failed: bool
    dropped_cancelled: int


@dataclass(eq=False)  # eq=False: identity comparison, so deque.remove() removes exactly this entry
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    submitted_at: float  # loop.time()


class MicroBatcher(Generic[T, R]):
    """Collects concurrent :meth:`submit` calls into batches for ``process``, which runs in one dedicated thread.

    Args:
        process: maps a batch of items to one result per item, in order. Runs in the batcher's single worker
            thread, never on the event loop, and never concurrently with itself.
        max_batch_size: most items per ``process`` call.
        max_wait_ms: longest a batch waits to fill after its oldest item arrived; a lone item is processed after
            this delay. Items already queued (e.g. while the previous batch ran) are taken without waiting more.
        max_queue: most items waiting for a batch (the batch being processed is not counted); beyond it
            :meth:`submit` raises :class:`QueueFullError` at once.
        name: names the worker thread and task, and prefixes log messages.
        on_batch: called on the event loop after every ``process`` call with its :class:`BatchStats`; must be
            cheap. Its exceptions are logged and otherwise ignored.
        more_coming: optional hint, called on the event loop: whether more items are about to be submitted
            (e.g. uploads still being decoded). When it says no, a partial batch is not held for
            ``max_wait_ms``: waiting could only add latency.
        thread_initializer: run once in the worker thread when it starts (e.g. the thread's torch settings).
    """

    def __init__(
        self,
        process: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        name: str = "inference",
        on_batch: Callable[[BatchStats], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
        thread_initializer: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if not max_wait_ms >= 0:  # also rejects NaN
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_queue = max_queue
        self._name = name
        self._on_batch = on_batch
        self._more_coming = more_coming
        self._thread_initializer = thread_initializer

        self._queue: deque[_Pending[T, R]] = deque()
        self._in_flight: list[_Pending[T, R]] = []  # taken from the queue, not yet settled
        self._wakeup = asyncio.Event()  # set by submit/stop; the worker clears it before sleeping on it
        self._recent_process_s: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._dropped_unreported = 0

        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._accepting = False
        self._last_error: BaseException | None = None
        self._batch_started_at: float | None = None  # time.monotonic() while process() runs, else None

    # ------------------------------------------------------------------ state

    @property
    def busy_for_s(self) -> float:
        """Seconds the batch now in ``process`` has been running; 0 between batches.

        A batch that runs for longer than any request may wait means a hung worker (a deadlocked kernel,
        a device that stopped answering): the service reports it through readiness and liveness.
        """
        started = self._batch_started_at
        return 0.0 if started is None else time.monotonic() - started

    @property
    def alive(self) -> bool:
        """True while the worker task runs; False before start, after stop, or once the worker loop has died."""
        return self._task is not None and not self._task.done() and self._last_error is None

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being processed)."""
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` currently takes new items."""
        return self._accepting

    @property
    def last_error(self) -> BaseException | None:
        """The exception that killed the worker loop, if it died (``process`` failures do not count)."""
        return self._last_error

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the worker task (on the running loop) and the executor whose single thread runs ``process``.

        A batcher runs once: starting it twice, or after :meth:`stop`, raises :class:`BatcherError`.
        """
        if self._started:
            raise BatcherError(f"{self._name}: batcher was already started; build a new one instead of restarting")
        self._started = True
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=self._name, initializer=self._thread_initializer
        )
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-batcher")

    async def run_in_worker(self, fn: Callable[[], V]) -> V:
        """Run ``fn`` in the worker thread, between batches (e.g. the warm-up, on the thread that will infer).

        Raises :class:`BatcherError` before :meth:`start` or after :meth:`stop`.
        """
        if self._executor is None or not self._accepting:
            raise BatcherError(f"{self._name}: batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def stop(self, *, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop accepting work, finish or fail what is pending, end the worker and shut the executor down.

        With ``drain=True`` every item already accepted is processed and its caller gets its result. With
        ``drain=False`` items still queued fail with :class:`BatcherClosedError`; a batch already running in the
        thread is allowed to finish. If the worker has not finished after ``timeout_s`` it is cancelled and every
        unsettled caller gets :class:`BatcherClosedError` (a ``process`` call already running cannot be
        interrupted; its thread ends once it returns). Idempotent; safe before :meth:`start`.
        """
        self._started = True  # a stopped batcher cannot be started
        self._accepting = False
        if not drain:
            self._fail_queued(lambda: BatcherClosedError(f"{self._name}: batcher stopped before this item ran"))
        self._wakeup.set()

        task = self._task
        abandoned = False  # a process() call may still be running in the thread
        try:
            if task is not None and not task.done():
                # asyncio.wait neither raises the task's exception nor cancels it on timeout.
                done, _ = await asyncio.wait({task}, timeout=timeout_s)
                if not done:
                    logger.warning("%s: worker did not finish within %s s; cancelling it", self._name, timeout_s)
                    abandoned = True
                    task.cancel()
                    await asyncio.wait({task})
        except asyncio.CancelledError:
            # Our caller was cancelled: do not leave the worker running unsupervised, then propagate.
            if task is not None:
                task.cancel()
            abandoned = True
            raise
        finally:
            # Normally empty by now; this only catches items stranded by an abnormal worker end.
            self._fail_queued(lambda: BatcherClosedError(f"{self._name}: batcher stopped before this item ran"))
            if self._executor is not None:
                # Joining is instant when the thread is idle; never block the loop on a process() still running.
                self._executor.shutdown(wait=not abandoned, cancel_futures=True)

    async def wait_ended(self) -> None:
        """Return once the worker task has ended: after :meth:`stop`, or when the worker loop died.

        Lets a supervisor (the app's lifespan) react to a dead worker without polling ``alive``; tell the two
        endings apart with :attr:`last_error`. Raises :class:`BatcherError` before :meth:`start`.
        """
        if self._task is None:
            raise BatcherError(f"{self._name}: batcher was never started")
        await asyncio.wait({self._task})

    # ------------------------------------------------------------------ submit

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result from ``process``.

        Raises :class:`QueueFullError` at once when the queue is full, :class:`BatcherClosedError` when not
        accepting, :class:`BatcherError` if the worker died, :class:`BatchSizeMismatchError` or whatever
        ``process`` raised if this item's batch failed. If the awaiting task is cancelled, the item is removed
        from the queue, so the model never sees it unless its batch had already started.
        """
        self.admit()
        loop = asyncio.get_running_loop()
        entry: _Pending[T, R] = _Pending(item, loop.create_future(), loop.time())
        self._queue.append(entry)
        self._wakeup.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._forget(entry)
            raise

    def admit(self, pending: int = 0) -> None:
        """Raise what :meth:`submit` would raise now if ``pending`` items were already queued ahead of one more.

        Callers that do work before submitting (decoding an upload) call this first, counting the items already
        on their way (``pending``), so an overloaded service sheds a request before spending anything on it.

        Raises:
            BatcherError: the worker died. BatcherClosedError: not accepting. QueueFullError: no room.
        """
        if self._last_error is not None:
            raise self._worker_died_error(self._last_error)
        if not self._accepting:
            state = "stopping" if self._task is not None else "not started"
            raise BatcherClosedError(f"{self._name}: batcher is {state} and takes no new items")
        if len(self._queue) + pending >= self._max_queue:
            retry_after_s = self.retry_after_s()
            raise QueueFullError(
                f"{self._name}: inference queue is full ({self._max_queue} items waiting or being decoded); "
                f"retry in about {retry_after_s:.0f} s",
                retry_after_s=retry_after_s,
            )

    def _forget(self, entry: _Pending[T, R]) -> None:
        """Drop a cancelled caller's item if it is still queued (frees its slot at once)."""
        try:
            self._queue.remove(entry)
        except ValueError:
            return  # already taken into a batch; the worker skips it because its future is cancelled
        self._dropped_unreported += 1

    def retry_after_s(self) -> float:
        """Whole seconds until the queue has probably drained a batch's worth: recent batch latency x batches ahead.

        At least 1 s: a client told to retry immediately would just hit the full queue again.
        """
        if not self._recent_process_s:
            return 1.0
        mean_process_s = sum(self._recent_process_s) / len(self._recent_process_s)
        batches_ahead = math.ceil(len(self._queue) / self._max_batch_size) + (1 if self._in_flight else 0)
        return float(max(1, math.ceil(batches_ahead * (mean_process_s + self._max_wait_s))))

    # ------------------------------------------------------------------ worker

    async def _run(self) -> None:
        """The worker loop: take a batch, process it, settle its futures; until stopped and drained."""
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                self._in_flight = batch
                await self._process_batch(batch)
                self._in_flight = []
        except asyncio.CancelledError:
            # stop() timed out or was itself cancelled (or the loop is shutting down): nobody may wait forever.
            self._accepting = False
            self._fail_all(lambda: BatcherClosedError(f"{self._name}: batcher stopped before this item finished"))
            raise
        except BaseException as err:
            self._last_error = err
            self._accepting = False
            pending = len(self._queue) + len(self._in_flight)
            logger.critical("%s: inference worker died; failing %d pending item(s)", self._name, pending, exc_info=err)
            self._fail_all(functools.partial(self._worker_died_error, err))
            if not isinstance(err, Exception):
                raise  # KeyboardInterrupt / SystemExit must still reach the loop
        finally:
            self._in_flight = []

    def _worker_died_error(self, err: BaseException) -> BatcherError:
        """The error every caller gets once the worker loop has died of ``err`` (chained, for the logs)."""
        exc = BatcherError(f"{self._name}: inference worker died: {err!r}")
        exc.__cause__ = err
        return exc

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait for the next batch; None once stopped and the queue is empty.

        A batch closes when it is full, when ``max_wait`` has passed since its oldest item was submitted (so items
        that queued up during the previous batch go at once), or when stopping (no more items can come).
        """
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if not self._accepting:
                    return None
                await self._sleep_until_woken(None)
                continue
            if len(self._queue) >= self._max_batch_size or not self._accepting:
                break
            remaining_s = self._queue[0].submitted_at + self._max_wait_s - loop.time()
            if remaining_s <= 0 or (self._more_coming is not None and not self._more_coming()):
                break
            await self._sleep_until_woken(remaining_s)
        return [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch_size))]

    async def _sleep_until_woken(self, timeout_s: float | None) -> None:
        """Sleep until submit/stop sets the wake-up event, or ``timeout_s`` passes.

        Clearing right before waiting is race-free: the loop is single-threaded and there is no await between the
        caller's check of the queue and this clear.
        """
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)

    async def _process_batch(self, batch: list[_Pending[T, R]]) -> None:
        """Run ``process`` on the live items of ``batch`` in the worker thread and settle their futures."""
        live = [entry for entry in batch if not entry.future.done()]
        self._dropped_unreported += len(batch) - len(live)
        if not live:
            return  # every caller gave up: no model work; the drop count goes out with the next report
        loop = asyncio.get_running_loop()
        assert self._executor is not None  # set by start(), which created this task
        started = loop.time()
        queue_wait_s = tuple(started - entry.submitted_at for entry in live)
        self._batch_started_at = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._process, [entry.item for entry in live])
            if len(results) != len(live):
                raise BatchSizeMismatchError(
                    f"{self._name}: process() returned {len(results)} results for a batch of {len(live)} items"
                )
        except Exception as err:
            process_s = loop.time() - started
            logger.warning("%s: batch of %d item(s) failed: %r", self._name, len(live), err)
            self._settle_failed(live, err)
            failed = True
        else:
            process_s = loop.time() - started
            self._settle(live, results)
            failed = False
        finally:
            self._batch_started_at = None
        self._recent_process_s.append(process_s)
        dropped, self._dropped_unreported = self._dropped_unreported, 0
        self._report(BatchStats(len(live), queue_wait_s, process_s, failed, dropped))

    def _settle(self, live: list[_Pending[T, R]], results: list[R]) -> None:
        """Hand result ``i`` to the caller of item ``i``; skips callers that gave up meanwhile."""
        for entry, result in zip(live, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)

    def _settle_failed(self, live: list[_Pending[T, R]], err: Exception) -> None:
        """Give every caller of the failed batch the batch's exception."""
        if isinstance(err, StopIteration):  # a Future refuses StopIteration (it would break generator protocols)
            wrapped = BatcherError(f"{self._name}: process() raised {err!r}")
            wrapped.__cause__ = err
            err = wrapped
        for entry in live:
            if not entry.future.done():
                entry.future.set_exception(err)

    def _report(self, stats: BatchStats) -> None:
        """Call ``on_batch``; a broken metrics callback must not take inference down with it."""
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            logger.exception("%s: on_batch callback failed; ignoring", self._name)

    # ---------------------------------------------------------------- failing

    def _fail_queued(self, make_error: Callable[[], BaseException]) -> None:
        """Fail and remove every queued item."""
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(make_error())

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every unsettled caller: the batch in flight and everything queued."""
        in_flight, self._in_flight = self._in_flight, []
        for entry in in_flight:
            if not entry.future.done():
                entry.future.set_exception(make_error())
        self._fail_queued(make_error)
