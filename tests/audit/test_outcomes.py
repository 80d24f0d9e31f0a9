"""Radiologists' verdicts in (``POST /v1/outcomes``), on a real server, against SQLite and a real PostgreSQL: CSV,
NDJSON, a FHIR DiagnosticReport validated by fhir.resources and an HL7 v2 ORU^R01 built by hl7apy, each matched to
the film it judges (request id, SOP or Study Instance UID); refused rows named, nothing half-written; keys kept
apart; no UID stored."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import text

from service.api.routes.outcomes import HL7_V2
from service.audit import AuditStore
from service.codes import finding_code
from service.fhir import FINDING_SYSTEM
from tests.service.live import LiveServer, live_server, tiny_settings, wait_until
from tests.service.test_api import dicom_with_identifiers, png_bytes

KEY, ADMIN, OUTCOME = "predict-key-0123456789", "admin-key-0123456789", "outcome-key-0123456789"


@pytest.fixture
def live(tiny_service_checkpoint: Path, audit_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        tiny_service_checkpoint,
        audit={"url": audit_url, "spool_dir": tmp_path / "spool"},
        api_keys=[KEY],
        admin_api_keys=[ADMIN],
        outcome_api_keys=[OUTCOME],
    )
    with live_server(settings) as server:
        yield server


def _predict(client: httpx.Client, data: bytes, request_id: str) -> list[str]:
    """Score ``data``; the labels its audit record holds a prediction for."""
    headers = {"X-API-Key": KEY, "X-Request-ID": request_id}
    response = client.post("/v1/predict", files={"file": ("x", data)}, params={"cams": "none"}, headers=headers)
    assert response.status_code == 200, response.text
    (record,) = client.get(f"/v1/audit/{request_id}", headers={"X-API-Key": ADMIN}).json()["items"]
    return sorted(record["findings"])


def _send(client: httpx.Client, body: str | dict[str, Any], media_type: str, key: str = OUTCOME) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, dict) else body
    return client.post("/v1/outcomes", content=content, headers={"Content-Type": media_type, "X-API-Key": key})


def _stored(live: LiveServer) -> list[tuple[str, str, bool, str]]:
    store = AuditStore.open(live.state.settings.audit.url, migrate_schema=False)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT e.request_id, o.label, o.present, o.source FROM audit_outcomes o "
                    "JOIN audit_events e ON e.id = o.event_pk ORDER BY e.request_id, o.label"
                )
            ).all()
        return [(r[0], r[1], bool(r[2]), r[3]) for r in rows]
    finally:
        store.close()


def _report(study_uid: str, sop_uid: str, verdicts: dict[str, bool], status: str = "final") -> dict[str, Any]:
    """A radiologist's report (``status``: final, amended, ...) as FHIR R4: the study (and its one instance) as a
    contained ImagingStudy, one coded Observation per finding, present or absent in SNOMED CT."""
    present = {"system": "http://snomed.info/sct", "code": "52101004", "display": "Present"}
    absent = {"system": "http://snomed.info/sct", "code": "2667000", "display": "Absent"}
    observations = [
        {
            "resourceType": "Observation",
            "id": f"obs{i}",
            "status": "final",
            "code": {"coding": [{"system": FINDING_SYSTEM, "code": finding_code(label), "display": label}]},
            "valueCodeableConcept": {"coding": [present if is_present else absent]},
        }
        for i, (label, is_present) in enumerate(verdicts.items())
    ]
    report = {
        "resourceType": "DiagnosticReport",
        "id": f"{status}-report-1",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4"}]},
        "issued": "2026-12-07T10:30:00Z",
        "contained": [
            {
                "resourceType": "ImagingStudy",
                "id": "study",
                "status": "available",
                "subject": {"display": "the patient"},
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                "series": [
                    {
                        "uid": "1.2.3.4.5",
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"},
                        "instance": [
                            {"uid": sop_uid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2"}}
                        ],
                    }
                ],
            },
            *observations,
        ],
        "imagingStudy": [{"reference": "#study"}],
        "result": [{"reference": f"#obs{i}"} for i in range(len(observations))],
    }
    DiagnosticReport.model_validate(report)  # the real FHIR validator agrees it is a DiagnosticReport
    return report


def _oru(study_uid: str, verdicts: dict[str, bool], status: str = "F") -> str:
    """An ORU^R01 built with hl7apy: the study in ZDS-1 (IHE Radiology), one OBX per finding, result status
    ``status`` (F final, C corrected)."""
    from hl7apy.core import Message, Segment

    message = Message("ORU_R01", version="2.5")
    message.msh.msh_3 = "RIS"
    message.msh.msh_7 = "20261207103000"
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = "MSG-0001"
    message.msh.msh_11 = "P"
    message.add_segment("PID")
    message.pid.pid_3 = "anonymous"
    message.add_segment("OBR")
    message.obr.obr_4 = "36554-4^XR Chest Single view^LN"
    message.obr.obr_25 = status
    for i, (label, present) in enumerate(verdicts.items(), start=1):
        obx = message.add_segment("OBX")
        obx.obx_1 = str(i)
        obx.obx_2 = "CE"
        obx.obx_3 = f"{finding_code(label)}^{label}^{FINDING_SYSTEM}"
        obx.obx_5 = "52101004^Present^SCT" if present else "2667000^Absent^SCT"
        obx.obx_11 = status
    zds = Segment("ZDS", version="2.5")
    zds.zds_1 = f"{study_uid}^^Application^DICOM"
    message.add(zds)
    return str(message.to_er7()).replace("\r", "\r\n")


def test_verdicts_in_every_form_reach_their_films_and_refused_rows_store_nothing(live: LiveServer) -> None:
    dicom = dicom_with_identifiers()
    header = pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True)
    with live.client() as client:
        labels = _predict(client, png_bytes(seed=0), "film-png")
        assert _predict(client, dicom, "film-dicom") == labels
        first, second, third = labels[:3]

        # CSV by request id: two findings of one film.
        csv = f"request_id,finding,verdict\nfilm-png,{first},present\nfilm-png,{second},absent\n"
        answer = _send(client, csv, "text/csv")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"films": 1, "verdicts": 2, "corrected": 0}

        # The same again, and a contradiction, and an unknown film beside a good row: all refused, nothing stored.
        again = _send(client, csv, "text/csv")
        assert again.status_code == 422 and {e["code"] for e in again.json()["errors"]} == {"duplicate"}
        contra = _send(client, f"request_id,finding,verdict\nfilm-png,{first},absent\n", "text/csv")
        assert [e["code"] for e in contra.json()["errors"]] == ["contradicts"]
        rows = [("film-png", "present"), ("no-such-film", "absent")]
        mixed = "".join(json.dumps({"request_id": f, "finding": third, "verdict": v}) + "\n" for f, v in rows)
        refused = _send(client, mixed, "application/x-ndjson")
        assert refused.status_code == 422 and refused.headers["content-type"].startswith("application/problem+json")
        assert [(e["row"], e["code"]) for e in refused.json()["errors"]] == [(2, "unknown_film")]
        assert [r[1] for r in _stored(live)] == sorted([first, second])  # the good NDJSON row was not half-written

        # FHIR by the DICOM film's Study/SOP Instance UID; HL7 v2 by its Study Instance UID (the study's one film).
        report = _report(str(header.StudyInstanceUID), str(header.SOPInstanceUID), {first: True})
        answer = _send(client, report, "application/fhir+json")
        assert answer.status_code == 200, answer.text
        answer = _send(client, _oru(str(header.StudyInstanceUID), {second: False, third: True}), HL7_V2)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"films": 1, "verdicts": 2, "corrected": 0}

        # Keys: verdicts need an outcome key; the prediction and admin keys are refused.
        assert _send(client, csv, "text/csv", key="").status_code == 401
        assert _send(client, csv, "text/csv", key=KEY).status_code == 403
        assert _send(client, csv, "text/csv", key=ADMIN).status_code == 403
        assert _send(client, csv, "text/plain").status_code == 415

    assert _stored(live) == [
        ("film-dicom", first, True, "fhir"),
        ("film-dicom", second, False, "hl7"),
        ("film-dicom", third, True, "hl7"),
        ("film-png", first, True, "csv"),
        ("film-png", second, False, "csv"),
    ]
    store = AuditStore.open(live.state.settings.audit.url, migrate_schema=False)
    try:
        with store.engine.connect() as connection:
            tables = ("audit_events", "audit_outcomes")
            dump = " ".join(str(row) for t in tables for row in connection.execute(text(f"SELECT * FROM {t}")))
    finally:
        store.close()
    assert str(header.StudyInstanceUID) not in dump and str(header.SOPInstanceUID) not in dump


def _corrections(live: LiveServer) -> list[tuple[str, str, bool, bool, str]]:
    """(request id, label, previous verdict, corrected verdict, source) of every correction in the trail."""
    store = AuditStore.open(live.state.settings.audit.url, migrate_schema=False)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT e.request_id, o.label, c.previous_present, c.present, c.source "
                    "FROM audit_outcome_corrections c JOIN audit_outcomes o ON o.id = c.outcome_pk "
                    "JOIN audit_events e ON e.id = o.event_pk ORDER BY c.id"
                )
            ).all()
        return [(r[0], r[1], bool(r[2]), bool(r[3]), r[4]) for r in rows]
    finally:
        store.close()


def test_a_corrected_verdict_replaces_the_stored_one_in_every_form_and_the_trail_keeps_the_old(
    live: LiveServer,
) -> None:
    dicom = dicom_with_identifiers()
    header = pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True)
    study, sop = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    with live.client() as client:
        labels = _predict(client, png_bytes(seed=1), "film-png")
        _predict(client, dicom, "film-dicom")
        first, second, third = labels[:3]
        csv = f"request_id,finding,verdict\nfilm-png,{first},present\nfilm-png,{second},absent\n"
        assert _send(client, csv, "text/csv").status_code == 200
        report = _report(study, sop, {first: False, second: True})
        assert _send(client, report, "application/fhir+json").status_code == 200

        # A different verdict that is not marked as a correction is refused, and says how to send a correction.
        refused = _send(client, f"request_id,finding,verdict\nfilm-png,{first},absent\n", "text/csv")
        (error,) = refused.json()["errors"]
        assert error["code"] == "contradicts" and "status corrected" in error["detail"]

        # CSV: status corrected replaces one verdict; the other line agrees with what is stored and changes nothing;
        # a line for a finding without a verdict is stored as its first.
        lines = f"film-png,{first},absent,corrected\nfilm-png,{second},absent,corrected\nfilm-png,{third},present,"
        answer = _send(client, "request_id,finding,verdict,status\n" + lines + "\n", "text/csv")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"films": 1, "verdicts": 2, "corrected": 1}
        bad = _send(client, f"request_id,finding,verdict,status\nfilm-png,{first},absent,preliminary\n", "text/csv")
        assert [e["code"] for e in bad.json()["errors"]] == ["bad_value"]

        # FHIR: an amended report; HL7 v2: result status C.
        amended = _report(study, sop, {first: True}, status="amended")
        assert _send(client, amended, "application/fhir+json").json() == {"films": 1, "verdicts": 1, "corrected": 1}
        corrected = _send(client, _oru(study, {second: False}, status="C"), HL7_V2)
        assert corrected.json() == {"films": 1, "verdicts": 1, "corrected": 1}

    assert _stored(live) == [
        ("film-dicom", first, True, "fhir"),
        ("film-dicom", second, False, "hl7"),
        ("film-png", first, False, "csv"),
        ("film-png", second, False, "csv"),
        ("film-png", third, True, "csv"),
    ]
    assert _corrections(live) == [
        ("film-png", first, True, False, "csv"),
        ("film-dicom", first, False, True, "fhir"),
        ("film-dicom", second, True, False, "hl7"),
    ]


def test_verdicts_move_the_live_watch_in_the_model_card_and_metrics(tmp_path: Path) -> None:
    """The shipped demo model has a referral rule: its promise is watched live. Verdicts that arrive show up in
    GET /v1/model's ``guarantee`` and in /metrics at once (the route pokes the watch)."""
    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    settings = tiny_settings(
        demo, api_keys=[KEY], admin_api_keys=[ADMIN], outcome_api_keys=[OUTCOME], guarantee={"refresh_s": 3600}
    )
    with live_server(settings) as server, server.client() as client:
        labels = _predict(client, png_bytes(seed=1), "watched-0")
        _predict(client, png_bytes(seed=2), "watched-1")
        card = client.get("/v1/model", headers={"X-API-Key": KEY}).json()
        assert card["guarantee"]["findings"][labels[0]]["judged_films"] == 0  # computed at start-up: no verdicts
        csv = "request_id,finding,verdict\n" + "".join(f"watched-{i},{labels[0]},present\n" for i in range(2))
        assert _send(client, csv, "text/csv").status_code == 200

        def judged() -> int:
            body = client.get("/v1/model", headers={"X-API-Key": KEY}).json()["guarantee"]
            return int(body["findings"][labels[0]]["judged_films"])

        wait_until(lambda: judged() == 2, timeout_s=30)
        status = client.get("/v1/model", headers={"X-API-Key": KEY}).json()["guarantee"]
        promise = status["findings"][labels[0]]
        assert status["films"] == 2 and status["cleared"] == 0  # the demo's rule can clear nothing (the page says so)
        assert promise["limit"] == card["referral"]["alpha"] and 0 <= promise["lower"] <= promise["upper"] <= 1
        assert promise["broken"] is False and status["broken"] == []
        metrics = client.get("/metrics").text
        assert f'cxr_guarantee_judged_films{{promise="{labels[0]}"}} 2.0' in metrics
        assert "cxr_guarantee_outcome_coverage" in metrics
