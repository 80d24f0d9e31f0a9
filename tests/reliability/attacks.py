"""The slow-client attacks of issue #28 as reusable coroutines, for the tests (``test_slow_clients.py``, against
the tiny model) and the ``slow clients`` phase of ``make reliability`` (``bench/reliability.py``, the demo model).

Each attack speaks raw HTTP/1.1 over its own socket (httpx would not send a header value with a trailing tab, nor
stop half-way through a body) and reports the status the server answered, or None when it only closed.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

import bench.decode_memory as decode_memory

SLOW_CLIENTS = 70  # above the default prediction bound: max_queue (64) + max_batch_images (4)


def heavy_dicom(side: int = 7000) -> bytes:
    """A small file that is expensive to decode: a ``side`` x ``side`` 16-bit (12 stored) RLE Lossless DX whose rows
    run in blocks of 64 equal pixels, so it compresses to a few MB (7000 px: 49 megapixels, within the default
    50 M pixel limit, 2.3 MB) while decoding it means the whole image in memory."""
    y = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
    x = (np.arange(side) // 64 * 64 / side * 2 - 1).astype(np.float32)[None, :]
    film = np.clip(1800 + 1400 * y + 600 * np.cos(np.pi * x) ** 2, 0, 4095).astype(np.uint16)
    return decode_memory.dicom_bytes(film, "rle")


async def read_status(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int | None, bytes]:
    """The status and what the server sent; None when the connection closed (or timed out) without an answer."""
    data = b""
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout_s)
        while data and len(data) < 65536:  # the rest of the answer, until the server closes or pauses
            more = await asyncio.wait_for(reader.read(65536), 1.0)
            if not more:
                break
            data += more
    except (TimeoutError, ConnectionError):
        pass
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return (int(match.group(1)) if match else None), data


async def trickle_upload(
    port: int, body: bytes, *, path: str = "/v1/predict", content_type: str = "image/png", bytes_per_s: int = 2
) -> tuple[int | None, float]:
    """Send complete headers, then ``body`` at ``bytes_per_s`` until the server answers: (status, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: cxr\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    answer = asyncio.create_task(read_status(reader, 60))
    for offset in range(0, len(body), bytes_per_s):
        if answer.done():
            break
        try:
            writer.write(body[offset : offset + bytes_per_s])
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(1.0)
    status, _ = await answer
    writer.close()
    return status, time.monotonic() - started


async def drip_headers(port: int, *, every_s: float = 0.2) -> tuple[int | None, float]:
    """Send a request's headers one byte every ``every_s`` until the server answers: (status, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = asyncio.create_task(read_status(reader, 60))
    for byte in b"POST /v1/predict HTTP/1.1\r\nHost: cxr\r\nX-Slow: " + b"a" * 1000:
        if answer.done():
            break
        try:
            writer.write(bytes([byte]))
        except ConnectionError:
            break
        await asyncio.sleep(every_s)
    status, _ = await answer
    writer.close()
    return status, time.monotonic() - started


async def silent_connection(port: int) -> tuple[bytes, float]:
    """Connect and send nothing: (what the server sent before closing, seconds until it closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 60)  # b"" once the server closes
    writer.close()
    return data, time.monotonic() - started


async def unfinished_huge_header(port: int, *, total_bytes: int = 16 * 1024 * 1024) -> int | None:
    """Start one header of ``total_bytes`` and never finish it: the status the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: cxr\r\nX-Big: ")
    answer = asyncio.create_task(read_status(reader, 30))
    try:
        for _ in range(total_bytes // 65536):
            if answer.done():
                break
            writer.write(b"a" * 65536)
            await writer.drain()
    except ConnectionError:
        pass
    status, _ = await answer
    writer.close()
    return status


async def hang_up_mid_body(port: int, path: str, content_type: str, *, sent: int = 20000) -> None:
    """Declare a 100 kB body, send ``sent`` bytes of it, and hang up."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: cxr\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n".encode()
        + b"x" * sent
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()


@dataclass
class Timings:
    """Statuses and seconds of requests sent one after another."""

    results: list[tuple[int, float]] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [status for status, _ in self.results]

    @property
    def slowest_s(self) -> float:
        return max((seconds for _, seconds in self.results), default=0.0)

    def median_s(self) -> float:
        ordered = sorted(seconds for _, seconds in self.results)
        return ordered[len(ordered) // 2] if ordered else 0.0


async def predict_every(
    url: str, film: bytes, *, until: float, every_s: float = 0.5, query: str = "cams=none"
) -> Timings:
    """Real predictions of ``film``, one at a time, every ``every_s`` until the monotonic time ``until``."""
    timings = Timings()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            response = await client.post(f"/v1/predict?{query}", files={"file": ("film.png", film, "image/png")})
            timings.results.append((response.status_code, time.monotonic() - started))
            await asyncio.sleep(every_s)
    return timings


def metric(url: str, pattern: str) -> float:
    """The sum of the /metrics samples whose name and labels match the regular expression ``pattern``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" (\S+)", text))


def server_errors(url: str) -> float:
    return metric(url, r'cxr_http_requests_total\{[^}]*status="5\d\d"[^}]*\}')
