"""Process-level faults against a real ``python -m service``: SIGTERM under load, a dead inference worker, and
checkpoints that are missing, corrupt or do not match their spec. Exit statuses are the contract with the
supervisor (systemd, Kubernetes, Gunicorn); see docs/operations.md "Reliability"."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

from bayesnet.checkpoint import SPEC_FILE, WEIGHTS_FILE, sha256_file
from service.process import EXIT_STARTUP_FAILED, EXIT_WORKER_DIED
from tests.reliability.harness import ServerProcess, small_pngs
from tests.service.live import wait_until

pytestmark = pytest.mark.slow  # each test starts a server process (importing torch: seconds)

GRACE_S = 20  # CXR_REQUEST_TIMEOUT_S below: uvicorn's graceful-shutdown limit


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    return small_pngs(8)


def _post(url: str, image: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/predict", params={"cams": "none"}, files={"file": ("cxr.png", image, "image/png")}, timeout=60
    )


def _queue_depth(url: str) -> int:
    return int(httpx.get(f"{url}/readyz", timeout=5).json()["queue_depth"])


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_sigterm_under_load_finishes_accepted_requests_refuses_new_ones_and_exits_0(
    tiny_service_checkpoint: Path, uploads: list[bytes], tmp_path: Path
) -> None:
    env = {"CXR_MAX_BATCH_IMAGES": "2", "CXR_MAX_WAIT_MS": "0", "CXR_REQUEST_TIMEOUT_S": str(GRACE_S)}
    with ServerProcess(tiny_service_checkpoint, tmp_path, env=env, fault_args=["--slow-batch-s", "0.5"]) as server:
        server.start()
        accepted = 6
        with concurrent.futures.ThreadPoolExecutor(accepted) as pool:
            futures = [pool.submit(_post, server.url, uploads[i]) for i in range(accepted)]
            # At most 2 in the (slowed) model and at least 4 queued: every request has been read and accepted.
            wait_until(lambda: _queue_depth(server.url) >= accepted - 2)
            server.sigterm()
            wait_until(lambda: _refuses_connections(server.port), timeout_s=10)
            assert sum(f.done() for f in futures) < accepted  # still draining when new connections were refused
            responses = [f.result(timeout=GRACE_S) for f in futures]
        assert [r.status_code for r in responses] == [200] * accepted
        assert server.wait(timeout_s=GRACE_S) == 0
    assert '"stopped"' in server.log()  # the lifespan's drain ran to its end


def test_a_dead_inference_worker_turns_readiness_false_and_the_process_exits_for_its_supervisor(
    tiny_service_checkpoint: Path, uploads: list[bytes], tmp_path: Path
) -> None:
    with ServerProcess(tiny_service_checkpoint, tmp_path, fault_args=["--kill-worker-on-batch", "1"]) as server:
        server.start()
        failed = _post(server.url, uploads[0])  # its batch ran, then the worker loop broke before answering
        assert failed.status_code == 503
        assert failed.headers["content-type"].startswith("application/problem+json")
        assert failed.json()["request_id"] == failed.headers["x-request-id"]
        assert "retry-after" in failed.headers
        # From now on readiness is never true again: 503 while shutting down, then nothing listens.
        while server.process is not None and server.process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                assert httpx.get(f"{server.url}/readyz", timeout=2).status_code == 503
            time.sleep(0.05)
        assert server.wait(timeout_s=GRACE_S) == EXIT_WORKER_DIED
    assert "inference worker died" in server.log()
    assert "injected fault" in server.log() and "Traceback" in server.log()  # logged with its traceback
    assert "injected fault" in server.stderr()


def _corrupt(src: Path, dst: Path) -> Path:
    """Weights that are not safetensors at all, with a matching checksum (so the parser is what objects)."""
    shutil.copytree(src, dst)
    (dst / WEIGHTS_FILE).write_bytes(b"\x00\x01not safetensors" * 64)
    document = json.loads((dst / SPEC_FILE).read_text())
    document["weights_sha256"] = sha256_file(dst / WEIGHTS_FILE)
    (dst / SPEC_FILE).write_text(json.dumps(document))
    return dst


def _edit_spec(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    document = json.loads((dst / SPEC_FILE).read_text())
    document["spec"].update(changes)
    (dst / SPEC_FILE).write_text(json.dumps(document))
    return dst


def test_a_bad_checkpoint_stops_start_up_with_a_message_naming_the_file_and_never_serves(
    tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    spec = json.loads((tiny_service_checkpoint / SPEC_FILE).read_text())["spec"]
    thirteen = {key: spec[key][:13] for key in ("labels", "temperature", "threshold", "uncertainty_threshold")}
    cases = {
        "missing": (tmp_path / "nowhere", "no such checkpoint directory"),
        "corrupt": (_corrupt(tiny_service_checkpoint, tmp_path / "corrupt"), "not a readable safetensors file"),
        "labels": (
            _edit_spec(tiny_service_checkpoint, tmp_path / "labels", **thirteen, trained_labels=thirteen["labels"]),
            "13 labels",
        ),
    }
    servers = {}
    for name, (path, _) in cases.items():
        log_dir = tmp_path / f"logs-{name}"
        log_dir.mkdir()
        servers[name] = ServerProcess(path, log_dir)
        servers[name].launch()  # all start together: the slow part is importing torch
    try:
        deadline = time.monotonic() + 120
        while any(s.process is not None and s.process.poll() is None for s in servers.values()):
            assert time.monotonic() < deadline, "a server with a bad checkpoint did not exit"
            for server in servers.values():
                with pytest.raises(httpx.TransportError):  # never a half-alive server answering probes
                    httpx.get(f"{server.url}/healthz", timeout=1)
            time.sleep(0.1)
    finally:
        for server in servers.values():
            server.kill()
    for name, (path, problem) in cases.items():
        server = servers[name]
        assert server.wait(timeout_s=5) == EXIT_STARTUP_FAILED, name
        stderr = server.stderr()
        assert "cannot start" in stderr and problem in stderr, (name, stderr)
        named = path if name == "missing" else path / WEIGHTS_FILE
        assert str(named) in stderr, (name, stderr)
