"""Does the audit trail slow predictions? The same service with and without it, in ONE run.

Two servers in this process (uvicorn threads on loopback), the same checkpoint (default: the shipped demo
model) on CPU: one writes its trail to a fresh SQLite file (WAL, fail-closed: each answer waits for its
record's commit), the other has the recorder replaced by a pass-through (the prediction path without any
audit work). Requests and bursts alternate between them so machine noise hits both alike; prints p50/p95
latency at one client, throughput at ``--clients`` clients, and the ratios with/without. Read the ratios.

    python bench/audit.py [--model DIR] [--rounds 4] [--requests 24] [--clients 8] [--audit-url URL]
                          [--sqlite-synchronous FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import uvicorn
from PIL import Image

from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings

T = TypeVar("T")


def radiograph(seed: int, size: int = 512) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(settings: Settings, *, audited: bool) -> Iterator[str]:
    app = create_app(settings)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.1)
    if not audited:

        async def passthrough(subject: object, data: bytes, prediction: Awaitable[T]) -> T:
            return await prediction

        app.state.audit.auditor.audited = passthrough  # the prediction path with no audit work at all
    try:
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


async def run_load(url: str, images: list[bytes], clients: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for n in counter:
            started = time.perf_counter()
            response = await http.post(
                "/v1/predict", params={"cams": "none"}, files={"file": ("x.png", images[n % len(images)])}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24, help="per round and load level")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--audit-url", help="the audited server's database (default: a fresh SQLite file)")
    parser.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    images = [radiograph(seed) for seed in range(8)]

    def settings(name: str, url: str | None = None) -> Settings:
        return Settings(
            model_path=args.model,
            device="cpu",
            log_json=False,
            log_level="WARNING",
            audit={
                "url": url or f"sqlite:///{workdir / f'{name}.sqlite3'}",
                "spool_dir": workdir / f"{name}-spool",
                "sqlite_synchronous": args.sqlite_synchronous,
            },
        )

    off_lat: list[float] = []
    on_lat: list[float] = []
    off_s = on_s = 0.0
    with (
        server(settings("off"), audited=False) as off_url,
        server(settings("on", args.audit_url), audited=True) as on_url,
    ):
        for url in (off_url, on_url):  # warm both
            asyncio.run(run_load(url, images, 2, 4))
        # Latency: one client, requests alternating between the servers (the order flips each time), so a load
        # spike from elsewhere on the machine hits both alike.
        for i in range(args.rounds * args.requests):
            order = [(off_url, off_lat), (on_url, on_lat)]
            for url, sink in order if i % 2 == 0 else order[::-1]:
                latencies, _ = asyncio.run(run_load(url, images, 1, 1))
                sink += latencies
        # Throughput: short bursts of --clients concurrent clients, alternating, summed per server.
        for i in range(args.rounds):
            pair = [(off_url, "off"), (on_url, "on")]
            for url, name in pair if i % 2 == 0 else pair[::-1]:
                started = time.perf_counter()
                asyncio.run(run_load(url, images, args.clients, args.requests))
                elapsed = time.perf_counter() - started
                if name == "off":
                    off_s += elapsed
                else:
                    on_s += elapsed
    total = args.rounds * args.requests
    print(f"{'':<16} {'p50 ms (1 client)':>18} {'p95 ms':>8} {f'images/s ({args.clients} clients)':>22}")
    for name, lat, seconds in (("without audit", off_lat, off_s), ("with audit", on_lat, on_s)):
        p50, p95 = statistics.median(lat) * 1e3, float(np.percentile(lat, 95)) * 1e3
        print(f"{name:<16} {p50:18.1f} {p95:8.1f} {total / seconds:22.2f}")
    print(
        f"ratios with/without audit: p50 latency {statistics.median(on_lat) / statistics.median(off_lat):.3f}, "
        f"p95 latency {np.percentile(on_lat, 95) / np.percentile(off_lat, 95):.3f}, "
        f"throughput {off_s / on_s:.3f} ({total} requests per server per measure)"
    )


if __name__ == "__main__":
    main()
