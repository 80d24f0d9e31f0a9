"""Round trip through a real PACS: Orthanc holds the study, the service scores it by STOW-RS and forwards the SR
back into the same study through its persistent outbox; a PACS that is down or a restart loses nothing."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from service.dicom.heatmaps import HEATMAP_SERIES_NUMBER
from service.dicom.summary import SUMMARY_SERIES_NUMBER
from service.runtime.heatmaps import AUTO_CAM_LIMIT
from service.settings import Settings
from tests.dicom.conftest import ADMIN_KEY
from tests.dicom.dicom_files import assert_sr_matches_record, audit_records, chest_cr, dciodvfy_errors
from tests.dicom.orthanc import orthanc
from tests.dicom.test_heatmaps import evidence_uids
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
        dicomweb={"forward_url": url, "outbox_dir": outbox, "retry_initial_s": 0.05, "retry_max_s": 0.5},
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
        # The SR, the result page and one heatmap image per finding drawn with cams=auto (positive or uncertain,
        # at most 4).
        (record,) = audit_records(client, response.headers["x-request-id"], ADMIN_KEY)
        drawn = min(AUTO_CAM_LIMIT, sum(f["decision"] != "negative" for f in record["findings"].values()))
        assert drawn >= 1  # the tiny untrained model is unsure of everything, so there is a heatmap to check
        # RG1's zero Pixel Spacing is left out of the result objects, and the audit record says so (name, no value).
        assert [w for w in record["warnings"] if w.startswith("DICOM header")] == [
            "DICOM header: PixelSpacing is zero or negative; the AI result objects leave it out"
        ]
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_forwarded_total", 0) == 2 + drawn)
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0

    # QIDO-RS finds the SR in the same study; WADO-RS returns it; highdicom reads its findings back.
    (series,) = sr_series(pacs, study)
    series_uid = str(series["0020000E"]["Value"][0])  # type: ignore[index]
    (instance,) = pacs_client(pacs).search_for_instances(study_instance_uid=study, series_instance_uid=series_uid)
    sop_uid = str(instance["00080018"]["Value"][0])
    sr = pacs_client(pacs).retrieve_instance(study, series_uid, sop_uid)
    assert dciodvfy_errors(_part10(sr), tmp_path) == []
    assert_sr_matches_record(sr, record)

    # The heatmaps: Secondary Capture images in one more series of the same study, each valid and naming its finding.
    derived = pacs_client(pacs).search_for_series(study_instance_uid=study, search_filters={"Modality": "OT"})
    by_number = {int(item["00200011"]["Value"][0]): str(item["0020000E"]["Value"][0]) for item in derived}
    assert set(by_number) == {HEATMAP_SERIES_NUMBER, SUMMARY_SERIES_NUMBER}
    heatmap_series = by_number[HEATMAP_SERIES_NUMBER]
    assert heatmap_series != series_uid
    found = pacs_client(pacs).search_for_instances(study_instance_uid=study, series_instance_uid=heatmap_series)
    assert len(found) == drawn
    image = pacs_client(pacs).retrieve_instance(study, heatmap_series, str(found[0]["00080018"]["Value"][0]))
    assert dciodvfy_errors(_part10(image), tmp_path) == []
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert any(label in image.ImageComments for label in record["findings"])
    heatmap_uids = {str(item["00080018"]["Value"][0]) for item in found}
    # The result page: one valid image in the film's study.
    (page_item,) = pacs_client(pacs).search_for_instances(
        study_instance_uid=study, series_instance_uid=by_number[SUMMARY_SERIES_NUMBER]
    )
    page = pacs_client(pacs).retrieve_instance(
        study, by_number[SUMMARY_SERIES_NUMBER], page_item["00080018"]["Value"][0]
    )
    assert dciodvfy_errors(_part10(page), tmp_path) == []
    assert (
        page.PatientID == source.PatientID
        and page.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    # The SR names every object of the result.
    assert evidence_uids(sr) == {source.SOPInstanceUID, page.SOPInstanceUID, *heatmap_uids}
    # Orthanc's own renderer (Orthanc Explorer's preview) decodes both: the heatmap with its colour, the page with
    # its text and (when a finding was drawn) the key heatmaps.
    rendered = orthanc_preview(pacs, image.SOPInstanceUID)
    assert (rendered[..., 0] - rendered[..., 2]).max() > 100  # red-to-yellow where the map is hot
    rendered = orthanc_preview(pacs, page.SOPInstanceUID)
    assert rendered.shape[:2] == (page.Rows, page.Columns) and (rendered > 200).mean() > 0.002  # text on black


def orthanc_preview(pacs: str, sop_instance_uid: str) -> np.ndarray:
    """The instance as Orthanc Explorer shows it (its ``/preview`` PNG), RGB."""
    rest = pacs.removesuffix("/dicom-web")
    (match,) = httpx.post(f"{rest}/tools/lookup", content=str(sop_instance_uid), timeout=30).json()
    preview = httpx.get(f"{rest}/instances/{match['ID']}/preview", timeout=30)
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(preview.content)).convert("RGB"), dtype=int)


def test_a_chest_cr_from_another_source_round_trips_too(
    pacs: str, dicom_checkpoint: Path, tmp_path: Path, shared_data: Path
) -> None:
    """The acceptance film: a real chest CR none of the code was written against (SIIM-ACR, JPEG Baseline,
    ../shared/data/originals), into the PACS, to the service by STOW-RS, its SR back into its own study."""
    upload = (shared_data / "originals" / "siim-chest-cr-jpeg-baseline.dcm").read_bytes()
    source = pydicom.dcmread(io.BytesIO(upload))
    study = str(source.StudyInstanceUID)
    pacs_client(pacs).store_instances([source])
    with live_server(settings_for(dicom_checkpoint, pacs, tmp_path / "outbox")) as live, live.client() as client:
        response = stow(client, [(upload, "application/dicom")])
        assert response.status_code == 200, response.text
        (record,) = audit_records(client, response.headers["x-request-id"], ADMIN_KEY)
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_outbox_instances", 1) == 0)
        assert outbox_metrics(client)["cxr_dicomweb_forwarded_total"] >= 1
    (series,) = sr_series(pacs, study)
    series_uid = str(series["0020000E"]["Value"][0])  # type: ignore[index]
    (instance,) = pacs_client(pacs).search_for_instances(study_instance_uid=study, series_instance_uid=series_uid)
    sr = pacs_client(pacs).retrieve_instance(study, series_uid, str(instance["00080018"]["Value"][0]))
    assert sr.StudyInstanceUID == study and sr.PatientID == source.PatientID
    assert dciodvfy_errors(_part10(sr), tmp_path) == []
    assert_sr_matches_record(sr, record)


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
        waiting = sorted(outbox.glob("*.dcm"))  # the SR and its heatmap images
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == len(waiting) >= 2
    assert sorted(outbox.glob("*.dcm")) == waiting  # still there after shutdown, and all valid
    modalities = [pydicom.dcmread(path, stop_before_pixels=True).Modality for path in waiting]
    assert modalities == ["SR"] + ["OT"] * (len(waiting) - 1)  # the SR first, as it was put first
    for path in waiting:
        assert dciodvfy_errors(path.read_bytes(), tmp_path) == []

    # A restart with the PACS back: the waiting results are delivered, into the right study.
    with live_server(settings_for(dicom_checkpoint, pacs, outbox)) as live, live.client() as client:
        wait_until(lambda: outbox_metrics(client).get("cxr_dicomweb_forwarded_total", 0) == len(waiting))
        assert outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0
    assert list(outbox.glob("*.dcm")) == []
    assert len(sr_series(pacs, study)) == 1
    derived = pacs_client(pacs).search_for_series(study_instance_uid=study, search_filters={"Modality": "OT"})
    # Number of Series Related Instances: the result page, and every heatmap.
    count = {int(item["00200011"]["Value"][0]): item["00201209"]["Value"][0] for item in derived}
    assert count == {SUMMARY_SERIES_NUMBER: 1, HEATMAP_SERIES_NUMBER: len(waiting) - 2}


def _part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
