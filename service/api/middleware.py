"""Pure-ASGI middleware: request ids, structured access logs, HTTP metrics and body limits (admission:
``service.api.admission``).

Pure ASGI (not ``BaseHTTPMiddleware``) so that bodies stream through untouched, cancellation on client
disconnect reaches the route, and the size limit acts while the body arrives, before it is all in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.metrics import Metrics

access_log = logging.getLogger("service.access")

#: After a 413, how much of the rest of the body is read and thrown away, and for how long, before the
#: connection closes. Closing a socket with unread data makes the kernel send a reset, which can destroy
#: the 413 before the client reads it (most clients send the whole body before reading anything); nginx
#: does the same ("lingering close"). Drained bytes are never kept, so memory stays bounded.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_S = 2.0

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token, else a fresh one (never echo arbitrary bytes)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = bytes(value).decode("latin-1").strip()
            if _SAFE_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    """Assigns the request id, returns it as ``X-Request-ID``, logs one JSON line and records metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed_s = time.perf_counter() - started
            route = scope.get("route")
            # Requests refused before routing (AdmissionMiddleware) name their route template in the state.
            template = getattr(route, "path", None) or scope.get("state", {}).get("route_template") or "unmatched"
            status = status_holder["status"]
            self.metrics.requests.labels(route=template, method=scope["method"], status=str(status)).inc()
            self.metrics.latency.labels(route=template, status=str(status)).observe(elapsed_s)
            error_type = state.get("error_type")
            if error_type:
                self.metrics.errors.labels(type=error_type).inc()
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "route": template,
                    "method": scope["method"],
                    "status": status,
                    "latency_ms": round(elapsed_s * 1e3, 2),
                    "batch_size": state.get("batch_size"),
                    "error_type": error_type,
                },
            )


@dataclass(frozen=True)
class BodyTiming:
    """How long a request body may take (``CXR_BODY_*``): a deadline, and a minimum average rate after a grace
    period (Kestrel's MinRequestBodyDataRate, in spirit), so a client trickling bytes is cut in seconds while a
    slow but honest link has the whole deadline."""

    timeout_s: float
    min_rate_bytes_s: float
    grace_s: float

    def deadline(self, started: float, received: int) -> float:
        """The loop time by which more of the body must have arrived, given ``received`` bytes so far."""
        deadline = started + self.timeout_s
        if self.min_rate_bytes_s > 0:
            deadline = min(deadline, started + max(self.grace_s, received / self.min_rate_bytes_s))
        return deadline


class BodyLimitMiddleware:
    """Answers 413 as soon as a request body exceeds its size limit, and 408 when it arrives too slowly.

    Size: the declared ``Content-Length`` is checked first; the bytes actually received are counted as they
    stream (a client may lie or send chunked). Time (``timing``): each read of the body waits at most until
    :meth:`BodyTiming.deadline`. On either, the app sees a disconnect (its work and its admission slot end at
    once) and whatever it tries to answer is replaced by the problem.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], timing: BodyTiming | None = None) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timing = timing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # A client that waits for "100 Continue" has not sent the body and will not: nothing to drain.
            await _send_too_large(scope, send, limit, drain=None if expects_continue(scope) else receive)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        timing = self.timing
        received = 0
        refused: Literal["too_large", "too_slow"] | None = None
        body_done = False
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal received, refused, body_done
            if refused is not None:
                return {"type": "http.disconnect"}
            if body_done or timing is None:
                message = await receive()  # after the body: the disconnect watch (service.api.disconnect), untimed
            else:
                try:
                    async with asyncio.timeout_at(timing.deadline(started, received)):
                        message = await receive()
                except TimeoutError:
                    refused = "too_slow"
                    return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = "too_large"
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused is not None:
                return  # the app's reaction to the fake disconnect is replaced by the problem
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is None or response_started:
            return
        drain = None if body_done else receive
        if refused == "too_large":
            await _send_too_large(scope, send, limit, drain=drain)
            return
        assert timing is not None
        elapsed_s = loop.time() - started
        await send_problem(
            scope,
            send,
            status=408,
            title="Request timeout",
            detail=f"The request body arrived too slowly: {received} bytes in {elapsed_s:.0f} s. A body must arrive "
            f"within {timing.timeout_s:g} s, at {timing.min_rate_bytes_s:g} bytes/s or more after the first "
            f"{timing.grace_s:g} s (CXR_BODY_TIMEOUT_S, CXR_BODY_MIN_RATE_BYTES_S).",
            error_type="RequestBodyTimeout",
            drain=drain,
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body, within :data:`DRAIN_MAX_BYTES` and :data:`DRAIN_MAX_S`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_MAX_S
    drained = 0
    while drained <= DRAIN_MAX_BYTES:
        try:
            message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


async def _send_too_large(scope: Scope, send: Send, limit: int, *, drain: Receive | None) -> None:
    """Send the 413 problem at once; with ``drain``, discard the rest of the body before completing it."""
    await send_problem(
        scope,
        send,
        status=413,
        title="Upload too large",
        detail=f"The request body exceeds the limit of {limit} bytes; send a smaller image "
        "(downsample or compress it) or raise CXR_MAX_UPLOAD_BYTES.",
        error_type="UploadTooLarge",
        drain=drain,
    )


async def send_problem(
    scope: Scope,
    send: Send,
    *,
    status: int,
    title: str,
    detail: str,
    error_type: str,
    drain: Receive | None,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> None:
    """Send a problem at once, before the app read the body; with ``drain``, discard the body, then complete.

    The status line and the problem go out first, so the client can see the refusal while it is still
    sending; the response is completed (and the connection closed) only after the drain: closing with
    unread bytes would make the kernel reset the connection and the client would never read the answer.
    """
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": scope.get("path"),
        "request_id": scope.get("state", {}).get("request_id"),
    }
    scope.setdefault("state", {})["error_type"] = error_type
    payload = json.dumps(body).encode()
    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
                *([(b"connection", b"close")] if close else []),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": drain is not None})
    if drain is not None:
        await _drain(drain)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
