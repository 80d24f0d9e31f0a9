"""Round trip through a real PACS: Orthanc holds the study, the service scores it by STOW-RS and forwards the SR
back into the same study through its persistent outbox; a PACS that is down or a restart loses nothing."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from service.dicom import read_sr_findings
from service.settings import Settings
from tests.dicom.conftest import ADMIN_KEY
from tests.dicom.dicom_files import audit_records, chest_cr, dciodvfy_errors
from tests.dicom.orthanc import orthanc
from tests.dicom.test_stow import REFERENCED_SOP, items, stow
from tests.service.live import free_port, live_server, tiny_settings, wait_until


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        yield url


def pacs_client(url: str) -> DICOMwebClient:
    client = DICOMwebClient(url=url)
    client.set_http_retry_params(retry=False)
    return client


def settings_for(checkpoint: Path, url: str, outbox: Path) -> Settings:
    return tiny_settings(
        checkpoint,
        max_upload_bytes=8 * 1024 * 1024,
        admin_api_keys=[ADMIN_KEY],
        dicomweb_forward_url=url,
        dicomweb_outbox_dir=outbox,
        dicomweb_retry_initial_s=0.05,
        dicomweb_retry_max_s=0.5,
    )


def outbox_metrics(client: httpx.Client) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("cxr_dicomweb_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def sr_series(pacs_url: str, study_uid: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = pacs_client(pacs_url).search_for_series(
        study_instance_uid=study_uid, search_filters={"Modality": "SR"}
    )
    return found


def test_a_study_in_the_pacs_gets_its_sr_back_with_the_findings_it_was_scored_with(
    pacs: str, dicom_checkpoint: Path, tmp_path: Path
) -> None:
    upload = chest_cr()
    source = pydicom.dcmread(io.BytesIO(upload))
    pacs_client(pacs).store_instances([source])  # the study lives in the PACS first, as in a hospital
    study = str(source.StudyInstanceUID)
    assert sr_series(pacs, study) == []

    with live_server(settings_for(dicom_checkpoint, pacs, tmp_path / "outbox")) as live, live.client() as client:
        response = stow(client, [(upload, "application/dicom")])
        assert response.status_code == 200, response.text
        assert len(items(response.json(), REFERENCED_SOP)) == 1
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_forwarded_total", 0) == 1)
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0
        (record,) = audit_records(client, response.headers["x-request-id"], ADMIN_KEY)

    # QIDO-RS finds the SR in the same study; WADO-RS returns it; highdicom reads its findings back.
    (series,) = sr_series(pacs, study)
    series_uid = str(series["0020000E"]["Value"][0])  # type: ignore[index]
    (instance,) = pacs_client(pacs).search_for_instances(study_instance_uid=study, series_instance_uid=series_uid)
    sop_uid = str(instance["00080018"]["Value"][0])
    sr = pacs_client(pacs).retrieve_instance(study, series_uid, sop_uid)
    assert dciodvfy_errors(_part10(sr), tmp_path) == []
    findings, refer, reasons = read_sr_findings(sr)
    assert set(findings) == set(record["findings"])
    for label, finding in findings.items():
        expected = record["findings"][label]
        assert finding.decision == expected["decision"]
        assert finding.conf == pytest.approx(expected["conf"], abs=1e-6)
        assert finding.std == pytest.approx(expected["std"], abs=1e-6)
    assert (refer, reasons) == (record["referral"]["refer"], record["referral"]["reasons"])


def test_results_wait_in_the_outbox_while_the_pacs_is_down_and_survive_a_restart(
    pacs: str, dicom_checkpoint: Path, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    upload = chest_cr(StudyInstanceUID=pydicom.uid.generate_uid(), SeriesInstanceUID=pydicom.uid.generate_uid())
    study = str(pydicom.dcmread(io.BytesIO(upload), stop_before_pixels=True).StudyInstanceUID)
    with live_server(settings_for(dicom_checkpoint, down, outbox)) as live, live.client() as client:
        response = stow(client, [(upload, "application/dicom")])
        assert response.status_code == 200, response.text  # scored and durable: the PACS being down is not its fault
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_forward_failures_total", 0) >= 2)
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 1
    (waiting,) = outbox.glob("*.dcm")  # still there after shutdown, and a valid SR
    assert dciodvfy_errors(waiting.read_bytes(), tmp_path) == []

    # A restart with the PACS back: the waiting result is delivered, into the right study.
    with live_server(settings_for(dicom_checkpoint, pacs, outbox)) as live, live.client() as client:
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_forwarded_total", 0) == 1)
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0
    assert list(outbox.glob("*.dcm")) == []
    assert len(sr_series(pacs, study)) == 1


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
