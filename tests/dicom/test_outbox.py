"""The forwarding outbox against a PACS that refuses: a 4xx moves the object to rejected/ (counted in /metrics) and
the queue moves on; 429 and 5xx are retried until the PACS takes the object. The PACS is a small HTTP server on
loopback that answers STOW-RS as a test scripts it, and keeps what it was sent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.dicom.sr import read_sr_findings
from tests.dicom.dicom_files import chest_cr
from tests.dicom.test_pacs import outbox_metrics, settings_for
from tests.dicom.test_stow import stow
from tests.service.live import live_server, wait_until

REFUSED_STUDY = generate_uid()
RETRIED_STUDY = generate_uid()


class ScriptedPacs:
    """A STOW-RS endpoint that refuses (400) every object of ``REFUSED_STUDY``, answers the first requests for other
    studies with ``transient`` statuses in turn and 200 afterwards, and keeps (status, Content-Type, body) of each."""

    def __init__(self, transient: list[int]) -> None:
        self.transient = transient
        self.received: list[tuple[int, str, bytes]] = []
        self.lock = threading.Lock()
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._body()
                with pacs.lock:
                    status = 400  # refused outright
                    if REFUSED_STUDY.encode() not in body:
                        status = pacs.transient.pop(0) if pacs.transient else 200
                    pacs.received.append((status, self.headers["Content-Type"], body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers["Content-Length"]))
                chunks = []  # dicomweb-client streams a large object in chunks
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def answered(self) -> list[int]:
        with self.lock:
            return [status for status, _, _ in self.received]


@pytest.fixture
def scripted_pacs() -> Iterator[ScriptedPacs]:
    pacs = ScriptedPacs([429, 503])
    thread = threading.Thread(target=pacs.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pacs
    finally:
        pacs.server.shutdown()
        pacs.server.server_close()
        thread.join(timeout=10)


def test_refused_results_move_to_rejected_and_the_next_ones_are_retried_until_delivered(
    scripted_pacs: ScriptedPacs, dicom_checkpoint: Path, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    with live_server(settings_for(dicom_checkpoint, scripted_pacs.url, outbox)) as live, live.client() as client:
        # The PACS refuses the first study's results outright (400): never retried, kept for an administrator.
        assert stow(client, [(chest_cr(StudyInstanceUID=REFUSED_STUDY), "application/dicom")]).status_code == 200
        wait_until(lambda: outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0)
        refused = len(scripted_pacs.answered())
        assert refused >= 1 and scripted_pacs.answered() == [400] * refused  # each tried once
        # The queue is not blocked: the next study's first store meets 429, then 503, is retried with backoff,
        # and everything is delivered.
        assert stow(client, [(chest_cr(StudyInstanceUID=RETRIED_STUDY), "application/dicom")]).status_code == 200
        wait_until(lambda: outbox_metrics(client)["cxr_dicomweb_outbox_instances"] == 0)
        metrics = outbox_metrics(client)
        assert client.get("/readyz").status_code == 200
    answered = scripted_pacs.answered()
    assert answered[refused : refused + 3] == [429, 503, 200]
    delivered = answered.count(200)
    assert delivered >= 1 and set(answered[refused + 3 :]) <= {200}
    assert metrics["cxr_dicomweb_rejected_total"] == refused
    assert metrics["cxr_dicomweb_forwarded_total"] == delivered
    assert metrics["cxr_dicomweb_forward_failures_total"] == refused + 2  # the refusals and the two retried failures

    rejected = sorted((outbox / "rejected").glob("*.dcm"))
    assert len(rejected) == refused and list(outbox.glob("*.dcm")) == []
    kept = [pydicom.dcmread(path) for path in rejected]
    assert {str(ds.StudyInstanceUID) for ds in kept} == {REFUSED_STUDY}
    (sr,) = (ds for ds in kept if ds.Modality == "SR")
    read_sr_findings(sr)  # a whole, readable SR, ready to be sent again by hand

    for status, content_type, body in scripted_pacs.received:
        assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
        assert (REFUSED_STUDY.encode() in body) == (status == 400)
    assert all(RETRIED_STUDY.encode() in body for status, _, body in scripted_pacs.received if status != 400)
