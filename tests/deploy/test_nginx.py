"""The original deployment for real: Debian's nginx with the project's config in front of Gunicorn.

Gunicorn runs ``docker/gunicorn.conf.py`` (2 uvicorn workers, a tiny real checkpoint) and nginx runs
``docker/nginx/cxr.conf.template`` rendered onto free loopback ports. Requests go through nginx.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bayesnet import ModelSpec, build_model, save_checkpoint
from service.api.app import MULTIPART_SLACK_BYTES

REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
APP_LIMIT = 2 * 1024 * 1024

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(NGINX).exists(), reason="Debian's nginx is not installed (.ci/run installs it)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png_bytes(size: int = 512) -> bytes:
    shared = REPO.parent / "shared" / "data" / "originals" / "00000075_000.png"
    if shared.is_file():
        return shared.read_bytes()
    pixels = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Stack:
    url: str
    gunicorn: subprocess.Popen[bytes]
    log_dir: Path
    app_url: str  # Gunicorn itself, without nginx


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("deploy")
    checkpoint = save_checkpoint(
        build_model(ModelSpec(arch="test_efficientnet", image_size=64, provenance="trained: test")), None, root / "m"
    )
    app_port, nginx_port = free_port(), free_port()
    env = {
        **os.environ,
        "CXR_MODEL_PATH": str(checkpoint),
        "CXR_BIND": f"127.0.0.1:{app_port}",
        "CXR_WORKERS": "2",
        "CXR_MAX_UPLOAD_BYTES": str(APP_LIMIT),
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_TORCH_THREADS": "1",
        "CXR_HEADER_TIMEOUT_S": "2",
        "CXR_BODY_GRACE_S": "1",
    }
    gunicorn_log = root / "gunicorn.log"
    with gunicorn_log.open("wb") as sink:
        gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(REPO / "docker" / "gunicorn.conf.py")],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    template = string.Template((REPO / "docker" / "nginx" / "cxr.conf.template").read_text())
    site = template.safe_substitute(
        CXR_NGINX_PORT=f"127.0.0.1:{nginx_port}",
        CXR_UPSTREAM=f"127.0.0.1:{app_port}",
        CXR_STATIC_ROOT=str(REPO / "service" / "api" / "static"),
        CXR_BODY_LIMIT=str(APP_LIMIT + MULTIPART_SLACK_BYTES),
        CXR_BATCH_BODY_LIMIT=str(APP_LIMIT * 16 + MULTIPART_SLACK_BYTES),
    )
    (root / "cxr.conf").write_text(site.replace("/var/log/nginx/access.log", f"{root}/nginx-access.log"))
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / name).mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    access_log {root}/nginx-access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/cxr.conf;
}}
"""
    )
    nginx_log = root / "nginx-error.log"
    nginx = subprocess.Popen([NGINX, "-c", str(root / "nginx.conf"), "-p", str(root)], stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{app_port}", gunicorn, gunicorn_log)
        url = f"http://127.0.0.1:{nginx_port}"
        wait_ready(url, nginx, nginx_log)
        yield Stack(url, gunicorn, root, f"http://127.0.0.1:{app_port}")
    finally:
        nginx.terminate()
        gunicorn.terminate()
        nginx.wait(timeout=30)
        gunicorn.wait(timeout=120)


def predict(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/predict", files={"file": ("cxr.png", data, "image/png")}, params={"cams": "auto"})


def test_prediction_web_page_and_static_files_through_nginx(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = predict(client, png_bytes())
        assert response.status_code == 200, response.text
        assert response.json()["image"]["format"] == "png"
        assert response.headers["x-request-id"] == response.json()["request_id"]
        echoed = client.post("/v1/predict", files={"file": ("a.png", png_bytes())}, headers={"X-Request-ID": "ris-7"})
        assert echoed.json()["request_id"] == "ris-7"
        page = client.get("/")
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        script = client.get("/static/app.js", headers={"Accept-Encoding": "gzip"})
        assert script.status_code == 200
        assert script.headers["server"].startswith("nginx")  # served by nginx, not the app
        assert script.headers.get("content-encoding") == "gzip"
        assert client.get("/docs").status_code == 200
        files = [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(2)]
        batch = client.post("/v1/predict/batch", files=files, params={"cams": "none"})
        assert batch.status_code == 200
        assert [item["index"] for item in batch.json()["results"]] == [0, 1]
        declared = client.post(
            "/v1/predict",
            files={"file": ("a.png", png_bytes())},
            params={"patient_age": "63", "view": "PA"},
            headers={"X-Request-ID": "declared-1"},
        )
        assert declared.status_code == 200 and declared.json()["referral"]["population_verified"]
    # The declared values travel in the query string; the access log keeps the path only. nginx writes the line
    # once the request is finished, which can be a moment after the client has read the answer.
    access_log = stack.log_dir / "nginx-access.log"
    deadline = time.monotonic() + 10
    while not (logged := [line for line in access_log.read_text().splitlines() if "declared-1" in line]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(logged) == 1 and "/v1/predict" in logged[0]
    assert "patient_age" not in logged[0] and "63" not in logged[0].split('"')[1]


def test_upload_limits_at_nginx_and_at_the_app(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        huge = b"\x89PNG\r\n\x1a\n" + bytes(APP_LIMIT + MULTIPART_SLACK_BYTES + 1024)
        at_nginx = client.post("/v1/predict", files={"file": ("big.png", huge)})
        assert at_nginx.status_code == 413
        assert at_nginx.headers["server"].startswith("nginx")
        assert at_nginx.json()["title"] == "Upload too large"
        just_over = b"\x89PNG\r\n\x1a\n" + bytes(APP_LIMIT + 10)  # inside nginx's limit, over the app's
        at_app = client.post("/v1/predict", files={"file": ("big.png", just_over)})
        assert at_app.status_code == 413
        assert at_app.json()["request_id"] == at_app.headers["x-request-id"]
        assert predict(client, png_bytes()).status_code == 200


def test_slow_upload_completes(stack: Stack) -> None:
    data = png_bytes()
    boundary = b"slowboundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
    )

    def trickle() -> Iterator[bytes]:
        step = max(1, len(body) // 8)
        for start in range(0, len(body), step):
            time.sleep(0.15)
            yield body[start : start + step]

    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = client.post(
            "/v1/predict",
            content=trickle(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"},
        )
    assert response.status_code == 200, response.text


def test_gunicorn_alone_cuts_slow_clients_and_refuses_huge_headers(stack: Stack) -> None:
    """Without nginx in front, Gunicorn's workers apply the app's header and body limits (service.process.server)."""
    assert httpx.get(f"{stack.app_url}/readyz", headers={"X-Big": "a" * 8_000_000}, timeout=30).status_code == 431
    host, port = stack.app_url.removeprefix("http://").split(":")
    data = png_bytes()
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # headers one byte at a time: 408
        started = time.monotonic()
        answer = b""
        for byte in b"POST /v1/predict HTTP/1.1\r\nHost: cxr\r\nX-Slow: " + b"a" * 40:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert time.monotonic() - started < 4.5
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a body at 2 bytes/s: 408
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: cxr\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        sock.settimeout(0.5)
        answer = b""
        for offset in range(0, 40, 2):
            try:
                sock.sendall(data[offset : offset + 2])
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        assert predict(client, png_bytes()).status_code == 200


def test_a_worker_restart_while_requests_flow_loses_nothing(stack: Stack) -> None:
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(predict(client, png_bytes()).status_code)

    senders = [threading.Thread(target=traffic) for _ in range(2)]
    for sender in senders:
        sender.start()
    time.sleep(1.0)
    workers = _worker_pids(stack.gunicorn.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGTERM)  # graceful: finish accepted requests, the arbiter starts a new one
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = _worker_pids(stack.gunicorn.pid)
        if len(current) == 2 and workers[0] not in current:
            break
        time.sleep(0.2)
    time.sleep(2.0)  # let the replacement warm up and take traffic
    stop.set()
    for sender in senders:
        sender.join(timeout=60)
    assert len(statuses) > 10
    nginx_errors = [line for line in (stack.log_dir / "nginx-error.log").read_text().splitlines() if "upstream" in line]
    assert set(statuses) == {200}, (statuses, nginx_errors[-5:])


def _worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []
