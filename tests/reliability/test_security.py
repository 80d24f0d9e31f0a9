"""Security checks of the service: API keys, the streaming body limit, patient identifiers, static files, pickles.

The body-limit and PHI tests run the real service as a subprocess (``python -m service``, through the
reliability harness), so its memory is its own (psutil RSS) and its log lines are the JSON lines it
writes to stdout, exactly as deployed.
"""

from __future__ import annotations

import hmac
import http.client
import json
import pickle
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bayesnet import CheckpointError, ModelSpec, build_model, load_checkpoint, save_checkpoint
from bayesnet.checkpoint import SPEC_FILE, WEIGHTS_FILE, sha256_file
from service.runtime.loading import load_model
from service.settings import Settings
from tests.reliability.harness import ServerProcess
from tests.reliability.hostile_corpus import (
    PATIENT_ID,
    PATIENT_IDENTIFIERS,
    PATIENT_NAME,
    bundled_dicom,
    dicom_bytes,
    gray_png,
)
from tests.service.live import LiveServer, live_server, tiny_settings

# --- a real service process -----------------------------------------------------------------------

SUBPROCESS_LIMIT_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def service_process(tiny_service_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``python -m service`` with a 1 MiB upload limit, logging at DEBUG (the most it ever logs)."""
    env = {"CXR_MAX_UPLOAD_BYTES": str(SUBPROCESS_LIMIT_BYTES), "CXR_LOG_LEVEL": "DEBUG", "CXR_TORCH_THREADS": "1"}
    with ServerProcess(tiny_service_checkpoint, tmp_path_factory.mktemp("service-log"), env=env) as server:
        yield server.start()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_huge_slow_body_gets_413_early_and_server_memory_stays_flat(service_process: ServerProcess) -> None:
    """A 256 MiB body trickled in chunks (no Content-Length) is refused once it passes the 1 MiB limit:
    the 413 arrives while the client is still sending, and the server's RSS does not grow with the body."""
    with httpx.Client(base_url=service_process.url, timeout=30) as client:  # warm the upload path first
        assert client.post("/v1/predict", files={"file": ("a.png", gray_png())}).status_code == 200
    baseline = service_process.rss_bytes()
    planned = 256 * 1024 * 1024
    piece = b"\x00" * (64 * 1024)
    sent, peak, answer = 0, baseline, b""
    with socket.create_connection(("127.0.0.1", service_process.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=slowb\r\n\r\n"
            + _chunk(b'--slowb\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n')
        )
        while sent < planned:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server answered while we are still sending
            try:
                sock.sendall(_chunk(piece))
            except OSError:
                break  # the server closed: its answer is waiting to be read
            sent += len(piece)
            if sent % (1024 * 1024) == 0:
                peak = max(peak, service_process.rss_bytes())
            time.sleep(0.001)
        sock.shutdown(socket.SHUT_WR)  # stop sending: the server's bounded drain ends at once
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"application/problem+json" in head.lower()
    assert "limit" in json.loads(body)["detail"]
    assert sent < 32 * 1024 * 1024, f"the 413 came only after {sent} bytes"
    assert peak - baseline < 48 * 1024 * 1024, f"server RSS grew by {(peak - baseline) >> 20} MiB"
    assert httpx.get(f"{service_process.url}/readyz", timeout=10).status_code == 200


def test_patient_identifiers_never_leave_the_service(service_process: ServerProcess) -> None:
    """DICOMs carrying distinctive fake identifiers, accepted and refused ones, through every upload route:
    no identifier in any response (body or headers), log line or metric."""
    good = dicom_bytes(rows=96, columns=80)
    uploads = {
        "good": good,
        "no-pixels": dicom_bytes(with_pixels=False),
        "short-pixels": dicom_bytes(pixel_bytes=b"\x00" * 100),
        "multi-frame": dicom_bytes(frames=2),
        "ct": bundled_dicom("CT_small.dcm"),
        "rgb": bundled_dicom("SC_rgb.dcm"),
        "truncated": good[: len(good) - 3000],
    }
    for name, data in uploads.items():
        assert PATIENT_ID.encode() in data, (
            f"{name}: the identifiers must be in the file for this test to mean anything"
        )
    responses: list[httpx.Response] = []
    with httpx.Client(base_url=service_process.url, timeout=60) as client:
        for name, data in uploads.items():
            files = {"file": (f"{name}.dcm", data, "application/dicom")}
            responses.append(client.post("/v1/predict", files=files, params={"cams": "all"}))
            responses.append(client.post("/predict", files=files, headers={"Accept": "application/fhir+json"}))
            responses.append(client.post("/v1/preview", files=files))
        batch = [("files", (f"{name}.dcm", data, "application/dicom")) for name, data in uploads.items()]
        responses.append(client.post("/v1/predict/batch", files=batch, params={"cams": "none"}))
        responses.append(client.post("/v1/predict/batch", files=batch, headers={"Accept": "application/fhir+json"}))
        metrics = client.get("/metrics")
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 422 in statuses, statuses  # both paths were exercised
    assert all(status < 500 for status in statuses), statuses
    time.sleep(0.2)  # the access log line is written after the response
    log = service_process.log() + service_process.stderr()
    assert log.count('"logger": "service.access"') >= len(responses), "the log capture is not seeing the requests"
    for text, where in [
        *(
            (r.text if "json" in r.headers.get("content-type", "") else r.content.decode("latin-1"), r.url.path)
            for r in responses
        ),
        *((str(r.headers), f"headers of {r.url.path}") for r in responses),
        (log, "service log"),
        (metrics.text, "/metrics"),
    ]:
        for secret in (*PATIENT_IDENTIFIERS, PATIENT_NAME.replace("^", " "), "Hostile General"):
            assert secret not in text, f"{secret!r} leaked in {where}"


# --- API keys -------------------------------------------------------------------------------------

KEYS = ["key-alpha-0123456789", "key-beta-9876543210"]


@pytest.fixture(scope="module")
def keyed_server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_settings(tiny_service_checkpoint, api_keys=KEYS, warmup=False)) as live:
        yield live


def _problem_without_ids(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    return {k: v for k, v in body.items() if k not in ("request_id", "instance")}


def test_api_keys_accept_either_key_and_refuse_everything_else_alike(keyed_server: LiveServer) -> None:
    png = {"file": ("a.png", gray_png())}
    with keyed_server.client() as client:
        for key in KEYS:
            assert client.post("/v1/predict", files=png, headers={"X-API-Key": key}).status_code == 200
            assert client.post("/v1/predict", files=png, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        refused = [
            client.post("/v1/predict", files=png),
            client.post("/v1/predict", files=png, headers={"X-API-Key": "wrong"}),
            client.post("/v1/predict", files=png, headers={"X-API-Key": KEYS[0][:-1]}),  # a prefix of a real key
            client.post("/v1/predict", files=png, headers={"X-API-Key": KEYS[0] + "x"}),  # a real key plus more
            client.post("/v1/predict", files=png, headers={"X-API-Key": KEYS[0].upper()}),
            client.post("/v1/predict", files=png, headers={"Authorization": f"Basic {KEYS[0]}"}),
            client.post("/v1/predict", files=png, headers={"Authorization": "Bearer"}),
            client.post("/v1/predict", files=png, headers={"X-API-Key": b"\xff\xfekey"}),
            client.post("/v1/preview", files=png, headers={"X-API-Key": "wrong"}),
            client.get("/v1/model", headers={"X-API-Key": "wrong"}),
        ]
        # Probes stay open for the orchestrator.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
    assert [r.status_code for r in refused] == [401] * len(refused)
    first = _problem_without_ids(refused[0])
    for response in refused:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["www-authenticate"].startswith("Bearer")
        # One answer for every failure: nothing says whether the key was missing, close or wrong.
        assert _problem_without_ids(response) == first
        for key in KEYS:
            assert key not in response.text and key[:8] not in response.text


def test_a_key_with_spaces_or_tabs_around_it_is_the_key(keyed_server: LiveServer) -> None:
    """Spaces and tabs around a field value are not part of it (RFC 9110 5.5); httpx will not send them, so the
    requests go through http.client, which does."""
    host, port = keyed_server.url.removeprefix("http://").split(":")
    offers = [("X-API-Key", f"{KEYS[0]} "), ("X-API-Key", f"{KEYS[1]}\t"), ("X-API-Key", f" \t{KEYS[0]}")]
    offers += [("Authorization", f"Bearer {KEYS[1]} \t"), ("X-API-Key", f"{KEYS[0][:-1]} ")]
    statuses = []
    for name, value in offers:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", "/v1/model", headers={name: value})
        statuses.append(connection.getresponse().status)
        connection.close()
    assert statuses == [200, 200, 200, 200, 401]


def test_every_configured_key_is_compared_in_constant_time(
    keyed_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check calls hmac.compare_digest once per configured key, with no early exit on a match."""
    calls: list[bytes] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with keyed_server.client() as client:
        ok = client.get("/v1/model", headers={"X-API-Key": KEYS[0]})
    assert ok.status_code == 200
    assert sorted(calls) == sorted(key.encode() for key in KEYS)


def test_blank_api_keys_are_refused_at_start_up_without_echoing_keys() -> None:
    """Regression: api_keys=[""] used to let requests without any key in (compare_digest(b"", b"") is True)."""
    for keys in ([""], ["real-key-1234", "   "], [" padded-key "]):
        with pytest.raises(ValueError, match="empty or has surrounding whitespace") as caught:
            Settings(api_keys=keys)
        assert "real-key-1234" not in str(caught.value) and "padded-key" not in str(caught.value)


# --- static files ---------------------------------------------------------------------------------


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (clients would normalise the dots and slashes away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), answer.partition(b"\r\n\r\n")[2]


TRAVERSALS = [
    "/static/../app.py",
    "/static/../../service/app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2fapp.py",
    "/static/..%2f..%2fservice%2fsettings.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/%252e%252e%252fapp.py",
    "/static/....//....//etc/passwd",
    "/static/..\\app.py",
    "/static/..%5capp.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/app.js%00.py",
    "/static/" + "../" * 12 + "etc/passwd",
    "/swagger-assets/../../../../../../etc/passwd",
    "/swagger-assets/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "//etc/passwd",
]


def test_static_files_cannot_escape_their_folders(hostile_server: LiveServer) -> None:
    port = int(hostile_server.url.rsplit(":", 1)[1])
    status, body = _raw_get(port, "/static/app.js")
    assert status == 200 and body, "the positive control: the folder is served"
    secrets = (b"root:", b"def create_app", b"class Settings", b"import ")
    for target in TRAVERSALS:
        status, body = _raw_get(port, target)
        assert status in (400, 404, 405), f"{target}: {status}"
        assert not any(secret in body for secret in secrets), f"{target} served a file outside the folder"
    assert httpx.get(f"{hostile_server.url}/readyz").status_code == 200


# --- checkpoints are never unpickled --------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that something ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def _checkpoint_with_weights(root: Path, weights: bytes, name: str = WEIGHTS_FILE) -> Path:
    spec = ModelSpec(arch="test_efficientnet", image_size=64, name="pickle-test")
    path = save_checkpoint(build_model(spec), None, root)
    (path / WEIGHTS_FILE).unlink()
    (path / name).write_bytes(weights)
    document = json.loads((path / SPEC_FILE).read_text())
    document["weights"] = name
    document["weights_sha256"] = sha256_file(path / name)  # the checksum passes: only the format can refuse it
    (path / SPEC_FILE).write_text(json.dumps(document))
    return path


def test_pickled_checkpoints_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    payload = _Payload(marker)
    pickled = pickle.dumps({"state_dict": payload})
    torch_file = tmp_path / "weights.pt"
    torch.save({"state_dict": payload}, torch_file)
    pickle.loads(pickled)
    assert marker.exists(), "the payload must work for the test to mean anything"
    marker.unlink()

    cases = {
        "pickle-as-safetensors": _checkpoint_with_weights(tmp_path / "a", pickled),
        "torch-save-as-safetensors": _checkpoint_with_weights(tmp_path / "b", torch_file.read_bytes()),
        "torch-save-as-model.pt": _checkpoint_with_weights(tmp_path / "c", torch_file.read_bytes(), "model.pt"),
    }
    for name, path in cases.items():
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_model(Settings(model_path=path))  # what the service does at start-up
        assert not marker.exists(), f"{name}: loading ran code from the pickle"
