"""uvicorn's server, and its Gunicorn worker, with a shutdown that serves what was already accepted.

On shutdown uvicorn closes its listening sockets and, in the same step, closes every connection that has no
request in progress. A connection the process accepted a moment earlier, whose request bytes sit unread in
the socket buffer, counts as idle and is closed: nginx sees "upstream prematurely closed connection" and
answers 502 for a POST it may not retry (tests/deploy/test_nginx.py caught it during a Gunicorn worker
restart). :class:`DrainingServer` stops accepting first, then gives accepted connections ``read_grace_s``
to deliver their request before the stock shutdown runs: a request that arrives in that window is served,
then its connection is closed, and the drain waits for it like any request in progress.

``python -m service`` runs :class:`DrainingServer`; Gunicorn runs its worker,
``service.process.gunicorn_worker.DrainingUvicornWorker`` (``docker/gunicorn.conf.py``), kept in its own module so
that the plain server needs neither Gunicorn nor uvicorn-worker (Gunicorn does not even import on Windows).

Both speak HTTP through :class:`GuardedHttpToolsProtocol` (:func:`server_config`), which bounds how long and how
large a request's headers may be: without nginx in front, nothing else would (docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

#: Seconds between "stop accepting" and "close idle connections": loopback peers (nginx) write their request
#: right after connecting, so this is generous; it only delays the exit of a process that is stopping.
READ_GRACE_S = 0.5


class DrainingServer(uvicorn.Server):
    read_grace_s = READ_GRACE_S

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if self.server_state.connections and not self.force_exit:
            await asyncio.sleep(self.read_grace_s)
        await super().shutdown()  # closes what is still idle, waits for requests in progress, lifespan


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take before its request reaches the app (``CXR_HEADER_*``, docs/security.md)."""

    header_timeout_s: float
    max_header_bytes: int
    max_header_count: int
    #: After an answer sent before its request's body was read (a 401, a 503), how long the rest of that body
    #: may take to arrive while it is read and discarded; then the connection is closed.
    body_after_answer_s: float = 5.0
    #: After a refusal, how long and how much of what the client is still sending is read and dropped, so that
    #: the refusal is read rather than destroyed by a reset (nginx's lingering close).
    linger_s: float = 2.0
    linger_bytes: int = 64 * 1024 * 1024
    #: Called with the reason of each connection the protocol cut (the app's /metrics counts them).
    on_refusal: Callable[[str], None] = field(default=lambda reason: None)

    @classmethod
    def from_settings(cls, settings: Settings, on_refusal: Callable[[str], None]) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            on_refusal=on_refusal,
        )


class _HeadersTooLargeError(Exception):
    """Raised from a parser callback: the request's headers went over a limit (answered 431)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits a server facing clients directly needs.

    uvicorn bounds neither how long a request's headers may take nor how large they may be: a client sending
    one header byte a second holds its connection forever, and an 8 MB header is read, parsed and handed to the
    app. This protocol times the header phase from the connection's (or request's) first byte and answers 408,
    counts header bytes as they arrive (before the parser has buffered them) and answers 431, and closes a
    connection whose unread body keeps trickling after its answer. Each refusal is written directly, as
    problem+json with ``Connection: close``, followed by a short lingering close. Request bodies are timed by
    the app (``service.api.middleware.BodyLimitMiddleware``), which can answer through the normal path.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._raw_header_bytes = 0  # bytes read while this request's headers were incomplete (parser's buffer)
        self._parsed_header_bytes = 0  # request line and header fields the parser has handed over
        self._header_fields = 0
        self._request_begun = False  # the connection has sent the first byte of a request
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # after a refusal: the bytes discarded since; -1 when not lingering

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:  # a refusal was sent: drop what the client is still sending
            self._lingering += len(data)
            if self._lingering > self.limits.linger_bytes:
                self.transport.close()
            return
        if self._awaiting_headers:
            self._raw_header_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _HeadersTooLargeError):
                self._refuse(431, "Request header fields too large", str(err.__context__), "headers_too_large")
                return
            self._invalid_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._invalid_request()
            return
        if self._awaiting_headers and self._raw_header_bytes > self.limits.max_header_bytes:
            # The headers are still incomplete and already too large: refuse before the parser buffers more.
            self._refuse(431, "Request header fields too large", self._too_large_detail(), "headers_too_large")

    def _invalid_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = self._request_begun = True
        self._header_fields = 0
        self._raw_header_bytes = self._parsed_header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        if self._header_fields > self.limits.max_header_count:
            raise _HeadersTooLargeError(
                f"The request has more than {self.limits.max_header_count} header fields; send fewer "
                "(CXR_MAX_HEADER_COUNT)."
            )
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing() and self._body_timer is None:
            # Answered before its body was read (a 401, a 503): uvicorn reads and drops the rest, and each chunk
            # restarts its keep-alive timer, so a body trickling in would hold the connection forever.
            self._body_timer = self.loop.call_later(self.limits.body_after_answer_s, self._body_too_slow)

    def _count_header_bytes(self, n: int) -> None:
        # Exact, where the raw count in data_received is not: when the headers and the body share one read.
        self._parsed_header_bytes += n
        if self._parsed_header_bytes > self.limits.max_header_bytes:
            raise _HeadersTooLargeError(self._too_large_detail())

    def _too_large_detail(self) -> str:
        return (
            f"The request line and headers exceed {self.limits.max_header_bytes} bytes "
            "(CXR_MAX_HEADER_BYTES); send smaller headers."
        )

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers are late while the previous answer is still being made: that
            # answer first; the next request gets its full time once the connection is idle.
            self._arm_header_timer()
            return
        self._refuse(
            408,
            "Request timeout",
            f"The request's headers did not arrive within {self.limits.header_timeout_s:g} s (CXR_HEADER_TIMEOUT_S).",
            "header_timeout",
            silent=not self._request_begun,
        )

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self.limits.on_refusal("body_after_answer_timeout")
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _refuse(self, status: int, title: str, detail: str, reason: str, *, silent: bool = False) -> None:
        """Answer ``status`` with a problem (unless ``silent``: a connection that never sent a byte is just
        closed, as nginx does), then linger: read and drop what the client still sends for a moment, so that
        it reads the answer instead of a reset, and close."""
        self.limits.on_refusal(reason)
        self.logger.info("connection refused: %s (%d)", reason, status)
        self._cancel_timers()
        self._awaiting_headers = False
        if self.transport.is_closing():
            return
        if silent:
            self.transport.close()
            return
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
        head = [
            f"HTTP/1.1 {status} {title}\r\n".encode(),
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/problem+json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self._lingering = 0
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete: the client sees the end of it
        self.loop.call_later(self.limits.linger_s, self._end_linger)

    def _end_linger(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)`` for these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def server_config(app: FastAPI, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn config every entry point uses (``python -m service``, the tests' live servers): the app
    behind :class:`GuardedHttpToolsProtocol` with ``settings``' limits, refusals counted in its /metrics."""
    state = app.state.service
    limits = ConnectionLimits.from_settings(settings, on_refusal=state.metrics.count_connection_refusal)
    return uvicorn.Config(app, http=guarded_protocol(limits), **kwargs)
