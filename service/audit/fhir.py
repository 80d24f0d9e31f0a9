"""Audit records as FHIR R4 ``AuditEvent`` resources (the IHE BALP shape, simplified), for SIEMs and ATNA
repositories that speak FHIR. One AuditEvent per record; a page of them as a ``searchset`` Bundle."""

from __future__ import annotations

import base64
from typing import Any

from service.schemas import AuditRecord

_EVENT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
_SUBTYPE = {"system": "http://hl7.org/fhir/restful-interaction", "code": "operation", "display": "operation"}
_SOURCE_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
    "code": "4",
    "display": "Application Server",
}
_REQUEST_ID_SYSTEM = "urn:bayesnet-cxr:request-id"
_CLIENT_ID_SYSTEM = "urn:bayesnet-cxr:client-id"


def _outcome(status: int) -> str:
    """R4 AuditEvent.outcome: 0 success, 4 minor failure (the request was refused), 8 serious (server side)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def audit_event(record: AuditRecord) -> dict[str, Any]:
    """One record as an R4 AuditEvent. The whole record travels base64-encoded in ``entity.detail`` (type
    ``audit-record``) so that nothing is lost; the findings are outputs, never patient data."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": record.event_id,
        "type": _EVENT_TYPE,
        "subtype": [_SUBTYPE],
        "action": "E",
        "recorded": record.occurred_at.isoformat(),
        "outcome": _outcome(record.status),
        "agent": [
            {
                "type": {"text": "API client"},
                "who": {"identifier": {"system": _CLIENT_ID_SYSTEM, "value": record.client_id or "anonymous"}},
                "requestor": True,
            },
            {
                "type": {"text": "AI model"},
                "who": {"display": f"{record.model.name} {record.model.version} (sha256 {record.model.sha256})"},
                "requestor": False,
            },
        ],
        "source": {"observer": {"display": "bayesnet-cxr"}, "type": [_SOURCE_TYPE]},
        "entity": [
            {
                "what": {"identifier": {"system": _REQUEST_ID_SYSTEM, "value": record.request_id}},
                "description": f"{record.route} input sha256 {record.input_sha256}",
                "detail": [
                    {
                        "type": "audit-record",
                        "valueBase64Binary": base64.b64encode(record.model_dump_json().encode()).decode(),
                    }
                ],
            }
        ],
    }
    if record.error is not None:
        event["outcomeDesc"] = f"{record.status} {record.error}"
    return event


def audit_bundle(records: list[AuditRecord], *, next_url: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(records),
        "entry": [{"resource": audit_event(record)} for record in records],
    }
    if next_url is not None:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle
