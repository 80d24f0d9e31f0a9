"""Pure-ASGI middleware: request ids, structured access logs, HTTP metrics and the streaming body limit.

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
            template = getattr(route, "path", None) or "unmatched"
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
    """Send the 413 problem at once; with ``drain``, discard the rest of the body before completing it.

    The status line and the problem go out first, so the client can see the refusal while it is still
    sending; the response is completed (and the connection closed) only after the drain.
    """
    request_id = scope.get("state", {}).get("request_id")
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": "Upload too large",
        "status": 413,
        "detail": f"The request body exceeds the limit of {limit} bytes; send a smaller image "
        "(downsample or compress it) or raise CXR_MAX_UPLOAD_BYTES.",
        "instance": scope.get("path"),
        "request_id": request_id,
    }
    state = scope.setdefault("state", {})
    state["error_type"] = "UploadTooLarge"
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": drain is not None})
    if drain is not None:
        await _drain(drain)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
