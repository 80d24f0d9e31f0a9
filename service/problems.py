"""Every exception the service may meet -> ``(status, title, detail, headers)``, in one place.

The HTTP layer (``service.api.problems``) renders the answer as problem details (RFC 9457); the audit trail and
the STOW-RS service record the same classification. Bad input is never a 500.
"""

from __future__ import annotations

import math

from bayesnet.errors import (
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
)
from service.errors import ServiceError
from service.runtime.batcher import BatcherClosedError, BatcherError, QueueFullError

__all__ = ["problem_for"]


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
