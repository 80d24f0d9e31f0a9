"""The OpenAPI document as the service behaves: FastAPI's generated schema, post-processed once per app.

FastAPI derives the document from the route signatures. What it cannot see is added here, so that a client
generator or a fuzzer (Schemathesis, tests/reliability/test_schemathesis.py) can trust the document:

- security: ``X-API-Key`` or ``Authorization: Bearer`` on every operation that requires a key, read from the
  routes' own dependencies: the prediction keys when ``api_keys`` are configured (otherwise those routes are
  open and declare none), the admin keys on the audit API always;
- request bodies: required wherever a route reads one; a form's files (``file``, ``files``) required, typed as
  binary and bounded by ``max_files_per_request``; the STOW-RS ``multipart/related`` body, which the route reads
  raw and FastAPI therefore never sees;
- errors: every 4xx and 5xx leaves as ``application/problem+json`` (service.errors), FastAPI's validation 422
  included, which it would document as its own ``HTTPValidationError`` JSON; the statuses any request can meet
  (408 and 431 from the server's limits, 500) are documented on every operation;
- query parameters: a query says "null" by leaving the parameter out, so ``anyOf [X, null]`` becomes ``X``;
  ``cams`` lists the findings of the model being served (the document is cached once that model is loaded);
- links: a prediction's ``X-Request-ID`` leads to its audit records (``GET /v1/audit/{request_id}``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from service.api.problems import PROBLEM_JSON
from service.api.routes import PREDICT_PATHS, require_api_key
from service.api.routes.audit import require_admin_key
from service.api.routes.outcomes import require_outcome_key
from service.settings import Settings

__all__ = ["STOW_MEDIA_TYPE", "install_openapi", "service_openapi"]

Operation = tuple[str, str, dict[str, Any], set[Callable[..., Any]]]

#: The request body of STOW-RS (PS3.18 10.5); a client adds the boundary parameter.
STOW_MEDIA_TYPE = 'multipart/related; type="application/dicom"'
STOW_PATH = "/dicomweb/studies"
AUDIT_RECORDS_PATH = "/v1/audit/{request_id}"

_PROBLEM_REF = "#/components/schemas/Problem"
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_PREDICTION_SCHEMES: dict[str, dict[str, str]] = {
    "ApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "A prediction key (CXR_API_KEYS)",
    },
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "A prediction key as Authorization: Bearer"},
}
_ADMIN_SCHEMES: dict[str, dict[str, str]] = {
    "AdminApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An audit key (CXR_ADMIN_API_KEYS); a prediction key is refused with 403",
    },
    "AdminBearerKey": {"type": "http", "scheme": "bearer", "description": "An audit key as Authorization: Bearer"},
}
_OUTCOME_SCHEMES: dict[str, dict[str, str]] = {
    "OutcomeApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "A verdicts key (CXR_OUTCOME_API_KEYS); a prediction or audit key is refused with 403",
    },
    "OutcomeBearerKey": {"type": "http", "scheme": "bearer", "description": "A verdicts key as Authorization: Bearer"},
}
#: Statuses any request can meet, whatever its route.
_EVERY_OPERATION = {
    408: "The request's headers or body arrived too slowly (CXR_HEADER_TIMEOUT_S, CXR_BODY_TIMEOUT_S, "
    "CXR_BODY_MIN_RATE_BYTES_S); the connection is closed",
    431: "Request headers too large or too many (CXR_MAX_HEADER_BYTES, CXR_MAX_HEADER_COUNT); the connection is closed",
    500: "Unexpected error; the request id identifies it in the logs",
}
_UNAUTHORIZED = "Missing or invalid API key"
_VALIDATION_ERROR = "Invalid parameters or body"
_STOW_BODY = {
    "required": True,
    "description": "STOW-RS (PS3.18 10.5): a multipart/related body with one DICOM Part 10 file per part, sent "
    f"as Content-Type: {STOW_MEDIA_TYPE}; boundary=<the boundary>. Each instance is scored on its own (the "
    "answer's Referenced and Failed SOP Sequences).",
    "content": {STOW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`service_openapi` as ``/openapi.json``: built on first request, cached once the model is loaded
    (the ``cams`` parameter names its findings)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        loaded = app.state.service.loaded
        labels = tuple(loaded.spec.trained_labels) if loaded is not None else None
        document = service_openapi(app, settings, trained_labels=labels)
        if labels is not None:
            app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def service_openapi(app: FastAPI, settings: Settings, *, trained_labels: Sequence[str] | None) -> dict[str, Any]:
    """FastAPI's document for ``app``, completed as the module docstring says."""
    app.openapi_schema = None
    document = copy.deepcopy(FastAPI.openapi(app))  # FastAPI's own, which it caches on the app: not kept
    app.openapi_schema = None
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    prediction_keys = bool(settings.api_keys)
    schemes: dict[str, dict[str, str]] = {**_ADMIN_SCHEMES, **_OUTCOME_SCHEMES}
    if prediction_keys:
        schemes = {**_PREDICTION_SCHEMES, **schemes}
    components["securitySchemes"] = schemes
    records_operation = document["paths"].get(AUDIT_RECORDS_PATH, {}).get("get", {}).get("operationId")

    for path, method, operation, calls in _operations(app, document):
        admin = require_admin_key in calls
        outcome = require_outcome_key in calls
        keyed = admin or outcome or (prediction_keys and require_api_key in calls)
        if keyed:
            names = _ADMIN_SCHEMES if admin else _OUTCOME_SCHEMES if outcome else _PREDICTION_SCHEMES
            operation["security"] = [{name: []} for name in names]
        if path == STOW_PATH and method == "post":
            operation["requestBody"] = copy.deepcopy(_STOW_BODY)
        if "requestBody" in operation:
            operation["requestBody"]["required"] = True
            _require_files(operation["requestBody"], schemas, settings.max_files_per_request)
        for parameter in operation.get("parameters", []):
            _drop_null(parameter["schema"])
            if parameter["name"] == "cams" and parameter["in"] == "query" and trained_labels:
                parameter["schema"]["pattern"] = _cams_pattern(trained_labels)
        _document_errors(operation["responses"], keyed=keyed)
        if path in PREDICT_PATHS and records_operation is not None:
            _link_audit_records(operation["responses"], records_operation)

    unused = {name: schemas.pop(name) for name in _VALIDATION_SCHEMAS if name in schemas}
    if any(f"#/components/schemas/{name}" in json.dumps(document) for name in unused):
        schemas.update(unused)  # still referenced (a route documents FastAPI's body itself): kept
    return document


def _operations(app: FastAPI, document: dict[str, Any]) -> Iterator[Operation]:
    """Each documented operation with the functions its route depends on (its key checks among them)."""
    paths = document.get("paths", {})
    for context in iter_route_contexts(app.routes):  # routes of included routers too
        route = context.original_route
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        path = context.path_format or route.path_format
        calls: set[Callable[..., Any]] = set()
        pending = [route.dependant]
        while pending:
            dependant = pending.pop()
            if dependant.call is not None:
                calls.add(dependant.call)
            pending.extend(dependant.dependencies)
        for method in sorted(route.methods or ()):
            operation = paths.get(path, {}).get(method.lower())
            if operation is not None:
                yield path, method.lower(), operation, calls


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"$ref": _PROBLEM_REF}}}}


def _is_problem(response: dict[str, Any]) -> bool:
    """Whether a documented error is a problem (FastAPI's rendering of one, or its validation body): the others
    (``/readyz``'s Readiness, STOW-RS's DICOM JSON) are sent as documented."""
    content = response.get("content") or {}
    refs = json.dumps(content)
    return not content or PROBLEM_JSON in content or _PROBLEM_REF in refs or "/HTTPValidationError" in refs


def _document_errors(responses: dict[str, Any], *, keyed: bool) -> None:
    for status, response in list(responses.items()):
        if not status.isdigit() or int(status) < 400 or not _is_problem(response):
            continue
        if status == "401" and not keyed:
            del responses[status]  # an open route never answers 401
            continue
        validation = "/HTTPValidationError" in json.dumps(response.get("content") or {})
        responses[status] = _problem(_VALIDATION_ERROR if validation else response.get("description", ""))
    if keyed:
        responses.setdefault("401", _problem(_UNAUTHORIZED))
    for code, description in _EVERY_OPERATION.items():
        responses.setdefault(str(code), _problem(description))


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        resolved: dict[str, Any] = schemas[ref.rsplit("/", 1)[1]]
        return resolved
    return schema


def _drop_null(schema: dict[str, Any]) -> None:
    """``anyOf [X, {type: null}]`` -> ``X``, in place (keeping the title and description)."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return
    (kept,) = [option for option in options if option != {"type": "null"}]
    del schema["anyOf"]
    if schema.get("default", ...) is None:
        del schema["default"]
    schema.update(kept)


def _is_binary(schema: dict[str, Any]) -> bool:
    return schema.get("contentMediaType") == "application/octet-stream" or schema.get("format") == "binary"


def _require_files(body: dict[str, Any], schemas: dict[str, Any], max_files: int) -> None:
    """In a multipart form: file fields required and typed ``format: binary``; a list of files 1 to max_files."""
    form = body.get("content", {}).get("multipart/form-data")
    if form is None:
        return
    schema = _resolve(form["schema"], schemas)
    required: list[str] = schema.setdefault("required", [])
    for name, prop in schema.get("properties", {}).items():
        _drop_null(prop)
        item = prop.get("items", {}) if prop.get("type") == "array" else prop
        if not _is_binary(item):
            continue
        item["format"] = "binary"  # what OpenAPI 3.0 tools and fuzzers read as a file
        if prop is not item:
            prop["minItems"], prop["maxItems"] = 1, max_files
        if name not in required:
            required.append(name)


def _cams_pattern(labels: Sequence[str]) -> str:
    """Exactly what ``cams`` accepts (service.runtime.heatmaps.parse_cams): auto, all, none or nothing, in any case, or
    trained findings separated by commas; spaces around each are ignored."""
    names = "|".join(re.sub(r"([\\^$.|?*+()\[\]{}/])", r"\\\1", label) for label in labels)
    keyword = "[Aa][Uu][Tt][Oo]|[Aa][Ll][Ll]|[Nn][Oo][Nn][Ee]"
    return rf"^\s*(?:{keyword})?\s*$|^\s*(?:{names})\s*(?:,\s*(?:{names})\s*)*$"


def _link_audit_records(responses: dict[str, Any], records_operation: str) -> None:
    """On each 2xx: the request's X-Request-ID, and the link to its audit records."""
    for status, response in responses.items():
        if not (status.isdigit() and 200 <= int(status) < 300):
            continue
        response.setdefault("headers", {})["X-Request-ID"] = {
            "description": "The request's id: the audit trail and the logs know the request by it",
            "schema": {"type": "string"},
        }
        response.setdefault("links", {})["AuditRecords"] = {
            "operationId": records_operation,
            "parameters": {"request_id": "$response.header.X-Request-ID"},
            "description": "The audit records of this request (an admin key)",
        }
