"""The draining shutdown: a connection accepted before shutdown whose request arrives just after is served.

Stock uvicorn closes such a connection together with its listening socket, and a proxy in front answers
502 (tests/deploy/test_nginx.py saw it during a Gunicorn worker restart). The tests reproduce the race
deterministically: connect, wait until the server has accepted, start the shutdown, wait until the
listener is closed, then send the request.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from service.process.server import DrainingServer
from tests.service.live import free_port


async def hello(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"served"})  # type: ignore[operator]


@contextmanager
def running(server_class: type[uvicorn.Server], port: int) -> Iterator[uvicorn.Server]:
    config = uvicorn.Config(hello, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = server_class(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def listener_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def request_sent_after_shutdown_began(server_class: type[uvicorn.Server]) -> bytes:
    port = free_port()
    with running(server_class, port) as server:
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        deadline = time.monotonic() + 5
        while not server.server_state.connections:  # accepted by the server, no request yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.should_exit = True
        while not listener_closed(port):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:
            client.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        finally:
            client.close()
        return b"".join(chunks)


def test_a_request_on_a_connection_accepted_before_shutdown_is_served() -> None:
    response = request_sent_after_shutdown_began(DrainingServer)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert b"\r\nserved\r\n" in response  # the whole response, then the server closed the connection


def test_stock_uvicorn_drops_it_which_is_why_the_draining_server_exists() -> None:
    # Documents the upstream behaviour this module works around; if uvicorn ever serves it too, the
    # workaround can go.
    assert request_sent_after_shutdown_began(uvicorn.Server) == b""


def test_plain_server_needs_neither_gunicorn_nor_uvicorn_worker() -> None:
    """``python -m service`` must start where only the API's packages are installed (a GPU box, Windows)."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gunicorn', 'uvicorn_worker'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import service.__main__, service.process.server\n"
        "from service.__main__ import main\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
