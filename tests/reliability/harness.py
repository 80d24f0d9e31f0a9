"""Reliability harness: a real ``python -m service`` process, a steady-rate load generator, an overload burst,
and clients that hang up mid-upload or mid-inference.

Shared by the fast tests (``tests/reliability/test_*.py``: tiny model, a few seconds) and the long run
(``bench/reliability.py``: the shipped demo model, a minute of load). Everything here talks to the server
over loopback HTTP like a real client; the only view inside the process is its RSS and open descriptors
(psutil), the way an operator would watch it.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.loadgen import KeepAliveConnection, ProtocolError
from bench.loadgen import multipart_request as prebuilt_request

REPO = Path(__file__).resolve().parents[2]
FAULTY_SERVER = Path(__file__).resolve().parent / "faulty_server.py"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m service`` (or the fault-injecting wrapper) in its own process, on a free loopback port.

    stdout (JSON log lines) and stderr go to files in ``log_dir`` so that a chatty server never blocks on a
    full pipe. ``start()`` returns once ``/readyz`` answers 200, or raises with the log tail.
    """

    def __init__(
        self,
        model_dir: Path | None,
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        fault_args: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self.stderr_path = log_dir / f"server-{self.port}.stderr"
        self._env = {
            **os.environ,
            "CXR_PORT": str(self.port),
            "CXR_LOG_LEVEL": "INFO",
            "CXR_LOG_JSON": "true",
            # The test's own audit trail (docs/audit.md), never the user's default one.
            "CXR_AUDIT_URL": f"sqlite:///{log_dir / 'audit.sqlite3'}",
            "CXR_AUDIT_SPOOL_DIR": str(log_dir / "audit-spool"),
            **({"CXR_MODEL_PATH": str(model_dir)} if model_dir is not None else {}),
            **(env or {}),
        }
        entry = [str(FAULTY_SERVER), *fault_args] if fault_args is not None else ["-m", "service"]
        self._argv = [sys.executable, *entry]
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it (start-up failure tests)."""
        with self.log_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(self._argv, cwd=REPO, env=self._env, stdout=out, stderr=err)
        return self.process

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        process = self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not become ready; stderr: {self.stderr()[-2000:]}; log: {self.log()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def open_fds(self) -> int:
        return int(psutil.Process(self.pid).num_fds())

    def connections(self) -> int:
        """TCP connections the server holds (any state); back to the idle count when nothing leaks."""
        return len(psutil.Process(self.pid).net_connections(kind="tcp"))

    def sigterm(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def small_pngs(n: int, size: int = 96) -> list[bytes]:
    """``n`` different small grayscale PNGs: cheap uploads for the tests' tiny model."""
    out = []
    for seed in range(n):
        pixels = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ load


@dataclass
class LoadReport:
    """What one phase of load did. ``lost`` = requests that got no HTTP answer at all (reset, timeout)."""

    name: str
    offered_rate_per_s: float
    duration_s: float
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    ok_latencies_s: list[float] = field(default_factory=list)
    busy_latencies_s: list[float] = field(default_factory=list)
    busy_without_retry_after: int = 0

    def record(self, status: int, elapsed_s: float, *, has_retry_after: bool) -> None:
        """One answered request: its status, and its latency under 200 or 503 (which must carry Retry-After)."""
        self.statuses[status] += 1
        if status == 200:
            self.ok_latencies_s.append(elapsed_s)
        elif status == 503:
            self.busy_latencies_s.append(elapsed_s)
            if not has_retry_after:
                self.busy_without_retry_after += 1

    @property
    def succeeded(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return self.sent - self.succeeded

    @property
    def server_errors(self) -> int:
        """5xx other than the 503 that overload is supposed to produce."""
        return sum(n for status, n in self.statuses.items() if status >= 500 and status != 503)

    @property
    def throughput_per_s(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float, *, busy: bool = False) -> float:
        values = self.busy_latencies_s if busy else self.ok_latencies_s
        return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")

    def summary(self) -> str:
        return (
            f"{self.name}: offered {self.offered_rate_per_s:.1f}/s for {self.duration_s:.1f} s, sent {self.sent}, "
            f"ok {self.succeeded}, failed {self.failed} {dict(sorted(self.statuses.items()))}, lost {self.lost}, "
            f"p50/p95/p99 {self.percentile_ms(50):.0f}/{self.percentile_ms(95):.0f}/{self.percentile_ms(99):.0f} ms, "
            f"{self.throughput_per_s:.1f} ok/s"
        )


async def _one_request(
    http: httpx.AsyncClient, image: bytes, params: dict[str, str], report: LoadReport
) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await http.post("/v1/predict", params=params, files={"file": ("cxr.png", image, "image/png")})
    except httpx.HTTPError:
        report.lost += 1
        return None
    report.record(
        response.status_code, time.perf_counter() - started, has_retry_after="retry-after" in response.headers
    )
    return response


async def _one_lean_request(url: httpx.URL, request: bytes, report: LoadReport, timeout_s: float) -> None:
    """One pre-built request on a fresh raw connection (bench/loadgen.py): a few percent of httpx's CPU."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s), KeepAliveConnection(url.host, url.port or 80) as connection:
            response = await connection.send(request)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError):
        report.lost += 1
        return
    report.record(response.status, time.perf_counter() - started, has_retry_after="retry-after" in response.headers)


async def _paced(report: LoadReport, send: Callable[[int], Awaitable[object]]) -> None:
    """Start ``send(i)`` on schedule, one every ``1 / rate`` s for the report's duration; then await them all."""
    rate = report.offered_rate_per_s
    tasks = []
    started = time.perf_counter()
    for i in range(int(rate * report.duration_s)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(i)))
        report.sent += 1
    await asyncio.gather(*tasks)


async def steady_load(
    url: str,
    images: Sequence[bytes],
    *,
    rate_per_s: float,
    duration_s: float,
    name: str = "load",
    params: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    lean: bool = False,
) -> LoadReport:
    """Open-loop load: one request every ``1 / rate_per_s`` seconds for ``duration_s``, whatever the answers.

    Open loop (arrivals do not wait for responses) is what a hospital's clients do, and the only way to offer
    more than the server can take. Then waits for every request to end.
    """
    report = LoadReport(name, rate_per_s, duration_s)
    query = params or {"cams": "none"}
    if lean:  # for bursts far beyond capacity: the generator must not starve the server it measures
        target = httpx.URL(url)
        host = f"{target.host}:{target.port}"
        prebuilt = [
            prebuilt_request("/v1/predict", host, "file", "cxr.png", "image/png", image, query=urlencode(query))
            for image in images
        ]
        await _paced(report, lambda i: _one_lean_request(target, prebuilt[i % len(prebuilt)], report, timeout_s))
        return report
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        await _paced(report, lambda i: _one_request(http, images[i % len(images)], query, report))
    return report


async def measure_capacity(
    url: str, images: Sequence[bytes], *, clients: int, duration_s: float, params: dict[str, str] | None = None
) -> float:
    """Successful predictions per second with ``clients`` back-to-back clients (closed loop): the capacity."""
    query = params or {"cams": "none"}
    done = 0
    deadline = time.perf_counter() + duration_s
    started = time.perf_counter()

    async def client(index: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            i = index
            while time.perf_counter() < deadline:
                response = await http.post(
                    "/v1/predict", params=query, files={"file": ("cxr.png", images[i % len(images)])}
                )
                done += response.status_code == 200
                i += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return done / (time.perf_counter() - started)


async def wait_idle(url: str, timeout_s: float = 120.0) -> None:
    """Until the server's queue is empty (after a burst), or raise."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            response = await http.get("/readyz")
            if response.status_code == 200 and response.json()["queue_depth"] == 0:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("the server's queue did not drain")


# ----------------------------------------------------------------------------------------- disconnects


def multipart_request(port: int, image: bytes, *, query: str = "cams=none") -> tuple[bytes, bytes]:
    """(head, body) of a raw ``POST /v1/predict`` upload, for clients that misbehave on the socket level."""
    boundary = "reliability-boundary-7d1e"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cxr.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/predict?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def hang_up_mid_upload(port: int, image: bytes) -> None:
    """Send the headers and half the body, then close the socket."""
    head, body = multipart_request(port, image)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.05)


def send_then_hang_up(port: int, image: bytes, *, after_s: float) -> None:
    """Send a whole upload, wait ``after_s`` (its inference is queued or running), then close without reading."""
    head, body = multipart_request(port, image)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(after_s)
        # RST instead of FIN: the way a killed client or a timed-out proxy leaves.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) in an exposition text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
