"""A lean HTTP/1.1 load generator for benchmarks that share the CPU with the server they measure.

On the 2-core development machine the load generator runs on the same cores as the service, so every
millisecond it spends is a millisecond the server does not get. httpx builds each multipart body, parses
headers through several layers and decodes every JSON response: a few milliseconds per request, a
visible share of a ~30 ms request. This client pre-encodes each request once, keeps one connection per
simulated client, reads the status line and ``Content-Length`` framing only, and leaves the body unparsed
(the caller checks what it needs). It is for benchmarks only: the tests use httpx and a real browser.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass


def multipart_request(
    path: str, host: str, field: str, filename: str, content_type: str, payload: bytes, *, query: str = ""
) -> bytes:
    """A complete ``POST`` with a one-file ``multipart/form-data`` body, ready to write to a socket."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    target = f"{path}?{query}" if query else path
    head = (
        f"POST {target} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class ProtocolError(RuntimeError):
    """The server's reply is not the HTTP/1.1 framing this client understands."""


class KeepAliveConnection:
    """One persistent HTTP/1.1 connection: write a pre-built request, read one framed response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> KeepAliveConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    async def send(self, request: bytes) -> RawResponse:
        assert self._reader is not None and self._writer is not None, "use `async with`"
        self._writer.write(request)
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {status_line!r}")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        elif "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        else:
            raise ProtocolError("response has neither Content-Length nor chunked framing")
        return RawResponse(int(parts[1]), headers, body)

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        pieces: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # no trailers from the servers we measure
                return b"".join(pieces)
            pieces.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


def raw_request(path: str, host: str, content_type: str, payload: bytes, *, query: str = "") -> bytes:
    """A complete ``POST`` whose whole body is the image (``Content-Type: image/png`` etc.), no multipart."""
    target = f"{path}?{query}" if query else path
    head = (
        f"POST {target} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + payload
