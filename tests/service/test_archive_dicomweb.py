"""``python -m service.archive --dicomweb URL``: a PACS archive scored where it lives (issue #31, first part).

A real Orthanc with its DICOMweb plugin on loopback holds a mixed archive (``bench/pacs_archive.py``): NIH films
wrapped as CR and DX in three transfer syntaxes, the SIIM CR (JPEG baseline) and RG1, a lateral view, a knee, a
child, a multi-frame instance, a CT. The inventory is built by QIDO-RS first, skips are counted by reason, the
films are fetched by WADO-RS and scored as files would be; a missing instance is an error line; a PACS that goes
away stops the run with exit 4 and a rerun resumes it; a sharded run needs the inventory first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from bench.pacs_archive import Film, load_into_orthanc, mixed_archive
from service.archive import DistInfo, build_parser, run
from service.archive.dicomweb import (
    ArchiveQuery,
    InstanceUnavailableError,
    InventoryRow,
    PacsUnavailableError,
    WadoFetcher,
    read_inventory,
)
from service.archive.report import summarise, write_report
from tests.dicom.orthanc import orthanc
from tests.service.live import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def films(shared_data: Path) -> list[Film]:
    return mixed_archive(shared_data, nih_films=6, size=256)


@pytest.fixture(scope="module")
def pacs_dir(tmp_path_factory: pytest.TempPathFactory, films: list[Film]) -> Path:
    """Orthanc's storage, filled once; each test starts its own Orthanc on it."""
    work = tmp_path_factory.mktemp("pacs")
    with orthanc(work, keep_storage=True) as url:
        load_into_orthanc(url, films)
    return work


@pytest.fixture
def pacs(pacs_dir: Path) -> Iterator[str]:
    with orthanc(pacs_dir, keep_storage=True) as url:
        yield url


def _score(url: str, out: Path, checkpoint: Path, *extra: str, dist: DistInfo | None = None) -> None:
    argv = ["--dicomweb", url, "--out", str(out), "--model", str(checkpoint), "--batch-size", "3", *extra]
    run(build_parser().parse_args(argv), dist or DistInfo(0, 1, 0))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_inventory_comes_first_skips_by_reason_and_every_listed_film_is_scored(
    pacs: str, films: list[Film], tiny_service_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "results.jsonl"
    with caplog.at_level(logging.INFO, logger="service.archive"):
        _score(pacs, out, tiny_service_checkpoint)
    inventory = read_inventory(tmp_path / "results.jsonl.inventory.csv")
    listed = [f for f in films if f.expected != "not_listed"]
    assert len(inventory) == len(listed)  # the CT is not a CR or DX: not in the inventory
    skipped = sorted(row.skip for row in inventory if row.skip)
    assert skipped == sorted(f.expected for f in listed if f.expected)
    reasons = "lateral_or_oblique_view 1, multi_frame 1, non_chest_body_part 1, paediatric 1"
    assert f"skipped 4 instances: {reasons}" in caplog.text
    lines = _lines(out)
    assert len(lines) == sum(1 for f in listed if f.expected is None)
    assert all("result" in line and line["result"]["predictions"] for line in lines), lines
    scored = {line["path"] for line in lines}
    assert scored == {row.key for row in inventory if row.skip is None}
    assert "ARCHIVE-TEST" not in out.read_text() and "Synthetic" not in out.read_text()

    # The same results as a table: one row per film, the inventory's UIDs, a struct column per finding.
    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [row["path"] for row in table] == [line["path"] for line in lines]
    assert {row["sop_instance_uid"] for row in table} == {r.sop for r in inventory if r.skip is None}
    first, line = table[0], lines[0]
    for label, finding in line["result"]["predictions"].items():
        assert first[label]["conf"] == finding["conf"] and first[label]["decision"] == finding["decision"]
    assert first["Fracture"] is None  # the tiny model does not report it
    assert first["model_sha256"] == line["result"]["model"]["sha256"] and first["refer"] is True
    assert first["referral_reasons"] == line["result"]["referral"]["reasons"]

    # The report a clinical lead reads: its numbers are the table's.
    report = write_report(tmp_path / "results.parquet", tmp_path / "report", tmp_path / "results.jsonl.inventory.csv")
    summary = summarise(table, {r.skip: 1 for r in inventory if r.skip})
    text = report.read_text()
    assert f"- in the results: {len(lines)}; scored: {len(lines)}; failed: 0" in text
    assert "- skipped before fetching (inventory): 4" in text and "| multi_frame | 1 |" in text
    cleared = sum(1 for line in lines if not line["result"]["referral"]["refer"])
    assert summary.cleared == cleared and f"- cleared (not referred): {cleared} of {len(lines)}" in text
    reasons = Counter(r for line in lines for r in line["result"]["referral"]["reasons"])
    assert summary.reasons == dict(reasons) and all(f"| {r} | {n} |" in text for r, n in reasons.items())
    assert (
        all(sum(c.values()) == len(lines) for c in summary.decisions.values()) and "Fracture" not in summary.decisions
    )
    assert (tmp_path / "report" / "scores.png").stat().st_size > 1000 and "![scores.png](scores.png)" in text

    # A rerun reuses the inventory and scores nothing again.
    _score(pacs, out, tiny_service_checkpoint)
    assert len(_lines(out)) == len(lines)


def test_the_query_narrows_the_inventory(pacs: str, tiny_service_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "dx.jsonl"
    _score(pacs, out, tiny_service_checkpoint, "--modality", "DX", "--inventory-only")
    assert not out.exists() or out.read_text() == ""
    rows = read_inventory(tmp_path / "dx.jsonl.inventory.csv")
    assert len(rows) == 3 and all(row.skip is None for row in rows)  # the 3 NIH films wrapped as DX
    none = tmp_path / "none.jsonl"
    _score(pacs, none, tiny_service_checkpoint, "--study-date", "19990101-19991231", "--inventory-only")
    assert read_inventory(tmp_path / "none.jsonl.inventory.csv") == []


def test_a_missing_instance_is_an_error_line_and_the_run_goes_on(
    pacs: str, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    _score(pacs, out, tiny_service_checkpoint, "--modality", "DX", "--inventory-only")
    inventory = tmp_path / "results.jsonl.inventory.csv"
    rows = read_inventory(inventory)
    ghost = InventoryRow(rows[0].study, rows[0].series, "1.2.826.0.1.3680043.8.498.999999")
    text = inventory.read_text() + f"{ghost.study},{ghost.series},{ghost.sop},\n"
    inventory.write_text(text)
    _score(pacs, out, tiny_service_checkpoint)
    by_path = {line["path"]: line for line in _lines(out)}
    assert len(by_path) == 4 and "result" not in by_path[ghost.key]
    assert "404" in by_path[ghost.key]["error"]["detail"]
    assert all("result" in by_path[row.key] for row in rows)
    failed = summarise(pq.read_table(tmp_path / "results.parquet").to_pylist()).failed_by_type
    assert failed == {"InstanceUnavailableError": 1}


def test_a_pacs_that_goes_away_stops_the_run_and_a_rerun_resumes(
    pacs_dir: Path, tiny_service_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_PACS_RETRIES", "2")
    monkeypatch.setenv("CXR_PACS_RETRY_INITIAL_S", "0.05")
    out = tmp_path / "results.jsonl"
    with orthanc(pacs_dir, keep_storage=True) as url:
        _score(url, out, tiny_service_checkpoint, "--inventory-only")
    argv = ["--dicomweb", url, "--out", str(out), "--model", str(tiny_service_checkpoint)]
    command = [sys.executable, "-m", "service.archive", *argv]
    gone = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ, cwd=REPO)
    said = gone.stdout + gone.stderr  # the command logs to standard output
    assert gone.returncode == 4, said[-2000:]  # the Orthanc above is gone: retried, then a clear failure
    assert "did not answer after 3 attempts" in said and "rerun the same command to resume" in said
    assert not out.exists() or out.read_text() == ""
    # Back, on another port: the inventory names films, not the server.
    with orthanc(pacs_dir, keep_storage=True) as again:
        _score(again, out, tiny_service_checkpoint)
    inventory = read_inventory(tmp_path / "results.jsonl.inventory.csv")
    assert {line["path"] for line in _lines(out)} == {row.key for row in inventory if row.skip is None}


def test_a_sharded_run_needs_the_inventory_first(pacs: str, tiny_service_checkpoint: Path, tmp_path: Path) -> None:
    from service.archive import BatchInputError

    with pytest.raises(BatchInputError, match="--inventory-only"):
        _score(pacs, tmp_path / "r.jsonl", tiny_service_checkpoint, dist=DistInfo(1, 3, 0))


class _FlakyClient:
    """A DICOMweb client whose instance retrievals fail with the given exceptions, then succeed."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures, self.calls = failures, 0

    def retrieve_instance(self, study: str, series: str, sop: str) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        import pydicom
        from pydicom.data import get_testdata_file

        return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


def test_the_fetcher_retries_with_backoff_gives_up_on_a_4xx_and_declares_the_pacs_down() -> None:
    row = InventoryRow("1.2", "1.2.3", "1.2.3.4")
    waits: list[float] = []
    flaky = _FlakyClient([requests.ConnectionError("refused"), _http_error(503), _http_error(429)])
    fetcher = WadoFetcher(flaky, retries=3, retry_initial_s=0.5, sleep=waits.append)  # type: ignore[arg-type]
    assert fetcher.fetch(row)[128:132] == b"DICM"
    assert waits == [0.5, 1.0, 2.0] and flaky.calls == 4

    refused = WadoFetcher(_FlakyClient([_http_error(404)]), sleep=waits.append)  # type: ignore[arg-type]
    with pytest.raises(InstanceUnavailableError, match="404"):
        refused.fetch(row)

    down = WadoFetcher(  # type: ignore[arg-type]
        _FlakyClient([requests.ConnectionError("refused")] * 5), retries=2, retry_max_s=0.7, sleep=waits.append
    )
    with pytest.raises(PacsUnavailableError, match="3 attempts"):
        down.fetch(row)
    assert waits[-2:] == [0.7, 0.7]  # 1 s, then 2 s, each capped at retry_max_s
    with pytest.raises(PacsUnavailableError):  # every later fetch fails at once, without trying again
        down.fetch(row)


def test_the_query_names_one_search_per_modality_and_accession() -> None:
    query = ArchiveQuery(modalities=("CR", "DX"), study_dates="20260101-", accession_numbers=("A1", "A2"))
    searches = list(query.searches())
    assert len(searches) == 4 and searches[0] == {"Modality": "CR", "StudyDate": "20260101-", "AccessionNumber": "A1"}


def test_credentials_come_from_settings_one_way_and_reach_the_pacs() -> None:
    """The PACS sees the bearer token or the basic credentials of CXR_PACS_*; both at once, or half, is refused."""
    import http.server
    import threading

    from pydantic import ValidationError

    from service.archive.dicomweb import build_inventory, open_client
    from service.settings import Settings

    with pytest.raises(ValidationError, match="not both"):
        Settings(pacs={"token": "t", "username": "u", "password": "p"})
    with pytest.raises(ValidationError, match="needs a password"):
        Settings(pacs={"username": "u"})

    seen: list[str | None] = []

    class Pacs(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        for pacs in ({"token": "secret-token"}, {"username": "archive", "password": "pass-word"}):
            client = open_client(url, Settings(pacs=pacs).pacs)
            assert build_inventory(client, ArchiveQuery(modalities=("CR",))) == []
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer secret-token", "Basic YXJjaGl2ZTpwYXNzLXdvcmQ="]


def _shard(url: str, out: Path, checkpoint: Path, index: int, **env: str) -> subprocess.Popen[str]:
    """``python -m service.archive`` as one pod of a 3-completion Indexed Job (JOB_COMPLETION_INDEX, --shards 3)."""
    argv = ["--dicomweb", url, "--out", str(out), "--model", str(checkpoint), "--shards", "3", "--batch-size", "1"]
    environment = {**os.environ, "JOB_COMPLETION_INDEX": str(index), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "service.archive", *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_indexed_job_shards_with_one_killed_and_rerun_merge_to_what_one_run_scores(
    pacs: str, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    single = tmp_path / "single" / "results.jsonl"
    _score(pacs, single, tiny_service_checkpoint)
    out = tmp_path / "job" / "results.jsonl"
    out.parent.mkdir()
    # Shards 1 and 2 start first and wait for shard 0's inventory, as pods of one Job may start in any order.
    pods = {index: _shard(pacs, out, tiny_service_checkpoint, index) for index in (2, 1)}
    slow = _shard(pacs, out, tiny_service_checkpoint, 0, CXR_PACS_RATE_PER_S="1")
    shard0 = out.with_name("results.rank0.jsonl")
    deadline = time.monotonic() + 240
    while not (shard0.exists() and shard0.read_text().count("\n") >= 1):
        assert slow.poll() is None, slow.communicate()[0][-2000:]  # still running
        assert time.monotonic() < deadline, "shard 0 wrote nothing"
        time.sleep(0.05)
    slow.kill()  # the pod dies mid-shard: one film written, the rest not
    slow.communicate()
    written = shard0.read_text().count("\n")
    for index, pod in pods.items():
        said = pod.communicate(timeout=300)[0]
        assert pod.returncode == 0, (index, said[-2000:])
    rerun = _shard(pacs, out, tiny_service_checkpoint, 0)  # Kubernetes starts the index again: it resumes
    said = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, said[-2000:]
    resumed = re.search(r"(\d+) files in this shard, (\d+) already in the output, (\d+) to score", said)
    assert resumed is not None and int(resumed[2]) == written and int(resumed[3]) > 0, said[-2000:]  # mid-way
    run(build_parser().parse_args(["--out", str(out), "--merge"]), DistInfo(0, 1, 0))
    assert not list(out.parent.glob("results.rank*.jsonl"))

    def results(path: Path) -> dict[str, dict[str, float]]:
        return {line["path"]: {k: v["conf"] for k, v in line["result"]["predictions"].items()} for line in _lines(path)}

    assert pq.read_table(out.with_suffix(".parquet")).num_rows == len(_lines(out))  # written by the merge
    merged, alone = results(out), results(single)
    assert len(_lines(out)) == len(merged) and merged.keys() == alone.keys()  # every film, once
    for path, confs in merged.items():  # batches of 1 against 3: the same numbers but for float summation order
        assert confs == pytest.approx(alone[path], abs=1e-5), path


def test_results_go_to_a_pacs_through_an_outbox_that_keeps_them_while_it_is_down(
    pacs: str, tiny_service_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--forward-results``: each scored film's SR, result page and heatmaps are made durable beside the output;
    a results PACS that is down keeps them there, and the next run (nothing left to score) sends them."""
    out = tmp_path / "results.jsonl"
    monkeypatch.setenv("CXR_DICOMWEB_FORWARD_URL", f"http://127.0.0.1:{free_port()}/dicom-web")  # nobody there
    monkeypatch.setenv("CXR_DICOMWEB_RETRY_INITIAL_S", "0.2")
    _score(pacs, out, tiny_service_checkpoint, "--forward-results", "--cams", "auto", "--forward-wait-s", "1")
    lines = _lines(out)
    scored = {line["path"].split("/")[2]: line["result"] for line in lines if line["ok"]}
    waiting = sorted((tmp_path / "results.outbox").glob("*.dcm"))
    heatmaps = sum(len(result["gradcam"]) for result in scored.values())
    assert scored and heatmaps and len(waiting) == 2 * len(scored) + heatmaps  # SR + page per film, one per map

    (tmp_path / "results-pacs").mkdir()
    with orthanc(tmp_path / "results-pacs") as target:
        monkeypatch.setenv("CXR_DICOMWEB_FORWARD_URL", target)
        _score(pacs, out, tiny_service_checkpoint, "--forward-results", "--forward-wait-s", "60")
        assert _lines(out) == lines  # nothing scored again
        assert list((tmp_path / "results.outbox").glob("*.dcm")) == []
        client = DICOMwebClient(target)
        stored = client.search_for_instances()
        by_modality = Counter(item["00080060"]["Value"][0] for item in stored)
        assert by_modality == {"SR": len(scored), "OT": len(scored) + heatmaps}
        for item in stored:
            if item["00080060"]["Value"][0] != "SR":
                continue
            uids = [item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
            sr = client.retrieve_instance(*uids)
            (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
            referenced = {
                s.ReferencedSOPInstanceUID
                for series in evidence.ReferencedSeriesSequence
                for s in series.ReferencedSOPSequence
            }
            film = referenced & set(scored)
            assert len(film) == 1 and evidence.StudyInstanceUID == uids[0]
