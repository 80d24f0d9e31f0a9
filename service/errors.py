"""Domain errors -> HTTP problem details (RFC 9457), in one place.

Routes raise domain exceptions (``bayesnet.ImageError`` subclasses, batcher errors, the service's own);
this module decides the status, the title and the advice a person can act on. Bad input is never a 500.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bayesnet import ImageFacts
from bayesnet.errors import (
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
)
from service.batcher import BatcherClosedError, BatcherError, QueueFullError
from service.schemas import OODResult

log = logging.getLogger("service.errors")

PROBLEM_JSON = "application/problem+json"
_FORM_ADVICE = "send multipart/form-data with the radiograph in the field 'file', or 'files' for batches"


class ServiceError(Exception):
    """An error with an HTTP meaning raised by the service layer."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequestError(ServiceError):
    status = 400
    title = "Bad request"


class NotReadyError(ServiceError):
    status = 503
    title = "Service not ready"


class UploadTooLargeError(ServiceError):
    status = 413
    title = "Upload too large"


class MissingFileError(ServiceError):
    """A form without the field ``file``, or an empty raw body: nothing to score."""

    status = 422
    title = "Invalid request"


class UnsupportedUploadError(ServiceError):
    """A request body that is neither a multipart form nor an image Content-Type."""

    status = 415
    title = "Unsupported media type"


class BadRequestParameterError(ServiceError):
    status = 422
    title = "Invalid request parameter"


class InferenceFailedError(ServiceError):
    status = 500
    title = "Inference failed"


class InferenceTimeoutError(ServiceError):
    status = 504
    title = "Inference timed out"


class UnauthorizedError(ServiceError):
    status = 401
    title = "Missing or invalid API key"


class OutOfDistributionError(ServiceError):
    """The out-of-distribution gate flagged the image and the service runs with ``ood_action=reject``."""

    status = 422
    title = "This does not look like a frontal chest radiograph"

    def __init__(
        self,
        detail: str,
        *,
        ood: OODResult | None = None,
        image: ImageFacts | None = None,
        mc_samples: int | None = None,
    ) -> None:
        super().__init__(detail)
        # What the audit trail records about the refused image (service.audit): never returned to the client.
        self.ood, self.image, self.mc_samples = ood, image, mc_samples


class AuditUnavailableError(ServiceError):
    """The audit record of this request could not be made durable (``CXR_AUDIT_POLICY``, docs/audit.md)."""

    status = 503
    title = "Audit trail unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class NotFoundError(ServiceError):
    status = 404
    title = "Not found"


class AdminOnlyError(ServiceError):
    """A prediction key offered where an admin key is required (the audit read API)."""

    status = 403
    title = "Admin key required"


class NotAcceptableError(ServiceError):
    """The Accept header rules out every representation the endpoint offers (JSON and FHIR R4 JSON)."""

    status = 406
    title = "Not acceptable"


def problem_for(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """``(status, title, detail, headers)`` for any exception the service may meet."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.title, exc.detail, exc.headers
    if isinstance(exc, TooManyPixelsError):
        return 413, "Image has too many pixels", str(exc), {}
    if isinstance(exc, NotAnImageError | UnsupportedFormatError):
        return 415, "Unsupported media type", f"{exc} Send a PNG, JPEG or DICOM radiograph.", {}
    if isinstance(exc, EmptyImageError):
        return 422, "Empty upload", str(exc), {}
    if isinstance(exc, ImageError):
        return 422, "Unusable image", str(exc), {}
    if isinstance(exc, QueueFullError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return (
            503,
            "Server busy",
            "The inference queue is full; retry after the indicated delay.",
            {"Retry-After": retry},
        )
    if isinstance(exc, BatcherClosedError):
        return 503, "Shutting down", "The service is shutting down; retry on another instance.", {"Retry-After": "5"}
    if isinstance(exc, BatcherError):
        return 503, "Inference worker unavailable", str(exc), {"Retry-After": "5"}
    return 500, "Internal error", "An unexpected error occurred; the request id identifies it in the logs.", {}


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
        # A client that hung up mid-upload (or was cut for sending too slowly: service.middleware) is the
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
            # The framework's form-parser messages ("Invalid multipart data.") do not say what to send.
            detail += f" {_FORM_ADVICE.capitalize()}."
        return problem_response(request, exc.status_code, title, detail, headers)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)  # a raw body (request.body()) cut short
    app.add_exception_handler(StarletteHTTPException, http_error)
    for kind in (ServiceError, ImageError, BatcherError):
        app.add_exception_handler(kind, domain_error)
    app.add_exception_handler(Exception, domain_error)
