"""A real uvicorn server on a loopback port, running the real app (used by the service tests)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.state import ServiceState
from service.process.server import server_config
from service.settings import Settings


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds, or fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    def __init__(self, app: FastAPI, server: uvicorn.Server, url: str) -> None:
        self.app = app
        self.server = server
        self.url = url

    @property
    def state(self) -> ServiceState:
        state: ServiceState = self.app.state.service
        return state

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)  # type: ignore[arg-type]


@contextmanager
def live_server(settings: Settings) -> Iterator[LiveServer]:
    """Start uvicorn in a thread; yield once /readyz says ready; stop it (draining) afterwards."""
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(
        server_config(app, settings, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    # A dead inference worker makes the app stop its server: this one, not the pytest process (SIGTERM).
    app.state.service.request_exit = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("test server did not become ready")
        time.sleep(0.05)
    try:
        yield LiveServer(app, server, url)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def tiny_settings(checkpoint: Path, **overrides: object) -> Settings:
    # Each server keeps its audit trail in a fresh temporary SQLite file, never the user's default one.
    audit_dir = Path(tempfile.mkdtemp(prefix="cxr-audit-"))
    audit: dict[str, object] = {"url": f"sqlite:///{audit_dir / 'audit.sqlite3'}", "spool_dir": audit_dir / "spool"}
    values: dict[str, object] = {"model_path": checkpoint, "max_wait_ms": 5.0, **overrides}
    values["audit"] = {**audit, **overrides.get("audit", {})}  # type: ignore[dict-item]
    return Settings(**values)  # type: ignore[arg-type]


class HeldInference:
    """Holds the server's inference worker inside ``Predictor.run`` until released (for queue/drain tests)."""

    def __init__(self, live: LiveServer) -> None:
        predictor = live.state.predictor
        assert predictor is not None
        self.entered = threading.Event()
        self.gate = threading.Event()
        original = predictor.run

        def held_run(requests):  # type: ignore[no-untyped-def]
            self.entered.set()
            self.gate.wait(timeout=30)
            return original(requests)

        predictor.run = held_run  # type: ignore[method-assign]

    def wait_until_running(self, timeout_s: float = 30.0) -> None:
        assert self.entered.wait(timeout=timeout_s), "no batch reached the model"

    def release(self) -> None:
        self.gate.set()
