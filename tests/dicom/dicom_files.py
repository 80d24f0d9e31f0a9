"""Real DICOM test files and what the DICOM tests share: variants of them, dciodvfy, audit records."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from service.dicom import read_sr_findings

SHARED_SIIM = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "originals" / "siim-chest-cr-jpeg-baseline.dcm"
)
PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "PID-99887766"
OPERATOR = "Operator^Secret"


def pydicom_data(name: str) -> Path:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    return Path(data_store.DataStore().get_path(name))


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def chest_cr(**changes: object) -> bytes:
    """pydicom-data's adult PA chest CR (RG1_UNCR), with identifiers set and ``changes`` applied."""
    ds = pydicom.dcmread(pydicom_data("RG1_UNCR.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.OperatorsName = OPERATOR  # not in the patient or study modules: must not reach the SR
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return to_bytes(ds)


def multiframe_ct() -> bytes:
    """pydicom's CT slice, made a two-frame CT (the same slice twice)."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return to_bytes(ds)


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The lines of dciodvfy's report that contain "Error" (warnings are allowed); skip without dicom3tools."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed; .ci/run installs it")
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    report = run.stdout + run.stderr
    assert "Abort" not in report, report
    return [line for line in report.splitlines() if "Error" in line]


def audit_records(client: httpx.Client, request_id: str, admin_key: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/audit/{request_id}", headers={"X-API-Key": admin_key})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def assert_sr_matches_record(sr: Dataset, record: dict[str, Any]) -> None:
    """The SR's findings (decision, MC mean and std) and referral equal the audit record of the same request."""
    findings, refer, reasons = read_sr_findings(sr)
    assert set(findings) == set(record["findings"])
    for label, finding in findings.items():
        expected = record["findings"][label]
        assert finding.decision == expected["decision"], label
        assert finding.conf == pytest.approx(expected["conf"], abs=1e-6), label
        assert finding.std == pytest.approx(expected["std"], abs=1e-6), label
    assert (refer, reasons) == (record["referral"]["refer"], record["referral"]["reasons"])
