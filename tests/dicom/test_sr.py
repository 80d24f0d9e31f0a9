"""``POST /v1/predict`` with ``Accept: application/dicom``: one DICOM SR (TID 1500) per DICOM upload."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import UID

from service.dicom import read_sr_findings
from service.dicom.sr import MANUFACTURER
from tests.dicom.conftest import ADMIN_KEY
from tests.dicom.dicom_files import (
    OPERATOR,
    PATIENT_ID,
    PATIENT_NAME,
    SHARED_SIIM,
    audit_records,
    chest_cr,
    dciodvfy_errors,
)
from tests.service.live import LiveServer
from tests.service.test_api import png_bytes

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def client(dicom_server: LiveServer) -> Iterator[httpx.Client]:
    with dicom_server.client() as c:
        yield c


def predict_sr(client: httpx.Client, data: bytes, accept: str = "application/dicom") -> httpx.Response:
    files = {"file": ("image.dcm", data, "application/octet-stream")}
    return client.post("/v1/predict", files=files, headers={"Accept": accept})


def test_a_dicom_upload_gets_a_valid_sr_in_its_study_with_the_findings_it_was_scored_with(
    client: httpx.Client, dicom_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upload = chest_cr()
    source = pydicom.dcmread(io.BytesIO(upload), stop_before_pixels=True)
    with caplog.at_level(logging.DEBUG):
        response = predict_sr(client, upload)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert dciodvfy_errors(response.content, tmp_path) == []

    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    # The patient and study modules come from the source, so a PACS files the SR with it; nothing else does.
    assert (str(sr.PatientName), sr.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert sr.AccessionNumber == source.AccessionNumber
    assert "OperatorsName" not in sr and OPERATOR.encode() not in response.content
    assert "InstitutionName" not in sr
    for record in caplog.records:
        message = record.getMessage()
        assert PATIENT_NAME not in message and PATIENT_ID not in message

    # The source image is the evidence.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    # The algorithm, in the Contributing Equipment Sequence (IHE AIR).
    card = client.get("/v1/model").json()
    (equipment,) = [item for item in sr.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.ManufacturerModelName == card["name"]
    assert list(equipment.SoftwareVersions) == [card["version"], card["sha256"]]
    assert f"{card['mc_samples']} samples" in equipment.ContributionDescription

    # Every trained finding, with the decision, mean and std the audit trail recorded for this very request.
    findings, refer, reasons = read_sr_findings(sr)
    assert set(findings) == set(card["trained_labels"])
    (record,) = audit_records(client, response.headers["x-request-id"], ADMIN_KEY)
    assert record["status"] == 200 and record["input_format"] == "dicom"
    for label, finding in findings.items():
        expected = record["findings"][label]
        assert finding.decision == expected["decision"]
        assert finding.conf == pytest.approx(expected["conf"], abs=1e-6)
        assert finding.std == pytest.approx(expected["std"], abs=1e-6)
    assert refer == record["referral"]["refer"]
    assert reasons == record["referral"]["reasons"]


def test_the_shared_jpeg_compressed_chest_cr_gets_a_valid_sr(client: httpx.Client, tmp_path: Path) -> None:
    if not SHARED_SIIM.is_file():
        pytest.skip(f"{SHARED_SIIM} is absent (only on the project's machines)")
    response = predict_sr(client, SHARED_SIIM.read_bytes())
    assert response.status_code == 200, response.text
    assert dciodvfy_errors(response.content, tmp_path) == []
    sr = pydicom.dcmread(io.BytesIO(response.content))
    source = pydicom.dcmread(SHARED_SIIM, stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert UID(sr.SOPInstanceUID).is_valid


def test_a_non_dicom_upload_asking_for_dicom_gets_406_with_a_plain_explanation(client: httpx.Client) -> None:
    response = predict_sr(client, png_bytes())
    assert response.status_code == 406, response.text
    problem = response.json()
    assert "DICOM SR" in problem["detail"] and "PNG image" in problem["detail"]


def test_dicom_is_offered_by_the_single_endpoint_only_and_json_stays_the_default(client: httpx.Client) -> None:
    batch = client.post(
        "/v1/predict/batch",
        files={"files": ("a.dcm", chest_cr(), "application/octet-stream")},
        headers={"Accept": "application/dicom"},
    )
    assert batch.status_code == 406
    default = predict_sr(client, chest_cr(), accept="*/*")
    assert default.status_code == 200 and default.headers["content-type"] == "application/json"
