"""Errors -> HTTP problem details (RFC 9457) with the request id: the handlers the app installs."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.routing import compile_path

from bayesnet.errors import ImageError
from service.errors import ServiceError
from service.problems import problem_for
from service.runtime.batcher import BatcherError

log = logging.getLogger("service.errors")

PROBLEM_JSON = "application/problem+json"
_FORM_ADVICE = "send multipart/form-data with the radiograph in the field 'file', or 'files' for batches"


def problem_response(
    request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": request_id,
        **extra,
    }
    response_headers = dict(headers or {})
    if request_id:
        response_headers["X-Request-ID"] = request_id
    return JSONResponse(body, status_code=status, headers=response_headers, media_type=PROBLEM_JSON)


def _methods_of(request: Request) -> list[str]:
    """Every method the app's routes take at the request's path."""
    methods: set[str] = set()
    for context in iter_route_contexts(request.app.routes):  # included routers' routes too
        route = context.original_route
        taken = getattr(route, "methods", None)
        pattern = compile_path(str(context.path_format or getattr(route, "path_format", "")))[0]
        if taken and pattern.match(request.url.path):
            methods |= set(taken)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves as problem+json with the request id."""

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        status, title, detail, headers = problem_for(exc)
        request.state.error_type = type(exc).__name__
        if status >= 500:
            log.error("request failed: %s", title, exc_info=exc)
        return problem_response(request, status, title, detail, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        request.state.error_type = "RequestValidationError"
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        detail = "; ".join(parts) or "invalid request"
        if any(tuple(e.get("loc", ()))[-1:] in (("file",), ("files",)) for e in exc.errors()):
            detail += f" ({_FORM_ADVICE})"
        return problem_response(request, 422, "Invalid request", detail)

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:
        # A client that hung up mid-upload (or was cut for sending too slowly: service.api.middleware) is the
        # client's doing: nginx's 499, one access-log line, no traceback, never counted as a server error.
        # Nobody receives this answer.
        request.state.error_type = "ClientDisconnect"
        return problem_response(
            request, 499, "Client closed the connection", "The client hung up before its upload was complete."
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, ClientDisconnect):
            # FastAPI reports any failure while parsing a form as a 400, a client that hung up mid-upload too.
            return await client_gone(request, exc.__cause__)
        request.state.error_type = f"HTTP{exc.status_code}"
        headers = dict(exc.headers or {})
        title = {404: "Not found", 405: "Method not allowed", 400: "Bad request"}.get(exc.status_code, "HTTP error")
        detail = str(exc.detail)
        if exc.status_code == 400 and request.method == "POST":
            # The framework's parser messages ("Invalid multipart data.", "There was an error parsing the body") do
            # not say what to send: a JSON object where the route takes one, else the radiograph as a form.
            json_body = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
            detail += " Send the request's JSON object (see /docs)." if json_body else f" {_FORM_ADVICE.capitalize()}."
        if exc.status_code == 405:
            # Starlette names only the first route of the path; a path served by several (GET and POST
            # /v1/guarantee) must list every method it takes (RFC 9110 15.5.6).
            headers["Allow"] = ", ".join(_methods_of(request))
        return problem_response(request, exc.status_code, title, detail, headers)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)  # a raw body (request.body()) cut short
    app.add_exception_handler(StarletteHTTPException, http_error)
    for kind in (ServiceError, ImageError, BatcherError):
        app.add_exception_handler(kind, domain_error)
    app.add_exception_handler(Exception, domain_error)
