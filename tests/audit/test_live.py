"""The audit trail of a real server on loopback, against SQLite and a real PostgreSQL: one record per image
answered or refused, no patient identifier anywhere, the auditors' API (keys, filters, NDJSON, FHIR AuditEvent),
both failure policies with a database that really refuses writes, and the rolling rates in /metrics."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import text

from service.audit import AuditQuery, AuditStore, client_id_for
from tests.audit.triggers import refuse_inserts
from tests.reliability.harness import metric_value
from tests.service.live import LiveServer, live_server, tiny_settings, wait_until
from tests.service.test_api import PATIENT_ID, PATIENT_NAME, bomb_png, dicom_with_identifiers, png_bytes

KEY, ADMIN = "predict-key-0123456789", "admin-key-0123456789"
AUTH, ADMIN_AUTH = {"X-API-Key": KEY}, {"X-API-Key": ADMIN}


@pytest.fixture
def live(tiny_service_checkpoint: Path, audit_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        tiny_service_checkpoint,
        audit={"url": audit_url, "spool_dir": tmp_path / "spool"},
        api_keys=[KEY],
        admin_api_keys=[ADMIN],
    )
    with live_server(settings) as server:
        yield server


def _store(live: LiveServer) -> AuditStore:
    return AuditStore.open(live.state.settings.audit.url, migrate_schema=False)


def _post(client: httpx.Client, data: bytes, request_id: str) -> httpx.Response:
    return client.post(
        "/v1/predict",
        files={"file": ("x", data)},
        params={"cams": "none"},
        headers={**AUTH, "X-Request-ID": request_id},
    )


def test_a_burst_of_uploads_leaves_exactly_one_record_per_image_and_no_identifier(live: LiveServer) -> None:
    uploads = {
        "ok-png-0": png_bytes(seed=0),
        "ok-png-1": png_bytes(seed=1),
        "ok-dicom": dicom_with_identifiers(),
        "bad-html": b"<html>not an image</html>",
        "bad-truncated": png_bytes()[:300],
        "bad-bomb": bomb_png(),
        "bad-empty": b"",
    }
    with live.client() as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = dict(zip(uploads, pool.map(lambda kv: _post(client, kv[1], kv[0]), uploads.items()), strict=True))
        batch = client.post(
            "/v1/predict/batch",
            files=[
                ("files", ("a", png_bytes(seed=3))),
                ("files", ("b", b"garbage")),
                ("files", ("c", png_bytes(seed=4))),
            ],
            params={"cams": "none"},
            headers={**AUTH, "X-Request-ID": "batch-1"},
        )
        # Refused before admission (no key): not audited.
        no_key = client.post("/v1/predict", files={"file": ("x", png_bytes())}, headers={"X-Request-ID": "no-key"})
    assert batch.status_code == 200
    statuses = {rid: r.status_code for rid, r in answers.items()}
    assert statuses == {
        "ok-png-0": 200, "ok-png-1": 200, "ok-dicom": 200,
        "bad-html": 415, "bad-truncated": 422, "bad-bomb": 413, "bad-empty": 422,
    }  # fmt: skip
    assert no_key.status_code == 401
    # Every answer finished: the audit writer's group-commit hint is down again.
    assert live.state.pipeline is not None and not live.state.pipeline.signals.answers_coming()

    store = _store(live)
    try:
        records = list(store.iter_records(AuditQuery()))
        by_id = {(r.request_id, r.item_index): r for r in records}
        expected = {(rid, None) for rid in uploads} | {("batch-1", i) for i in range(3)}
        assert set(by_id) == expected and len(records) == len(expected)
        for rid, answer in answers.items():
            rec = by_id[(rid, None)]
            assert rec.status == answer.status_code and rec.client_id == client_id_for(KEY)
            assert rec.route == "/v1/predict" and rec.input_bytes == len(uploads[rid])
            # Hashed in the decode thread when decoded, after the refusal otherwise: the same digest either way.
            assert rec.input_sha256 == hashlib.sha256(uploads[rid]).hexdigest()
            assert rec.model == live.state.model_ref
            if answer.status_code == 200:
                body = answer.json()
                assert rec.referral is not None and rec.referral.model_dump() == body["referral"]
                assert {k: f.conf for k, f in rec.findings.items()} == {
                    k: p["conf"] for k, p in body["predictions"].items()
                }
                assert rec.mc_samples == body["mc_samples"] and rec.input_format == body["image"]["format"]
            else:
                assert rec.findings == {} and rec.error == answer.json()["title"]
        assert by_id[("ok-dicom", None)].input_format == "dicom"
        assert [by_id[("batch-1", i)].status for i in range(3)] == [200, 415, 200]

        # No patient identifier, no DICOM header value, no key: neither in the rows nor in the exported records.
        dump = json.dumps([r.model_dump(mode="json") for r in records])
        with store.engine.connect() as connection:
            for table in ("audit_events", "audit_findings"):
                dump += repr(connection.execute(text(f"SELECT * FROM {table}")).all())
    finally:
        store.close()
    for secret in (PATIENT_NAME, PATIENT_ID, "ACC-5551234", KEY, ADMIN):
        assert secret not in dump
    if live.state.settings.audit.url.startswith("sqlite"):
        raw = Path(live.state.settings.audit.url.removeprefix("sqlite:///")).read_bytes()
        for secret in (PATIENT_NAME, PATIENT_ID, KEY):
            assert secret.encode() not in raw


def test_the_read_api_is_for_admin_keys_and_exports_json_ndjson_and_fhir(live: LiveServer) -> None:
    with live.client() as client:
        for i in range(3):
            assert _post(client, png_bytes(seed=i), f"req-{i}").status_code == 200
        assert _post(client, b"nope", "req-bad").status_code == 415
        assert client.get("/v1/audit").status_code == 401
        assert client.get("/v1/audit", headers={"X-API-Key": "unknown"}).status_code == 401
        assert client.get("/v1/audit", headers=AUTH).status_code == 403
        assert client.get("/v1/audit/req-0", headers=AUTH).status_code == 403

        seen, cursor = [], None
        while True:
            page = client.get(
                "/v1/audit", headers=ADMIN_AUTH, params={"limit": 3, **({"cursor": cursor} if cursor else {})}
            )
            assert page.status_code == 200
            seen += [item["request_id"] for item in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert seen == ["req-0", "req-1", "req-2", "req-bad"]
        refused = client.get("/v1/audit", headers=ADMIN_AUTH, params={"referral": "true"}).json()["items"]
        assert {i["request_id"] for i in refused} == {"req-0", "req-1", "req-2"}  # no referral rule: all referred
        assert client.get("/v1/audit", headers=ADMIN_AUTH, params={"model": "another"}).json()["items"] == []

        one = client.get("/v1/audit/req-1", headers=ADMIN_AUTH)
        assert one.status_code == 200 and [i["request_id"] for i in one.json()["items"]] == ["req-1"]
        assert client.get("/v1/audit/absent", headers=ADMIN_AUTH).status_code == 404

        ndjson = client.get("/v1/audit", headers=ADMIN_AUTH, params={"format": "ndjson"})
        assert ndjson.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line)["request_id"] for line in ndjson.text.splitlines()] == seen

        fhir = client.get("/v1/audit", headers=ADMIN_AUTH, params={"format": "fhir", "limit": 2})
        bundle = Bundle.model_validate(fhir.json())
        events = [AuditEvent.model_validate(entry.resource.model_dump()) for entry in bundle.entry or []]
        assert len(events) == 2 and bundle.link and bundle.link[0].relation == "next"
        detail = json.loads(
            base64.b64decode(fhir.json()["entry"][0]["resource"]["entity"][0]["detail"][0]["valueBase64Binary"])
        )
        assert detail["request_id"] == "req-0"
        bad = client.get("/v1/audit/req-bad", headers=ADMIN_AUTH, params={"format": "fhir"}).json()
        assert AuditEvent.model_validate(bad["entry"][0]["resource"]).outcome == "4"


@pytest.mark.parametrize("policy", ["fail-closed", "buffer"])
def test_a_database_that_refuses_writes(
    tiny_service_checkpoint: Path, audit_url: str, tmp_path: Path, policy: str
) -> None:
    settings = tiny_settings(
        tiny_service_checkpoint, audit={"url": audit_url, "policy": policy, "spool_dir": tmp_path / "spool"}
    )
    with live_server(settings) as live, live.client() as client:
        store = _store(live)
        try:
            with refuse_inserts(store.engine):
                refused = _post(client, png_bytes(), "while-down")
                metrics = client.get("/metrics").text
                assert metric_value(metrics, "cxr_audit_write_failures_total") >= 1
                if policy == "fail-closed":
                    assert refused.status_code == 503 and refused.json()["title"] == "Audit trail unavailable"
                    assert "Retry-After" in refused.headers
                else:
                    assert refused.status_code == 200  # durable in the spool
                    assert metric_value(metrics, "cxr_audit_spool_records") == 1
            assert _post(client, png_bytes(), "after").status_code == 200
            wait_until(lambda: metric_value(client.get("/metrics").text, "cxr_audit_spool_records") == 0)
            stored = {r.request_id for r in store.iter_records(AuditQuery())}
            assert stored == ({"after"} if policy == "fail-closed" else {"while-down", "after"})
        finally:
            store.close()


def test_metrics_show_rolling_rates_and_audit_health(live: LiveServer) -> None:
    with live.client() as client:
        for i in range(4):
            assert _post(client, png_bytes(seed=i), f"r{i}").status_code == 200
        metrics = client.get("/metrics").text
    assert metric_value(metrics, "cxr_rolling_window_predictions") == 4
    assert metric_value(metrics, "cxr_rolling_referral_rate") == 1.0  # the tiny model has no referral rule
    assert metric_value(metrics, "cxr_audit_records_written_total") == 4
    assert metric_value(metrics, "cxr_audit_commits_total") == 4  # one client: nothing to group, nobody waits
    assert metric_value(metrics, "cxr_audit_lag_seconds") >= 0
    assert 'cxr_rolling_positive_rate{label="Cardiomegaly"}' in metrics
    assert 'cxr_rolling_mean_conf{label="Cardiomegaly"}' in metrics


def test_model_failures_and_ood_rejections_are_recorded_with_what_was_known(
    tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    from service.settings import Settings
    from tests.service.test_ood import DEMO, REJECT_TITLE
    from train.ood import probe_images

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    with live_server(tiny_settings(tiny_service_checkpoint, audit={"url": url})) as live, live.client() as client:
        predictor = live.state.predictor
        assert predictor is not None

        def broken(requests: object) -> object:
            raise RuntimeError("injected: the device failed")

        predictor.run = broken  # type: ignore[method-assign,assignment]
        assert _post(client, png_bytes(), "model-failed").status_code == 500
    if not (DEMO / "ood.safetensors").is_file():
        pytest.skip("models/demo has no OOD gate")
    photo = next(p for p in probe_images(seed=0) if p.name == "skimage-chelsea")
    settings = Settings(model_path=DEMO, max_wait_ms=5.0, ood_action="reject", audit={"url": url})
    with live_server(settings) as live, live.client() as client:
        refused = client.post("/v1/predict", files={"file": ("cat.png", photo.data)}, headers={"X-Request-ID": "cat"})
        assert refused.status_code == 422 and refused.json()["title"] == REJECT_TITLE
    store = AuditStore.open(url, migrate_schema=False)
    try:
        (failed,) = store.by_request("model-failed")
        (cat,) = store.by_request("cat")
    finally:
        store.close()
    assert failed.status == 500 and failed.error == "Inference failed" and failed.input_format == "png"
    assert cat.status == 422 and cat.error == REJECT_TITLE and cat.findings == {}
    assert cat.ood is not None and not cat.ood.in_distribution and cat.ood.score > cat.ood.threshold
    assert cat.input_format == "png" and cat.width and cat.height and cat.mc_samples
    assert cat.model.name != failed.model.name  # each record names the model that ran
