"""In-process faults on a real server (uvicorn on loopback, tiny real model): an exception inside the model
during a batch, and clients that hang up mid-upload or mid-inference.

Faults are injected by wrapping the live server's ``Predictor.run``; everything else is the real service.
(``tests/service/test_api.py`` covers a lone failing request; here a whole batch fails while the next one
is already queued, and the log must carry the traceback.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from service.runtime.predictor import InferenceRequest, InferenceResult
from tests.reliability.harness import hang_up_mid_upload, metric_value, send_then_hang_up, small_pngs
from tests.service.live import LiveServer, live_server, tiny_settings, wait_until


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return small_pngs(6)


class ModelProbe:
    """Wraps the live predictor: records every batch the model sees, can hold a batch, can fail batches."""

    def __init__(self, live: LiveServer) -> None:
        predictor = live.state.predictor
        assert predictor is not None
        self.batches: list[int] = []  # batch sizes, in order
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = 0
        original = predictor.run

        def probed_run(requests: Sequence[InferenceRequest]) -> list[InferenceResult]:
            self.batches.append(len(requests))
            self.entered.set()
            assert self.gate.wait(timeout=30)
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError("injected model fault: CUDA error: an illegal memory access")
            return original(requests)

        predictor.run = probed_run  # type: ignore[method-assign]

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def wait_until_held(self) -> None:
        assert self.entered.wait(timeout=30), "no batch reached the model"


def _post(url: str, image: bytes) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post("/v1/predict", params={"cams": "none"}, files={"file": ("cxr.png", image, "image/png")})


def _in_thread(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    out: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn()))
    thread.start()
    return thread, out


@pytest.fixture
def probed(tiny_service_checkpoint: Path) -> Iterator[tuple[LiveServer, ModelProbe]]:
    settings = tiny_settings(tiny_service_checkpoint, max_batch_images=4, max_wait_ms=0.0)
    with live_server(settings) as live:
        yield live, ModelProbe(live)


def test_a_model_exception_fails_only_its_batch_logged_with_traceback_and_the_next_batch_succeeds(
    probed: tuple[LiveServer, ModelProbe], uploads: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    live, probe = probed
    batcher = live.state.batcher
    assert batcher is not None
    probe.fail_next = 1
    probe.hold()
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        doomed = _in_thread(lambda: _post(live.url, uploads[0]))
        probe.wait_until_held()  # batch 1 (one image) is inside the model and will fail
        queued = [_in_thread(lambda i=i: _post(live.url, uploads[i])) for i in (1, 2, 3)]
        wait_until(lambda: batcher.queue_depth == 3)  # batch 2 is waiting behind it
        probe.gate.set()
        for thread, _ in [doomed, *queued]:
            thread.join(timeout=60)
    failed = doomed[1]["r"]
    assert failed.status_code == 500
    assert failed.headers["content-type"].startswith("application/problem+json")
    assert failed.json()["request_id"] == failed.headers["x-request-id"]
    assert "illegal memory access" not in failed.text  # internals stay in the logs
    assert [out["r"].status_code for _, out in queued] == [200, 200, 200]
    assert probe.batches == [1, 3]
    [record] = [r for r in caplog.records if r.name == "service.errors"]
    assert record.exc_info is not None
    cause = record.exc_info[1].__cause__ if record.exc_info[1] is not None else None
    assert isinstance(cause, RuntimeError) and "illegal memory access" in str(cause)
    assert cause.__traceback__ is not None  # the log line carries the model's traceback
    assert live.state.ready and batcher.alive
    with live.client() as client:
        assert client.get("/readyz").status_code == 200


def test_a_client_hanging_up_mid_inference_has_its_image_dropped_and_others_are_unaffected(
    probed: tuple[LiveServer, ModelProbe], uploads: list[bytes]
) -> None:
    live, probe = probed
    batcher, pipeline = live.state.batcher, live.state.pipeline
    assert batcher is not None and pipeline is not None
    probe.hold()
    running = _in_thread(lambda: _post(live.url, uploads[0]))
    probe.wait_until_held()
    port = int(live.url.rsplit(":", 1)[1])
    # Uploaded in full and queued behind the running batch, then the client resets the connection.
    quitter = threading.Thread(target=send_then_hang_up, args=(port, uploads[1]), kwargs={"after_s": 1.0})
    quitter.start()
    wait_until(lambda: batcher.queue_depth == 1)  # queued (the client hangs up only a second later)
    quitter.join(timeout=30)
    wait_until(lambda: batcher.queue_depth == 0)  # dropped from the queue as soon as the client left
    probe.gate.set()
    running[0].join(timeout=60)
    assert running[1]["r"].status_code == 200
    assert _post(live.url, uploads[2]).status_code == 200
    assert probe.batches == [1, 1]  # the quitter's image never reached the model
    assert pipeline.signals.uploads_coming() is False  # no upload stuck in decoding
    with live.client() as client:
        metrics = client.get("/metrics").text
    assert metric_value(metrics, 'cxr_http_requests_total{method="POST",route="/v1/predict",status="499"}') == 1
    assert metric_value(metrics, "cxr_images_processed_total") == 2
    wait_until(lambda: _no_connections_or_tasks_left(live))


def test_a_client_hanging_up_mid_upload_costs_nothing_and_others_are_unaffected(
    probed: tuple[LiveServer, ModelProbe], uploads: list[bytes]
) -> None:
    live, probe = probed
    port = int(live.url.rsplit(":", 1)[1])
    for _ in range(3):
        hang_up_mid_upload(port, uploads[0])
    assert _post(live.url, uploads[1]).status_code == 200
    assert probe.batches == [1]  # the half-sent uploads were never decoded nor queued
    batcher, pipeline = live.state.batcher, live.state.pipeline
    assert batcher is not None and pipeline is not None
    assert batcher.queue_depth == 0 and not pipeline.signals.uploads_coming()
    with live.client() as client:
        metrics = client.get("/metrics").text
    server_errors = [
        line for line in metrics.splitlines() if line.startswith("cxr_http_requests_total") and 'status="5' in line
    ]
    assert server_errors == []
    # Counted as what they were (a client that hung up: 499), not as bad requests (400).
    assert metric_value(metrics, 'cxr_http_requests_total{method="POST",route="/v1/predict",status="499"}') == 3
    assert 'status="400"' not in metrics
    wait_until(lambda: _no_connections_or_tasks_left(live))


def _no_connections_or_tasks_left(live: LiveServer) -> bool:
    """uvicorn's own books: every connection closed and every request task finished (nothing leaked)."""
    server_state = live.server.server_state
    return not server_state.connections and not server_state.tasks


def test_a_hung_worker_fails_readiness_and_liveness_until_its_batch_returns(
    tiny_service_checkpoint: Path, uploads: list[bytes]
) -> None:
    # A batch that outlives the request timeout means a hung worker (deadlocked kernel, a device that stopped
    # answering): readiness takes the pod out of the load balancer, liveness gets the process restarted.
    settings = tiny_settings(tiny_service_checkpoint, max_batch_images=4, max_wait_ms=0.0, request_timeout_s=1.0)
    with live_server(settings) as live:
        probe = ModelProbe(live)
        with live.client() as client:
            assert client.get("/healthz").status_code == 200
            probe.hold()
            stuck = _in_thread(lambda: _post(live.url, uploads[0]))
            probe.wait_until_held()
            assert client.get("/readyz").status_code == 200  # a batch in progress is not a hang
            time.sleep(1.3)
            health, ready = client.get("/healthz"), client.get("/readyz")
            assert health.status_code == 503 and "stalled" in health.json()["detail"]
            assert health.headers["content-type"].startswith("application/problem+json")
            assert ready.status_code == 503 and "stalled" in ready.json()["detail"]
            stuck[0].join(timeout=10)
            assert stuck[1]["r"].status_code == 504  # its request gave up at the timeout
            probe.gate.set()  # the batch returns: the worker was slow, not dead, and both probes recover
            wait_until(lambda: client.get("/healthz").status_code == 200)
            assert client.get("/readyz").status_code == 200
            assert _post(live.url, uploads[1]).status_code == 200
