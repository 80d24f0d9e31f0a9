"""A short, bounded load and overload run against a real ``python -m service`` process (tiny model, each batch
slowed to a known cost so that "4 x capacity" is reachable from a test client on a shared 2-core machine).

The long run with the shipped demo model, RSS and latency figures is ``bench/reliability.py``; this test checks
the behaviour only: a steady rate is served in full, an overload burst is shed with 503 + Retry-After while every
accepted request succeeds, nothing is lost, and the service serves normally again once the burst is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import ServerProcess, small_pngs, steady_load, wait_idle

pytestmark = pytest.mark.slow  # each test starts a server process (importing torch: seconds)

BATCH_S = 0.2  # injected cost of one batch
MAX_BATCH = 2
CAPACITY_PER_S = MAX_BATCH / BATCH_S  # an upper bound: the tiny model itself adds a little


@pytest.fixture(scope="module")
def slow_server(tiny_service_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"CXR_MAX_BATCH_IMAGES": str(MAX_BATCH), "CXR_MAX_QUEUE": "4", "CXR_MAX_WAIT_MS": "5"}
    log_dir = tmp_path_factory.mktemp("load")
    with ServerProcess(tiny_service_checkpoint, log_dir, env=env, fault_args=["--slow-batch-s", str(BATCH_S)]) as s:
        yield s.start()


def test_a_steady_rate_below_capacity_is_served_in_full(slow_server: ServerProcess) -> None:
    report = asyncio.run(
        steady_load(slow_server.url, small_pngs(4), rate_per_s=CAPACITY_PER_S / 2, duration_s=3.0, name="steady")
    )
    assert report.sent == 15
    assert report.statuses == {200: 15}, report.summary()
    assert report.lost == 0


def test_overload_is_shed_with_503_and_retry_after_then_the_service_recovers(slow_server: ServerProcess) -> None:
    images = small_pngs(4)
    burst = asyncio.run(
        steady_load(slow_server.url, images, rate_per_s=4 * CAPACITY_PER_S, duration_s=2.0, name="burst")
    )
    assert burst.lost == 0, burst.summary()
    assert set(burst.statuses) <= {200, 503}, burst.summary()  # accepted ones all succeed; no 500/504
    assert burst.statuses[503] >= burst.sent // 2, burst.summary()  # about 3 in 4 must be shed
    assert burst.statuses[200] >= 4, burst.summary()
    assert burst.busy_without_retry_after == 0
    asyncio.run(wait_idle(slow_server.url))
    after = asyncio.run(steady_load(slow_server.url, images, rate_per_s=2.0, duration_s=2.0, name="recovery"))
    assert after.statuses == {200: 4}, after.summary()
