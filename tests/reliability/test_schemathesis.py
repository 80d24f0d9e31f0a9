"""Schemathesis against the live ``/openapi.json``: no 5xx, and every response matches what the schema says.

Each operation gets positive examples (schema-valid: random bytes as files, in-range parameters) and
negative ones (wrong types, missing fields, out-of-range values) from a derandomized, database-less
Hypothesis profile, bounded so the whole run takes seconds. Found and fixed this way: the framework's
400 for a malformed multipart body was not in the schema (now documented on every upload route).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.live import LiveServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 20

PROFILE = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, fast
    suppress_health_check=list(HealthCheck),
)


def _has_inputs(operation: Any) -> bool:
    """Negative data needs something to break: parameters or a body."""
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def test_every_operation_answers_within_its_schema(hostile_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{hostile_server.url}/openapi.json")
    failures: list[str] = []
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _has_inputs(operation) else [])
        for mode in modes:
            tested.append(f"{operation.method.upper()} {operation.path} {mode.value}")

            @PROFILE
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=hostile_server.url, checks=CHECKS, timeout=30)

            try:
                run()
            except FailureGroup as group:  # one entry per distinct failure
                failures.append(f"{tested[-1]}: {group}")
    assert any(name.startswith("POST /v1/predict ") for name in tested), tested
    assert not failures, "\n\n".join(failures)


def test_the_checks_catch_an_undocumented_status(hostile_server: LiveServer) -> None:
    """The checks are live: a response whose status the operation does not document fails them."""
    schema = schemathesis.openapi.from_url(f"{hostile_server.url}/openapi.json")
    operation = schema["/healthz"]["GET"]
    case = operation.Case()
    response = case.call(base_url=hostile_server.url)
    response.status_code = 418  # the schema documents 200 only
    with pytest.raises(FailureGroup):
        case.validate_response(response, checks=[status_code_conformance])


def test_upload_routes_document_the_malformed_multipart_400(hostile_server: LiveServer) -> None:
    """Regression (found by the run above): the framework's 400 for a broken multipart body was undocumented."""
    paths = httpx.get(f"{hostile_server.url}/openapi.json").json()["paths"]
    uploads = [path for path, item in paths.items() if "multipart/form-data" in json.dumps(item.get("post", {}))]
    assert {"/v1/predict", "/predict", "/v1/predict/batch", "/v1/preview"} <= set(uploads)
    for path in uploads:
        assert "400" in paths[path]["post"]["responses"], path
