"""The micro-batcher with real threads and real timing; every scenario runs under a timeout so a bug fails fast.

No assertion depends on how long anything took: only on which batches formed, who got which result, and which
error reached which caller. A ``Gate`` blocks ``process`` in its thread to make queue states deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from service.runtime.batcher import (
    BatcherClosedError,
    BatcherError,
    BatchSizeMismatchError,
    BatchStats,
    MicroBatcher,
    QueueFullError,
)

SCENARIO_TIMEOUT_S = 5.0


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run one async scenario on a fresh loop; a hang becomes a TimeoutError instead of a stuck test run."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario, SCENARIO_TIMEOUT_S)

    asyncio.run(bounded())


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (it may depend on the worker thread) until true; fail with ``what`` after a while."""
    deadline = asyncio.get_running_loop().time() + SCENARIO_TIMEOUT_S / 2
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.001)


class Gate:
    """A ``process`` that records its batches and thread, and can be held inside the worker thread."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.thread_names: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()  # open unless a test closes it

    def process(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        self.thread_names.add(threading.current_thread().name)
        self.entered.set()
        self.release.wait(SCENARIO_TIMEOUT_S)
        return [item * 2 for item in items]

    @property
    def seen(self) -> list[int]:
        return [item for batch in self.batches for item in batch]


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # never leave the worker thread blocked after a failed test


def make(process: Callable[[list[int]], list[int]], **overrides: Any) -> MicroBatcher[int, int]:
    options: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 10.0, "max_queue": 64, "name": "test-batcher"}
    options.update(overrides)
    return MicroBatcher(process, **options)


async def hold_one_batch(batcher: MicroBatcher[int, int], gate: Gate, item: int = 0) -> asyncio.Task[int]:
    """Close the gate and submit ``item``; returns once its batch is running (blocked) in the worker thread."""
    gate.release.clear()
    gate.entered.clear()
    task = asyncio.create_task(batcher.submit(item))
    await wait_until(gate.entered.is_set, "the first batch never reached process()")
    return task


async def queue(batcher: MicroBatcher[int, int], items: list[int]) -> list[asyncio.Task[int]]:
    """Submit ``items`` as tasks and return once they are all waiting in the queue."""
    before = batcher.queue_depth
    tasks = [asyncio.create_task(batcher.submit(item)) for item in items]
    await wait_until(lambda: batcher.queue_depth == before + len(items), "items never reached the queue")
    return tasks


# ------------------------------------------------------------------------------------------------ batching


def test_concurrent_submits_form_bounded_batches_and_route_results(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=8, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.stop()

        assert results == [i * 2 for i in range(20)]
        sizes = [len(batch) for batch in gate.batches]
        assert all(size <= 8 for size in sizes), sizes
        assert max(sizes) > 1, sizes
        assert sorted(gate.seen) == list(range(20))

    run(scenario())


def test_results_go_to_their_own_caller_across_batches(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=3, max_wait_ms=5)
        await batcher.start()

        async def caller(item: int) -> tuple[int, int]:
            await asyncio.sleep(0.001 * (item % 4))  # stagger arrivals so batches mix callers differently
            return item, await batcher.submit(item)

        pairs = await asyncio.gather(*(caller(i) for i in range(30)))
        await batcher.stop()
        assert all(result == item * 2 for item, result in pairs)

    run(scenario())


def test_max_wait_flushes_a_lone_item(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=8, max_wait_ms=20)
        await batcher.start()
        assert await batcher.submit(21) == 42
        await batcher.stop()
        assert gate.batches == [[21]]

    run(scenario())


def test_full_batch_goes_without_waiting_out_max_wait(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=4, max_wait_ms=60_000)  # waiting it out would time the test out
        await batcher.start()
        assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
        await batcher.stop()

    run(scenario())


def test_stop_flushes_a_partial_batch_without_waiting_out_max_wait(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=4, max_wait_ms=60_000)
        await batcher.start()
        [lone] = await queue(batcher, [5])
        await batcher.stop(drain=True)
        assert await lone == 10

    run(scenario())


def test_items_queued_during_a_batch_form_the_next_batch(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=4, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 100)
        waiting = await queue(batcher, [1, 2, 3])
        gate.release.set()
        assert [await held, *await asyncio.gather(*waiting)] == [200, 2, 4, 6]
        await batcher.stop()
        assert gate.batches == [[100], [1, 2, 3]]

    run(scenario())


# ------------------------------------------------------------------------------------------------- failures


def test_process_error_fails_only_its_batch() -> None:
    boom = ValueError("corrupt tensor")

    def process(items: list[int]) -> list[int]:
        if -1 in items:
            raise boom
        return [item * 2 for item in items]

    async def scenario() -> None:
        batcher = make(process, max_batch_size=2, max_wait_ms=50)
        await batcher.start()
        bad = await asyncio.gather(batcher.submit(-1), batcher.submit(5), return_exceptions=True)
        assert len(bad) == 2 and all(outcome is boom for outcome in bad)  # same batch, same error
        assert await batcher.submit(7) == 14  # the next batch is served
        assert batcher.alive
        await batcher.stop()

    run(scenario())


def test_wrong_result_count_raises_batch_size_mismatch() -> None:
    stats: list[BatchStats] = []

    async def scenario() -> None:
        batcher = make(lambda items: [0] * (len(items) + 1), on_batch=stats.append)
        await batcher.start()
        with pytest.raises(BatchSizeMismatchError, match="2 results for a batch of 1"):
            await batcher.submit(1)
        assert batcher.alive
        await batcher.stop()
        assert [s.failed for s in stats] == [True]

    run(scenario())


def test_full_queue_rejects_at_once_with_retry_after(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_queue=2, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 10)  # in flight: does not count against max_queue
        waiting = await queue(batcher, [11, 12])
        assert batcher.queue_depth == 2

        # wait_for would turn "waits for space" into TimeoutError; QueueFullError must come first.
        with pytest.raises(QueueFullError) as caught:
            await asyncio.wait_for(batcher.submit(13), 1.0)
        retry = caught.value.retry_after_s
        assert retry >= 1 and retry == math.ceil(retry)

        gate.release.set()
        assert [await held, *await asyncio.gather(*waiting)] == [20, 22, 24]
        assert 13 not in gate.seen
        assert await batcher.submit(14) == 28  # room again
        await batcher.stop()

    run(scenario())


def test_admit_counts_items_still_on_their_way(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_queue=3, max_wait_ms=1)
        with pytest.raises(BatcherClosedError):
            batcher.admit()  # not started
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 10)
        waiting = await queue(batcher, [11])
        batcher.admit(pending=1)  # 1 queued + 1 being decoded + this one: fits in 3
        with pytest.raises(QueueFullError, match="waiting or being decoded") as caught:
            batcher.admit(pending=2)  # 1 queued + 2 being decoded: the next one would not fit
        assert caught.value.retry_after_s >= 1
        gate.release.set()
        assert [await held, *await asyncio.gather(*waiting)] == [20, 22]
        batcher.admit(pending=2)  # the queue drained
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            batcher.admit()

    run(scenario())


def test_cancelled_submit_is_dropped_before_inference(gate: Gate) -> None:
    stats: list[BatchStats] = []

    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=4, max_wait_ms=1, on_batch=stats.append)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        [gone] = await queue(batcher, [666])
        gone.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queue_depth == 0  # its slot is free at once

        gate.release.set()
        assert await held == 2
        assert await batcher.submit(3) == 6
        await batcher.stop()
        assert 666 not in gate.seen
        assert sum(s.dropped_cancelled for s in stats) == 1

    run(scenario())


def test_worker_crash_fails_pending_callers_and_marks_dead(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bug = RuntimeError("bug in the worker loop")

    def broken_settle(*args: object) -> None:
        raise bug

    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_wait_ms=1)
        monkeypatch.setattr(batcher, "_settle", broken_settle)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        waiting = await queue(batcher, [2, 3])
        with caplog.at_level(logging.ERROR, logger="service.runtime.batcher"):
            gate.release.set()
            outcomes = await asyncio.gather(held, *waiting, return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, BatcherError) and "worker died" in str(outcome), outcome
            assert outcome.__cause__ is bug
        assert not batcher.alive
        assert batcher.last_error is bug
        assert not batcher.accepting
        await asyncio.wait_for(batcher.wait_ended(), SCENARIO_TIMEOUT_S)  # what the app's supervisor awaits
        [record] = [r for r in caplog.records if "worker died" in r.getMessage()]
        assert record.exc_info is not None and record.exc_info[1] is bug  # logged with its traceback

        with pytest.raises(BatcherError, match="worker died"):
            await batcher.submit(4)
        await batcher.stop()  # still clean

    run(scenario())


# ---------------------------------------------------------------------------------------------- threading


def test_process_runs_in_one_dedicated_thread_off_the_loop(gate: Gate) -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        batcher = make(gate.process, max_batch_size=2, max_wait_ms=1, name="cxr-model")
        await batcher.start()
        for i in range(3):
            await asyncio.gather(*(batcher.submit(i * 10 + j) for j in range(5)))
        await batcher.stop()

        assert len(gate.batches) >= 3 * 3  # several batches...
        assert len(gate.threads) == 1  # ...all in the same thread
        assert loop_thread not in gate.threads
        [thread_name] = gate.thread_names
        assert thread_name.startswith("cxr-model")

    run(scenario())


def test_event_loop_stays_responsive_while_process_runs(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        ticks = 0
        for _ in range(5):  # the loop keeps running other tasks while process() is blocked in its thread
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not held.done()
        gate.release.set()
        assert await held == 2
        await batcher.stop()

    run(scenario())


# ------------------------------------------------------------------------------------------------ on_batch


def test_on_batch_receives_stats(gate: Gate) -> None:
    stats: list[BatchStats] = []

    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=4, max_wait_ms=50, on_batch=stats.append)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        await batcher.stop()

    run(scenario())
    assert sum(s.size for s in stats) == 4
    for s in stats:
        assert len(s.queue_wait_s) == s.size
        assert all(wait >= 0 for wait in s.queue_wait_s)
        assert s.process_s >= 0
        assert not s.failed
        assert s.dropped_cancelled == 0


def test_on_batch_error_is_logged_not_fatal(gate: Gate, caplog: pytest.LogCaptureFixture) -> None:
    def broken_metrics(stats: BatchStats) -> None:
        raise KeyError("no such metric")

    async def scenario() -> None:
        batcher = make(gate.process, on_batch=broken_metrics)
        await batcher.start()
        with caplog.at_level(logging.ERROR, logger="service.runtime.batcher"):
            assert await batcher.submit(1) == 2
        assert await batcher.submit(2) == 4
        assert batcher.alive
        await batcher.stop()

    run(scenario())
    assert any("on_batch" in r.getMessage() and r.exc_info is not None for r in caplog.records)


# ------------------------------------------------------------------------------------------------- lifecycle


def test_stop_drains_every_accepted_item_then_refuses(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 0)
        waiting = await queue(batcher, [1, 2, 3, 4, 5])
        stopping = asyncio.create_task(batcher.stop(drain=True))
        await wait_until(lambda: not batcher.accepting, "stop() did not stop accepting")
        with pytest.raises(BatcherClosedError):
            await batcher.submit(99)
        assert batcher.alive  # still draining

        gate.release.set()
        await stopping
        assert [await held, *await asyncio.gather(*waiting)] == [0, 2, 4, 6, 8, 10]
        assert not batcher.alive
        with pytest.raises(BatcherClosedError):
            await batcher.submit(7)
        await batcher.stop()  # idempotent
        assert 99 not in gate.seen and 7 not in gate.seen

    run(scenario())


def test_stop_without_drain_fails_queued_items(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        waiting = await queue(batcher, [2, 3])
        stopping = asyncio.create_task(batcher.stop(drain=False))
        for task in waiting:
            with pytest.raises(BatcherClosedError):
                await task
        gate.release.set()
        await stopping
        assert await held == 2  # the batch already running was allowed to finish
        assert gate.seen == [1]
        assert not batcher.alive

    run(scenario())


def test_stop_timeout_cancels_the_worker_and_fails_the_rest(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        waiting = await queue(batcher, [2])
        await batcher.stop(drain=True, timeout_s=0.05)  # process() stays blocked past the timeout
        for task in (held, *waiting):
            with pytest.raises(BatcherClosedError):
                await task
        assert not batcher.alive

    run(scenario())


def test_cancelling_stop_propagates_and_releases_callers(gate: Gate) -> None:
    async def scenario() -> None:
        batcher = make(gate.process, max_batch_size=1, max_wait_ms=1)
        await batcher.start()
        held = await hold_one_batch(batcher, gate, 1)
        stopping = asyncio.create_task(batcher.stop(drain=True))
        await wait_until(lambda: not batcher.accepting, "stop() did not start")
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        with pytest.raises(BatcherClosedError):
            await held
        await wait_until(lambda: not batcher.alive, "worker still running after a cancelled stop()")

    run(scenario())


def test_lifecycle_misuse_is_explicit() -> None:
    async def scenario() -> None:
        batcher = make(lambda items: items)
        assert not batcher.alive and not batcher.accepting
        with pytest.raises(BatcherClosedError, match="not started"):
            await batcher.submit(1)
        await batcher.start()
        assert batcher.alive and batcher.accepting and batcher.last_error is None
        with pytest.raises(BatcherError, match="already started"):
            await batcher.start()
        await batcher.stop()
        await batcher.stop()
        await asyncio.wait_for(batcher.wait_ended(), SCENARIO_TIMEOUT_S)
        assert batcher.last_error is None  # ended by stop(), not by dying
        with pytest.raises(BatcherError, match="already started"):
            await batcher.start()

        never_started = make(lambda items: items)
        with pytest.raises(BatcherError, match="never started"):
            await never_started.wait_ended()
        await never_started.stop()  # harmless

    run(scenario())


@pytest.mark.parametrize(
    "overrides",
    [{"max_batch_size": 0}, {"max_wait_ms": -1.0}, {"max_wait_ms": float("nan")}, {"max_queue": 0}],
)
def test_invalid_limits_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        make(lambda items: items, **overrides)
