"""Pure-ASGI middleware: request ids, structured access logs, HTTP metrics and the streaming body limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so that bodies stream through untouched, cancellation on client
disconnect reaches the route, and the size limit acts while the body arrives, before it is all in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

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


class BodyLimitMiddleware:
    """Answers 413 as soon as a request body exceeds its limit, without reading the rest.

    The declared ``Content-Length`` is checked first; the bytes actually received are counted as they
    stream (a client may lie or send chunked). On overflow the app sees a disconnect and whatever it
    tries to answer is replaced by the 413 problem.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # A client that waits for "100 Continue" has not sent the body and will not: nothing to drain.
            await _send_too_large(scope, send, limit, drain=None if _expects_continue(scope) else receive)
            return
        received = 0
        overflow = False
        body_done = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, overflow, body_done
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if overflow:
                return  # the app's reaction to the fake disconnect is replaced by the 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not response_started:
            await _send_too_large(scope, send, limit, drain=None if body_done else receive)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _expects_continue(scope: Scope) -> bool:
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
    await _send_problem(
        scope,
        send,
        status=413,
        title="Upload too large",
        detail=f"The request body exceeds the limit of {limit} bytes; send a smaller image "
        "(downsample or compress it) or raise CXR_MAX_UPLOAD_BYTES.",
        error_type="UploadTooLarge",
        drain=drain,
    )


async def _send_problem(
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


class AdmissionMiddleware:
    """Sheds prediction requests beyond ``max_in_flight`` with a 503 before their upload is parsed.

    The batcher's bounded queue sheds only after an upload has been received, parsed and decoded; when
    requests arrive several times faster than the model serves them, receiving uploads alone saturates
    the event loop and even the refusals come late. Counting prediction requests inside the app (parsing,
    decoding, queued or in a batch) and refusing the excess at arrival keeps the refusals fast. Behind
    nginx, which buffers request bodies, slow clients do not hold these slots.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: frozenset[str],
        max_in_flight: int,
        retry_after_s: Callable[[], float],
    ) -> None:
        self.app = app
        self.paths = paths
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            scope.setdefault("state", {})["route_template"] = scope["path"]  # the paths are their own templates
            # The body is read and discarded (BodyLimitMiddleware, outside, still bounds it) before answering:
            # cheap next to parsing and decoding it, and the connection stays usable for the client's retry.
            if not _expects_continue(scope):
                while (message := await receive())["type"] == "http.request" and message.get("more_body", False):
                    pass
            retry = max(1, math.ceil(self.retry_after_s()))
            await _send_problem(
                scope,
                send,
                status=503,
                title="Server busy",
                detail=f"{self.in_flight} predictions are already in progress; retry after the indicated delay.",
                error_type="QueueFullError",
                drain=None,
                headers={"Retry-After": str(retry)},
                close=_expects_continue(scope),
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
