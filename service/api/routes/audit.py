"""The auditors' read API: ``GET /v1/audit`` (filters, cursor pages) and ``GET /v1/audit/{request_id}``, as
JSON, NDJSON or FHIR R4 AuditEvent. Admin keys only (``CXR_ADMIN_API_KEYS``): never the prediction keys."""

from __future__ import annotations

import asyncio
import calendar
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BeforeValidator

from service.api.keys import key_matches, offered_api_key
from service.api.negotiation import FHIR_JSON_R4
from service.audit import AuditQuery, AuditTrail
from service.audit.fhir import audit_bundle
from service.errors import AdminOnlyError, NotFoundError, NotReadyError, UnauthorizedError
from service.schemas import AuditPage, AuditRecord, DecisionName, Problem

NDJSON = "application/x-ndjson"
_MAX_PAGE = 1000

router = APIRouter(tags=["audit"])


async def require_admin_key(request: Request) -> None:
    """401 without a key (or an unknown one), 403 with a prediction key: reading the trail is for auditors."""
    settings = request.app.state.service.settings
    offered = offered_api_key(request)
    if key_matches(offered, settings.admin_api_keys):
        return
    if key_matches(offered, settings.api_keys):
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
    for status, text in {
        401: "No or unknown key",
        403: "A prediction key: the audit API needs an admin key",
        503: "The audit trail is not open yet (Retry-After)",
    }.items()
}

# RFC 3339 date-time (what OpenAPI's `format: date-time` means): the offset is required, "T" and "Z" may be lower case.
_DATE_TIME = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[Tt]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?:[Zz]|(?P<sign>[+-])(?P<offset_hours>[0-9]{2}):(?P<offset_minutes>[0-9]{2}))"
)
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)


def instant(value: object) -> object:
    """An ISO 8601 date-time with an offset (RFC 3339: ``2026-01-31T08:00:00Z``, ``...T09:00:00+01:00``) -> an
    aware UTC datetime. Anything else is refused (422): a bare number would otherwise pass as a Unix time, a
    date-time without an offset as some unknown local time. Instants beyond what ``datetime`` holds (year 0,
    a leap second) are clamped: as filters they select the same records."""
    if not isinstance(value, str):
        return value
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        raise ValueError(
            "expected an ISO 8601 date-time with an offset, such as 2026-01-31T08:00:00Z or 2026-01-31T09:00:00+01:00"
        )
    part = {name: int(text) for name, text in match.groupdict().items() if text and name not in ("fraction", "sign")}
    year, month, day = part["year"], part["month"], part["day"]
    if not (
        1 <= month <= 12
        and 1 <= day <= calendar.monthrange(year or 2000, month)[1]  # year 0 is a leap year, as 2000
        and part["hour"] <= 23
        and part["minute"] <= 59
        and part["second"] <= 60  # 60: a leap second
        and part.get("offset_hours", 0) <= 23
        and part.get("offset_minutes", 0) <= 59
    ):
        raise ValueError(f"{value[:40]!r} is not a valid date and time")
    if year == 0:
        return _EARLIEST
    micros = int((match.group("fraction") or "0")[:6].ljust(6, "0"))
    local = datetime(year, month, day, part["hour"], part["minute"], min(part["second"], 59), micros)
    offset = timedelta(hours=part.get("offset_hours", 0), minutes=part.get("offset_minutes", 0))
    try:
        utc = local - offset if match.group("sign") == "+" else local + offset
    except OverflowError:
        return _EARLIEST if match.group("sign") == "+" else _LATEST
    return utc.replace(tzinfo=timezone.utc)


Instant = Annotated[datetime, BeforeValidator(instant)]


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
    since: Annotated[
        Instant | None, Query(description="Records at or after this ISO 8601 date-time with offset (RFC 3339)")
    ] = None,
    until: Annotated[
        Instant | None, Query(description="Records before this ISO 8601 date-time with offset (RFC 3339)")
    ] = None,
    model: Annotated[str | None, Query(description="Model name", max_length=200)] = None,
    label: Annotated[str | None, Query(description="Records with a finding for this label", max_length=64)] = None,
    decision: Annotated[DecisionName | None, Query(description="... decided so (any label without label=)")] = None,
    referral: Annotated[bool | None, Query(description="Referred (true) or cleared (false) films")] = None,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page, unchanged", pattern=r"^[0-9]{1,18}$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
    format: Format = "json",
) -> Response:
    trail = _trail(request)
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
        404: {
            "model": Problem,
            "content": {"application/problem+json": {}},
            "description": "No record with this request id",
        },
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
