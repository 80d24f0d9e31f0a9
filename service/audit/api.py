"""The auditors' read API: ``GET /v1/audit`` (filters, cursor pages) and ``GET /v1/audit/{request_id}``, as
JSON, NDJSON or FHIR R4 AuditEvent. Admin keys only (``CXR_ADMIN_API_KEYS``): never the prediction keys."""

from __future__ import annotations

import asyncio
import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from service.audit import AuditQuery, AuditTrail
from service.audit.fhir import audit_bundle
from service.errors import AdminOnlyError, BadRequestParameterError, NotFoundError, NotReadyError, UnauthorizedError
from service.negotiation import FHIR_JSON_R4
from service.schemas import AuditPage, AuditRecord, DecisionName, Problem

NDJSON = "application/x-ndjson"
_MAX_PAGE = 1000

router = APIRouter(tags=["audit"])


def _offered_key(request: Request) -> str:
    offered = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not offered and auth.lower().startswith("bearer "):
        offered = auth[7:].strip()
    return offered


def _matches(offered: bytes, keys: list[str]) -> bool:
    matched = False
    for key in keys:  # every key, constant time per key
        matched |= hmac.compare_digest(offered, key.encode())
    return matched and bool(offered)


async def require_admin_key(request: Request) -> None:
    """401 without a key (or an unknown one), 403 with a prediction key: reading the trail is for auditors."""
    settings = request.app.state.service.settings
    offered = _offered_key(request).encode()
    if _matches(offered, [k.get_secret_value() for k in settings.admin_api_keys]):
        return
    if offered and _matches(offered, [k.get_secret_value() for k in settings.api_keys]):
        raise AdminOnlyError("This key may predict but not read the audit trail; use a key from CXR_ADMIN_API_KEYS.")
    raise UnauthorizedError(
        "Send an admin key (CXR_ADMIN_API_KEYS) in the X-API-Key header (or Authorization: Bearer).",
        headers={"WWW-Authenticate": 'Bearer realm="bayesnet-cxr-audit"'},
    )


def _trail(request: Request) -> AuditTrail:
    trail = request.app.state.audit
    if not isinstance(trail, AuditTrail):
        raise NotReadyError("The audit trail is not open yet; retry shortly.", headers={"Retry-After": "5"})
    return trail


Format = Annotated[
    Literal["json", "ndjson", "fhir"],
    Query(description="json (a page object), ndjson (one record per line) or fhir (a Bundle of R4 AuditEvent)"),
]
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {401: "No or unknown key", 403: "A prediction key: the audit API needs an admin key"}.items()
}


def _render(records: list[AuditRecord], fmt: str, next_cursor: str | None, next_url: str | None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if next_cursor is not None:
        headers["X-Next-Cursor"] = next_cursor
        assert next_url is not None
        headers["Link"] = f'<{next_url}>; rel="next"'
    if fmt == "ndjson":
        body = "".join(record.model_dump_json() + "\n" for record in records)
        return Response(body, media_type=NDJSON, headers=headers)
    if fmt == "fhir":
        return JSONResponse(audit_bundle(records, next_url=next_url), media_type=FHIR_JSON_R4, headers=headers)
    page = AuditPage(items=records, next_cursor=next_cursor)
    return JSONResponse(page.model_dump(mode="json"), headers=headers)


@router.get(
    "/v1/audit",
    response_model=AuditPage,
    responses={200: {"content": {NDJSON: {}, FHIR_JSON_R4: {}}}, **_AUTH_ERRORS},
    dependencies=[Depends(require_admin_key)],
    summary="Audit records, oldest first, filtered, one page at a time (admin key)",
)
async def list_audit(
    request: Request,
    since: Annotated[datetime | None, Query(description="Records at or after (ISO 8601, with offset)")] = None,
    until: Annotated[datetime | None, Query(description="Records before (ISO 8601, with offset)")] = None,
    model: Annotated[str | None, Query(description="Model name", max_length=200)] = None,
    label: Annotated[str | None, Query(description="Records with a finding for this label", max_length=64)] = None,
    decision: Annotated[DecisionName | None, Query(description="... decided so (any label without label=)")] = None,
    referral: Annotated[bool | None, Query(description="Referred (true) or cleared (false) films")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page", max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    format: Format = "json",
) -> Response:
    trail = _trail(request)
    if cursor is not None and not cursor.isdigit():
        raise BadRequestParameterError("cursor: pass the next_cursor of the previous page unchanged.")
    query = AuditQuery(since=since, until=until, model=model, label=label, decision=decision, refer=referral)
    after = int(cursor) if cursor is not None else None
    records, last = await asyncio.to_thread(trail.store.page, query, after=after, limit=limit)
    next_cursor = str(last) if last is not None else None
    next_url = str(request.url.include_query_params(cursor=next_cursor)) if next_cursor is not None else None
    return _render(records, format, next_cursor, next_url)


@router.get(
    "/v1/audit/{request_id}",
    response_model=AuditPage,
    responses={
        200: {"content": {NDJSON: {}, FHIR_JSON_R4: {}}},
        404: {"model": Problem, "description": "No record with this request id"},
        **_AUTH_ERRORS,
    },
    dependencies=[Depends(require_admin_key)],
    summary="The records of one request (one per file of a batch upload) (admin key)",
)
async def get_audit(request: Request, request_id: str, format: Format = "json") -> Response:
    records = await asyncio.to_thread(_trail(request).store.by_request, request_id)
    if not records:
        raise NotFoundError(f"No audit record has the request id {request_id[:128]!r}.")
    return _render(records, format, None, None)
