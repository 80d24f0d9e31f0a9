"""The HTTP routes, one module per resource; ``ROUTERS`` lists them in the order the OpenAPI document shows them.

``deps`` holds what they share (the API key, readiness, the auditor, content negotiation, upload reading).
Errors raised here are rendered by ``service.api.problems``.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import audit, dicomweb, guarantee, model, ops, outcomes, pages, predict, preview
from service.api.routes.deps import PREDICT_PATHS, PREVIEW_PATHS, STATIC_DIR, require_api_key

__all__ = ["PREDICT_PATHS", "PREVIEW_PATHS", "ROUTERS", "STATIC_DIR", "require_api_key"]

#: Every route of the service; the audit trail's read API (/v1/audit) checks the administrators' key itself, the
#: verdicts route (/v1/outcomes) the outcome key, the guarantee's operation (/v1/guarantee) the admin key.
ROUTERS: tuple[APIRouter, ...] = tuple(
    part.router for part in (predict, dicomweb, preview, model, ops, pages, audit, outcomes, guarantee)
)
