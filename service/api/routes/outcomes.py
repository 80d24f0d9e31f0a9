"""Radiologists' verdicts in: ``POST /v1/outcomes`` (issue #30, docs/guarantee.md).

The final verdict per finding for films the service scored, as a FHIR R4 DiagnosticReport (or a Bundle of them),
CSV or NDJSON rows, or HL7 v2 ORU^R01 messages; parsed by ``service.outcomes.parsing``, matched to the films'
audit records and stored beside them by ``service.audit.outcomes``: all of a submission, or none of it with every
refused row named. Outcome keys only (``CXR_OUTCOME_API_KEYS``): a prediction or admin key is refused (403).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.api.keys import key_matches, offered_api_key
from service.api.problems import problem_response
from service.audit import AuditTrail, client_id_for
from service.audit.outcomes import store_outcomes
from service.errors import BadRequestParameterError, NotReadyError, OutcomeKeyRequiredError, UnauthorizedError
from service.outcomes.parsing import CodeMap, OutcomeRow, RowError, parse_fhir, parse_hl7, parse_tabular
from service.schemas import OutcomeReceiptBody, Problem

#: Media type of HL7 v2 messages in their pipe-and-hat encoding (HL7's registration for v2 over HTTP).
HL7_V2 = "x-application/hl7-v2+er7"
#: Accepted media types -> the source recorded with each verdict.
SOURCES = {
    "application/fhir+json": "fhir",
    "application/json": "fhir",
    "text/csv": "csv",
    "application/x-ndjson": "ndjson",
    HL7_V2: "hl7",
}

router = APIRouter(tags=["outcomes"])


async def require_outcome_key(request: Request) -> str:
    """The sender's key id; 401 without a key (or an unknown one), 403 with another role's key."""
    settings = request.app.state.service.settings
    offered = offered_api_key(request)
    if key_matches(offered, settings.outcome_api_keys):
        return client_id_for(offered)
    if key_matches(offered, settings.api_keys) or key_matches(offered, settings.admin_api_keys):
        raise OutcomeKeyRequiredError("This key may not send verdicts; use a key from CXR_OUTCOME_API_KEYS.")
    raise UnauthorizedError(
        "Send an outcome key (CXR_OUTCOME_API_KEYS) in the X-API-Key header (or Authorization: Bearer).",
        headers={"WWW-Authenticate": 'Bearer realm="bayesnet-cxr-outcomes"'},
    )


def code_map(request: Request) -> CodeMap:
    """The site's code mapping (``CXR_OUTCOME_CODE_MAP``), read once and kept on the app."""
    cached = getattr(request.app.state, "outcome_code_map", None)
    if isinstance(cached, CodeMap):
        return cached
    path = request.app.state.service.settings.outcome_code_map
    codes = CodeMap.from_file(path) if path is not None else CodeMap.default()
    request.app.state.outcome_code_map = codes
    return codes


def _parse(source: str, media_type: str, body: bytes, codes: CodeMap) -> tuple[list[OutcomeRow], list[RowError]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequestParameterError(f"The body is not UTF-8 text (byte {err.start}).") from err
    if source == "hl7":
        return parse_hl7(text, codes)
    if source == "fhir":
        import json

        try:
            resource = json.loads(text)
        except ValueError as err:
            raise BadRequestParameterError(f"The body is not JSON: {err}.") from err
        if not isinstance(resource, dict):
            raise BadRequestParameterError("Send one FHIR DiagnosticReport or a Bundle of them.")
        return parse_fhir(resource, codes)
    return parse_tabular(text, "text/csv" if source == "csv" else "application/x-ndjson", codes)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {
        400: "The body cannot be read as the media type says",
        401: "No or unknown key",
        403: "A prediction or admin key: verdicts need an outcome key",
        415: "A media type the route does not take",
        422: "Refused rows (problem+json with an `errors` list: row, code, detail); nothing was stored",
        503: "The audit trail is not open yet (Retry-After)",
    }.items()
}


@router.post(
    "/v1/outcomes",
    response_model=OutcomeReceiptBody,
    responses=_RESPONSES,
    summary="Radiologists' final verdicts for scored films (FHIR, CSV, NDJSON or HL7 v2 ORU^R01)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"type": "string"}} for media in SOURCES},
        }
    },
)
async def submit_outcomes(request: Request, sender: str = Depends(require_outcome_key)) -> Any:
    """Store the verdicts of one submission beside the films' predictions, all or none.

    Each film is named by the service's request id (``item_index`` for a batch or STOW-RS film), its SOP Instance
    UID or its Study Instance UID (a study with one scored film). Each finding of a film gets one verdict, once:
    a duplicate or a contradiction is refused, as are unknown films, unknown codes and verdicts that are not final.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    source = SOURCES.get(media_type)
    if source is None:
        return problem_response(
            request,
            415,
            "Unsupported media type",
            f"Send verdicts as one of {', '.join(SOURCES)}; got {media_type[:100] or 'no Content-Type'}.",
        )
    trail = request.app.state.audit
    if not isinstance(trail, AuditTrail):
        raise NotReadyError("The audit trail is not open yet; retry shortly.", headers={"Retry-After": "5"})
    body = await request.body()
    rows, errors = await asyncio.to_thread(_parse, source, media_type, body, code_map(request))
    receipt = await asyncio.to_thread(
        store_outcomes,
        trail.store,
        rows,
        errors,
        source=source,
        submitted_by=sender,
        received_at=datetime.now(timezone.utc),
    )
    if not receipt.stored:
        return problem_response(
            request,
            422,
            "Verdicts refused",
            f"{len(receipt.errors)} row(s) refused; nothing was stored. Fix the rows named and send it again.",
            errors=[{"row": e.row, "code": e.code, "detail": e.detail} for e in receipt.errors],
        )
    if not rows:
        return problem_response(request, 422, "No verdicts", "The submission holds no verdict.", errors=[])
    monitor = getattr(request.app.state, "guarantee", None)
    if monitor is not None:
        monitor.poke()  # the watch sees the new verdicts now, not at its next period
    stored = OutcomeReceiptBody(films=receipt.films, verdicts=receipt.verdicts, corrected=receipt.corrected)
    return JSONResponse(stored.model_dump())
