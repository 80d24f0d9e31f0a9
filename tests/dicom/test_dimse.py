"""The DIMSE listener (C-STORE and C-ECHO SCP): a PACS pushes a radiograph, the service scores it and answers a
status per instance; with forwarding, the SR comes back into the PACS by the outbox. Real associations with
pynetdicom's SCU, and a real Orthanc that pushes by C-STORE."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association

from service.api.app import create_app
from service.dicom.dimse import ROUTE
from service.dicom.stow import OUT_OF_RESOURCES, PROCESSING_FAILURE
from service.settings import Settings
from tests.dicom.conftest import ADMIN_KEY
from tests.dicom.dicom_files import OPERATOR, PATIENT_ID, PATIENT_NAME, assert_sr_matches_record, chest_cr, to_bytes
from tests.dicom.orthanc import orthanc
from tests.dicom.test_pacs import pacs_client, sr_series
from tests.service.live import HeldInference, LiveServer, free_port, live_server, tiny_settings, wait_until

VERIFICATION = UID("1.2.840.10008.1.1")
SCU_AE = "TESTSCU"
SERVICE_AE = "BAYESCXR"
MAX_ASSOCIATIONS = 2
LIMIT_BYTES = 2 * 1024 * 1024  # the 7 MB pydicom-data CR is over it; the subsampled one is far under


def small_chest_cr(**changes: object) -> Dataset:
    """pydicom-data's PA chest CR subsampled 4x (461 x 489 pixels, about 450 KB), with ``changes`` applied."""
    ds = pydicom.dcmread(io.BytesIO(chest_cr()))
    pixels = np.ascontiguousarray(ds.pixel_array[::4, ::4])
    ds.PixelData = pixels.tobytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def associate(port: int, *, calling: str = SCU_AE, called: str = SERVICE_AE) -> Association:
    """An association from pynetdicom's SCU, proposing CR, DX For Processing, CT and Verification."""
    ae = AE(ae_title=calling)
    for sop_class in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForProcessing, CTImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60

    def keep(event: evt.Event) -> None:
        if event.assoc.dul.socket is not None and event.assoc.dul.socket.socket is not None:
            _scu_sockets.append(event.assoc.dul.socket.socket)

    return ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, keep)])


_scu_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_scu_sockets() -> Iterator[None]:
    """pynetdicom 3.0 skips close() on a socket whose shutdown() fails (the peer hung up first) and leaves it to the
    garbage collector, whose unclosed-socket warning would fail whichever test it lands in: close the test's own
    SCU sockets after each test (the listener closes its side itself)."""
    yield
    while _scu_sockets:
        _scu_sockets.pop().close()


@contextmanager
def association(port: int, *, calling: str = SCU_AE, called: str = SERVICE_AE) -> Iterator[Association]:
    """``associate``, released afterwards."""
    assoc = associate(port, calling=calling, called=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def audit_items(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/audit", params={"limit": 500}, headers={"X-API-Key": ADMIN_KEY})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return [item for item in items if item["route"] == ROUTE]


def store_counts(client: httpx.Client) -> dict[str, float]:
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("cxr_dimse_stores_total{"):
            name, value = line.rsplit(" ", 1)
            counts[name.split('"')[1]] = float(value)
    return counts


@pytest.fixture(scope="module")
def listener(dicom_checkpoint: Path) -> Iterator[tuple[LiveServer, int]]:
    """The service with its DIMSE listener on a free loopback port; only TESTSCU may call it, twice at once; no
    forwarding."""
    port = free_port()
    settings = tiny_settings(
        dicom_checkpoint,
        max_upload_bytes=LIMIT_BYTES,
        admin_api_keys=[ADMIN_KEY],
        dimse={"port": port, "allowed_ae": [SCU_AE], "max_associations": MAX_ASSOCIATIONS},
    )
    with live_server(settings) as live:
        yield live, port


def test_c_echo_succeeds(listener: tuple[LiveServer, int]) -> None:
    _, port = listener
    with association(port) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000


def test_each_instance_gets_its_status_and_a_failure_never_ends_the_association(
    listener: tuple[LiveServer, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's included, at its most talkative
    live, port = listener
    truncated = tmp_path / "truncated.dcm"
    complete = to_bytes(small_chest_cr())
    truncated.write_bytes(complete[: len(complete) // 2])  # sent as the file's raw bytes, not re-encoded
    with association(port) as assoc, live.client() as client:
        assert assoc.is_established
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        # Radiographs for presentation only: raw detector data and CT are refused before any pixel is sent.
        assert accepted == {ComputedRadiographyImageStorage, VERIFICATION}
        before = len(audit_items(client))

        lateral = assoc.send_c_store(small_chest_cr(ViewPosition="LL"))
        assert lateral.Status == PROCESSING_FAILURE and "lateral" in lateral.ErrorComment
        knee = assoc.send_c_store(small_chest_cr(BodyPartExamined="KNEE"))
        assert knee.Status == PROCESSING_FAILURE and "Body Part" in knee.ErrorComment
        cut = assoc.send_c_store(truncated)
        assert cut.Status == PROCESSING_FAILURE, cut
        good = assoc.send_c_store(small_chest_cr())  # the same association still scores
        assert good.Status == 0x0000 and "ErrorComment" not in good
        assert assoc.is_established

        newest_first = audit_items(client)
        records = newest_first[: len(newest_first) - before]
        assert sorted(record["status"] for record in records) == [200, 422, 422, 422]
        assert {record["client_id"] for record in records} == {f"ae-{SCU_AE}"}
        (scored,) = (record for record in records if record["status"] == 200)
        assert scored["findings"] and scored["input_format"] == "dicom"
        counts = store_counts(client)
        assert counts["0x0000"] >= 1 and counts["0x0110"] >= 3
        assert client.get("/readyz").status_code == 200
    assert "C-STORE" in caplog.text  # the listener logged its answers, and nothing from the headers
    assert any(record.name.startswith("pynetdicom") for record in caplog.records)
    for secret in (PATIENT_NAME, PATIENT_ID, OPERATOR, str(small_chest_cr().StudyInstanceUID)):
        assert secret not in caplog.text


def test_unknown_calling_or_called_ae_titles_are_rejected(listener: tuple[LiveServer, int]) -> None:
    _, port = listener
    with association(port, calling="INTRUDER") as stranger:
        assert stranger.is_rejected
    with association(port, called="SOMEONEELSE") as misdirected:
        assert misdirected.is_rejected
    with association(port) as assoc:
        assert assoc.send_c_echo().Status == 0x0000


def test_associations_beyond_the_limit_are_rejected_until_one_ends(listener: tuple[LiveServer, int]) -> None:
    _, port = listener
    with association(port) as first, association(port) as second:
        assert first.is_established and second.is_established
        with association(port) as third:
            assert third.is_rejected
        assert second.send_c_echo().Status == 0x0000

    # pynetdicom frees a released association's slot in the server's own thread, a moment after the requestor's
    # release returns (CI once saw the next association rejected in that moment): a slot must come back.
    def accepted_again() -> bool:
        with association(port) as again:
            return again.is_established and again.send_c_echo().Status == 0x0000

    wait_until(accepted_again, timeout_s=10)


@pytest.mark.parametrize("title", ["", "   ", "SEVENTEEN-CHARS-X", "BACK\\SLASH", "TAB\tTITLE", "ÉCHO"])
def test_invalid_ae_titles_are_refused_at_start_up(title: str) -> None:
    with pytest.raises(ValidationError, match="AE title"):
        Settings(dimse={"ae_title": title})
    with pytest.raises(ValidationError, match="AE title"):
        Settings(dimse={"allowed_ae": ["ORTHANC", title]})
    assert Settings(dimse={"ae_title": " BAYESCXR "}).dimse.ae_title == "BAYESCXR"  # spaces are not significant


def test_an_instance_over_the_size_limit_aborts_its_association_while_it_is_sent(
    listener: tuple[LiveServer, int],
) -> None:
    live, port = listener
    big = pydicom.dcmread(io.BytesIO(chest_cr()))  # 7 MB of pixels, over the 2 MiB limit
    with association(port) as assoc:
        answer = assoc.send_c_store(big)
        assert "Status" not in answer  # no answer: the association was aborted
        wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), timeout_s=10)
    with live.client() as client:
        assert store_counts(client).get(f"0x{OUT_OF_RESOURCES:04X}", 0) >= 1
    with association(port) as sibling:
        assert sibling.send_c_store(small_chest_cr()).Status == 0x0000


def test_a_c_store_being_scored_when_the_service_stops_gets_its_answer(dicom_checkpoint: Path) -> None:
    """Shutdown stops the listener first and lets the instance being scored answer before it aborts the
    association: the sender is never left with an instance in doubt."""
    port = free_port()
    answers: list[Dataset] = []
    with live_server(tiny_settings(dicom_checkpoint, dimse={"port": port})) as live:
        held = HeldInference(live)
        assoc = associate(port)
        sender = threading.Thread(target=lambda: answers.append(assoc.send_c_store(small_chest_cr())))
        sender.start()
        held.wait_until_running()
        threading.Timer(1.0, held.release).start()  # released while the service is already stopping
    sender.join(timeout=30)
    assert [answer.Status for answer in answers] == [0x0000]
    wait_until(lambda: not assoc.is_alive(), timeout_s=10)
    assert not assoc.is_established  # aborted once answered


def test_a_dimse_port_already_taken_fails_start_up(dicom_checkpoint: Path) -> None:
    """Never a half-alive service: a listener that cannot bind stops the start-up (what was started is stopped), as
    a missing model would; uvicorn then exits before it serves."""

    async def start_up() -> None:
        async with app.router.lifespan_context(app):
            raise AssertionError("started with its DIMSE port taken")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = create_app(tiny_settings(dicom_checkpoint, dimse={"port": taken.getsockname()[1]}))
        with pytest.raises(OSError, match="in use"):
            asyncio.run(start_up())
    state = app.state.service
    assert not state.ready and "start-up failed" in state.detail and isinstance(state.fatal_error, OSError)
    assert state.batcher is not None and not state.batcher.alive  # stopped by the lifespan's cleanup


def test_orthanc_pushes_a_radiograph_by_c_store_and_the_sr_comes_back_into_its_study(
    dicom_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The PACS-to-AI route: Orthanc, with the service as a DICOM modality, C-STOREs the study's CR to it; the SR
    goes back into Orthanc by STOW-RS from the outbox, is found by QIDO-RS in the same study and carries the findings
    of the audit record."""
    source = small_chest_cr(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    study = str(source.StudyInstanceUID)
    port = free_port()
    with orthanc(tmp_path_factory.mktemp("orthanc-dimse")) as dicomweb:
        rest = dicomweb.removesuffix("/dicom-web")
        stored = httpx.post(f"{rest}/instances", content=to_bytes(source), timeout=30)
        assert stored.status_code == 200, stored.text
        settings = tiny_settings(
            dicom_checkpoint,
            admin_api_keys=[ADMIN_KEY],
            dicomweb={
                "forward_url": dicomweb,
                "outbox_dir": tmp_path_factory.mktemp("outbox"),
                "retry_initial_s": 0.05,
            },
            dimse={"port": port, "allowed_ae": ["ORTHANC"]},  # Orthanc's default DicomAet
        )
        with live_server(settings) as live, live.client() as client:
            # What a PACS administrator configures: the service as a modality (AE title, host, port).
            modality = {"AET": SERVICE_AE, "Host": "127.0.0.1", "Port": port}
            assert httpx.put(f"{rest}/modalities/cxr", json=modality, timeout=30).status_code == 200
            pushed = httpx.post(
                f"{rest}/modalities/cxr/store",
                json={"Resources": [stored.json()["ID"]], "Synchronous": True},
                timeout=60,
            )
            assert pushed.status_code == 200, pushed.text  # Orthanc got Success from the C-STORE
            wait_until(lambda: len(sr_series(dicomweb, study)) == 1)
            (record,) = audit_items(client)
            assert record["status"] == 200 and record["client_id"] == "ae-ORTHANC"
            idle = associate(port, calling="ORTHANC")  # left open while the service stops: aborted, no hang
            assert idle.is_established
        wait_until(lambda: not idle.is_alive(), timeout_s=10)
        assert not idle.is_established

        (series,) = sr_series(dicomweb, study)
        series_uid = str(series["0020000E"]["Value"][0])
        pacs = pacs_client(dicomweb)
        (instance,) = pacs.search_for_instances(study_instance_uid=study, series_instance_uid=series_uid)
        sr = pacs.retrieve_instance(study, series_uid, str(instance["00080018"]["Value"][0]))
    assert_sr_matches_record(sr, record)
