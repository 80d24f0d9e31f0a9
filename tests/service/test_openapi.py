"""The OpenAPI document says what the service does (service/api/openapi.py): security, bodies, problems, links, and
the audit API's strict date-times. Document tests build the app without its lifespan (no model); the behaviour
tests run against a live server with prediction and admin keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bayesnet import ModelSpec
from service.api.app import create_app
from service.api.openapi import STOW_MEDIA_TYPE, service_openapi
from service.api.problems import PROBLEM_JSON
from service.api.routes import PREDICT_PATHS
from service.api.routes.audit import instant
from service.runtime.heatmaps import CamSelectionError, parse_cams
from service.settings import Settings
from tests.service.live import LiveServer, live_server, tiny_settings
from tests.service.test_api import png_bytes

PREDICTION_KEY = "openapi-prediction-key"
ADMIN_KEY = "openapi-admin-key"
PREDICTION_OPERATIONS = {
    ("post", "/v1/predict"),
    ("post", "/predict"),
    ("post", "/v1/predict/batch"),
    ("post", "/v1/preview"),
    ("post", "/dicomweb/studies"),
    ("get", "/v1/model"),
}
AUDIT_OPERATIONS = {
    ("get", "/v1/audit"),
    ("get", "/v1/audit/{request_id}"),
    ("get", "/v1/guarantee"),
    ("post", "/v1/guarantee"),
}
LABELS = ("Atelectasis", "Pleural Effusion", "No Finding")
#: Errors sent with another body than a problem, as documented: the readiness report and STOW-RS's DICOM JSON.
NOT_PROBLEMS = {("get", "/readyz", "503"), ("post", "/dicomweb/studies", "409")}


def _document(**settings: Any) -> dict[str, Any]:
    app: FastAPI = create_app(Settings(**settings))
    return service_openapi(app, app.state.service.settings, trained_labels=LABELS)


@pytest.fixture(scope="module")
def keyed() -> dict[str, Any]:
    return _document(api_keys=[PREDICTION_KEY], admin_api_keys=[ADMIN_KEY], max_files_per_request=7)


@pytest.fixture(scope="module")
def open_document() -> dict[str, Any]:
    return _document()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_keyed_operations_declare_their_keys(keyed: dict[str, Any]) -> None:
    schemes = keyed["components"]["securitySchemes"]
    for name in ("ApiKey", "AdminApiKey"):
        assert schemes[name] | {"description": ""} == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "",
        }
    for name in ("BearerKey", "AdminBearerKey"):
        assert (schemes[name]["type"], schemes[name]["scheme"]) == ("http", "bearer")
    secured = {}
    for method, path, operation in _operations(keyed):
        if "security" in operation:
            secured[(method, path)] = operation["security"]
            assert "401" in operation["responses"], (method, path)
    assert secured == {
        **{operation: [{"ApiKey": []}, {"BearerKey": []}] for operation in PREDICTION_OPERATIONS},
        **{operation: [{"AdminApiKey": []}, {"AdminBearerKey": []}] for operation in AUDIT_OPERATIONS},
        ("post", "/v1/outcomes"): [{"OutcomeApiKey": []}, {"OutcomeBearerKey": []}],
    }


def test_without_prediction_keys_the_prediction_routes_are_open(open_document: dict[str, Any]) -> None:
    assert set(open_document["components"]["securitySchemes"]) == {
        "AdminApiKey",
        "AdminBearerKey",
        "OutcomeApiKey",
        "OutcomeBearerKey",
    }
    for method, path, operation in _operations(open_document):
        if (method, path) in AUDIT_OPERATIONS:  # the audit API refuses everyone until admin keys are configured
            assert operation["security"] == [{"AdminApiKey": []}, {"AdminBearerKey": []}]
        elif (method, path) == ("post", "/v1/outcomes"):  # so does the verdicts route until its keys are
            assert operation["security"] == [{"OutcomeApiKey": []}, {"OutcomeBearerKey": []}]
        else:
            assert "security" not in operation and "401" not in operation["responses"], (method, path)


@pytest.mark.parametrize("name", ["keyed", "open_document"])
def test_every_error_is_documented_as_the_problem_it_is(name: str, request: pytest.FixtureRequest) -> None:
    document = request.getfixturevalue(name)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "ValidationError" not in document["components"]["schemas"]
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        assert {"408", "431", "500"} <= set(responses), (method, path)
        for status, response in responses.items():
            if int(status) >= 400 and (method, path, status) not in NOT_PROBLEMS:
                assert response["content"] == problem, (method, path, status)
        if operation.get("parameters") or "requestBody" in operation:
            assert responses["422"]["content"] == problem, (method, path)
    assert "application/json" in document["paths"]["/readyz"]["get"]["responses"]["503"]["content"]


def test_request_bodies_and_their_files_are_required(keyed: dict[str, Any]) -> None:
    schemas = keyed["components"]["schemas"]
    posts = {path: item["post"] for path, item in keyed["paths"].items() if "post" in item}
    assert set(posts) == {
        "/v1/predict",
        "/predict",
        "/v1/predict/batch",
        "/v1/preview",
        "/dicomweb/studies",
        "/v1/outcomes",
        "/v1/guarantee",
    }
    for path, operation in posts.items():
        assert operation["requestBody"]["required"] is True, path

    def form(path: str) -> dict[str, Any]:
        return schemas[posts[path]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]]

    for path in ("/v1/predict", "/predict", "/v1/preview"):
        single = form(path)
        assert single["required"] == ["file"], path
        assert single["properties"]["file"]["type"] == "string" and single["properties"]["file"]["format"] == "binary"
        assert "anyOf" not in single["properties"]["file"], path
        raw = posts[path]["requestBody"]["content"]
        assert {"image/png", "image/jpeg", "application/dicom", "application/octet-stream"} <= set(raw), path
    batch = form("/v1/predict/batch")
    files = batch["properties"]["files"]
    assert batch["required"] == ["files"] and (files["minItems"], files["maxItems"]) == (1, 7)
    assert files["items"]["format"] == "binary"


def test_the_outcomes_body_names_its_four_forms(keyed: dict[str, Any]) -> None:
    body = keyed["paths"]["/v1/outcomes"]["post"]["requestBody"]
    assert set(body["content"]) == {
        "application/fhir+json",
        "application/json",
        "text/csv",
        "application/x-ndjson",
        "x-application/hl7-v2+er7",
    }


def test_the_stow_rs_body_is_documented(keyed: dict[str, Any]) -> None:
    body = keyed["paths"]["/dicomweb/studies"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {STOW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}
    assert "boundary" in body["description"]


def test_predictions_link_to_their_audit_records(keyed: dict[str, Any]) -> None:
    records = keyed["paths"]["/v1/audit/{request_id}"]["get"]["operationId"]
    for path in PREDICT_PATHS:
        for status, response in keyed["paths"][path]["post"]["responses"].items():
            if status.startswith("2"):
                assert response["links"]["AuditRecords"]["operationId"] == records, (path, status)
                assert response["links"]["AuditRecords"]["parameters"] == {
                    "request_id": "$response.header.X-Request-ID"
                }
                assert "X-Request-ID" in response["headers"]
    assert "links" not in keyed["paths"]["/v1/preview"]["post"]["responses"]["200"]  # previews are not audited


def test_query_parameters_are_never_null_and_audit_times_are_date_times(keyed: dict[str, Any]) -> None:
    for method, path, operation in _operations(keyed):
        for parameter in operation.get("parameters", []):
            assert "anyOf" not in parameter["schema"], (method, path, parameter["name"])
    audit = {parameter["name"]: parameter["schema"] for parameter in keyed["paths"]["/v1/audit"]["get"]["parameters"]}
    for name in ("since", "until"):
        assert (audit[name]["type"], audit[name]["format"]) == ("string", "date-time")
    assert re.fullmatch(audit["cursor"]["pattern"], "123") and not re.search(audit["cursor"]["pattern"], "1e3")


CAMS = ["auto", "AUTO", " All ", "none", "", "  ", "Atelectasis", "Atelectasis, No Finding", " Pleural Effusion "]
CAMS += ["atelectasis", "Atelectasis,", ",Atelectasis", "auto,Atelectasis", "Edema", "Pleural  Effusion", "allx"]


@pytest.mark.parametrize("value", CAMS)
def test_the_cams_pattern_accepts_exactly_what_the_service_does(keyed: dict[str, Any], value: str) -> None:
    parameters = keyed["paths"]["/v1/predict"]["post"]["parameters"]
    pattern = next(parameter["schema"]["pattern"] for parameter in parameters if parameter["name"] == "cams")
    spec = ModelSpec(arch="test_efficientnet", trained_labels=LABELS)
    try:
        parse_cams(value, spec)
        accepted = True
    except CamSelectionError:
        accepted = False
    assert (re.search(pattern, value) is not None) == accepted


VALID_TIMES = {
    "2026-01-31T08:00:00Z": datetime(2026, 1, 31, 8, tzinfo=timezone.utc),
    "2026-01-31t09:30:00.5+01:30": datetime(2026, 1, 31, 8, 0, 0, 500_000, tzinfo=timezone.utc),
    "2026-01-31T08:00:00.123456789-00:00": datetime(2026, 1, 31, 8, 0, 0, 123_456, tzinfo=timezone.utc),
    "2016-12-31T23:59:60Z": datetime(2016, 12, 31, 23, 59, 59, tzinfo=timezone.utc),  # a leap second
    "0000-01-01T00:00:00Z": datetime.min.replace(tzinfo=timezone.utc),  # before datetime's range: clamped
    "0001-01-01T00:00:00+01:00": datetime.min.replace(tzinfo=timezone.utc),
    "9999-12-31T23:59:59-01:00": datetime.max.replace(tzinfo=timezone.utc),
}


@pytest.mark.parametrize(("text", "expected"), VALID_TIMES.items())
def test_iso_date_times_with_an_offset_are_read_as_utc(text: str, expected: datetime) -> None:
    assert instant(text) == expected


REFUSED_TIMES = ["0.5", "1700000000", "2026-01-31T08:00:00", "2026-01-31", "2026-01-31 08:00:00Z"]
REFUSED_TIMES += ["2026-02-30T08:00:00Z", "2026-01-31T24:00:00Z", "2026-01-31T08:00:00+24:00", "٢٠٢٦-01-31T08:00:00Z"]


@pytest.mark.parametrize("text", REFUSED_TIMES)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601|not a valid date"):
        instant(text)


@pytest.fixture(scope="module")
def keyed_server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(tiny_service_checkpoint, api_keys=[PREDICTION_KEY], admin_api_keys=[ADMIN_KEY])
    with live_server(settings) as live:
        yield live


def test_the_served_document_names_the_served_models_findings(keyed_server: LiveServer) -> None:
    with keyed_server.client() as client:
        document = client.get("/openapi.json").json()
        assert client.get("/openapi.json").json() == document  # cached
    parameters = document["paths"]["/v1/predict"]["post"]["parameters"]
    pattern = next(parameter["schema"]["pattern"] for parameter in parameters if parameter["name"] == "cams")
    assert re.search(pattern, "Edema") and not re.search(pattern, "Fracture")  # the tiny model's untrained finding
    assert document["paths"]["/v1/model"]["get"]["security"] == [{"ApiKey": []}, {"BearerKey": []}]


def _audit(client: httpx.Client, **params: str) -> httpx.Response:
    return client.get("/v1/audit", params=params, headers={"X-API-Key": ADMIN_KEY})


def test_audit_times_must_be_iso_date_times_with_an_offset(keyed_server: LiveServer) -> None:
    with keyed_server.client() as client:
        upload = {"file": ("x.png", png_bytes())}
        answer = client.post("/v1/predict", files=upload, headers={"X-API-Key": PREDICTION_KEY})
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["X-Request-ID"]
        for bad in ("0.5", "2026-01-31T08:00:00", "yesterday"):
            refused = _audit(client, until=bad)
            assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM_JSON, bad
            assert "ISO 8601" in refused.json()["detail"], bad
        an_hour_ago = datetime.now(timezone(timedelta(hours=5))) - timedelta(hours=1)  # written in UTC+05:00
        since = [item["request_id"] for item in _audit(client, since=an_hour_ago.isoformat()).json()["items"]]
        until = [item["request_id"] for item in _audit(client, until=an_hour_ago.isoformat()).json()["items"]]
        assert request_id in since and request_id not in until
        assert _audit(client, cursor="12abc").status_code == 422
