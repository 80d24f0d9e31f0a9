"""The HTTP contract against a real uvicorn server on loopback, with a real (tiny) model and real files."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from service.schemas import BatchResponse, ModelCard, PredictionResponse
from tests.service.live import HeldInference, LiveServer, live_server, tiny_settings, wait_until

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "PID-99887766"


def png_bytes(size: int = 256, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def pydicom_data(name: str) -> Path:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    return Path(data_store.DataStore().get_path(name))


def dicom_with_identifiers() -> bytes:
    ds = pydicom.dcmread(pydicom_data("RG1_UNCR.dcm"))
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = "ACC-5551234"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def post_file(client: httpx.Client, data: bytes, path: str = "/v1/predict", **params: object) -> httpx.Response:
    return client.post(path, files={"file": ("upload.bin", data, "application/octet-stream")}, params=params)


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_liveness_readiness_and_model_card(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    card = ModelCard.model_validate(client.get("/v1/model").json())
    assert (card.name, card.version, card.arch) == ("tiny-test-model", "1.2.3", "test_efficientnet")
    assert card.untrained_labels == ["Fracture"]
    assert card.trained is True
    assert "not for clinical use" in card.intended_use


def test_predict_returns_the_typed_contract(client: httpx.Client) -> None:
    response = post_file(client, png_bytes(), cams="all")
    assert response.status_code == 200, response.text
    body = PredictionResponse.model_validate(response.json())
    assert response.headers["x-request-id"] == body.request_id
    assert body.mc_samples == 20
    assert "Fracture" not in body.predictions  # not trained: not reported
    assert len(body.predictions) == 13
    for finding in body.predictions.values():
        lo, hi = finding.interval
        assert 0 <= lo <= hi <= 1
        assert finding.std == pytest.approx(finding.uncertainty**0.5, abs=1e-5)
    assert body.uncertain == any(p.decision == "uncertain" for p in body.predictions.values())
    # The tiny model has no fitted referral rule: every film is referred, and says why.
    assert body.referral.refer and body.referral.reasons[0] == "no_referral_rule"
    assert set(body.gradcam) == set(body.predictions)
    heat = body.gradcam["Edema"]
    image = Image.open(io.BytesIO(base64.b64decode(heat.png_base64)))
    assert image.mode == "P" and "transparency" in image.info  # indexed PNG whose palette carries the alpha
    assert np.asarray(image.convert("RGBA")).shape == (64, 64, 4)
    assert image.size == (heat.width, heat.height) == (64, 64)
    assert (body.image.format, body.image.width, body.image.height) == ("png", 256, 256)
    assert body.timing_ms.total >= body.timing_ms.inference >= 0


def test_cams_parameter_and_mc_samples(client: httpx.Client) -> None:
    none = PredictionResponse.model_validate(post_file(client, png_bytes(), cams="none", mc_samples=5).json())
    assert none.gradcam == {}
    assert none.mc_samples == 5
    some = PredictionResponse.model_validate(post_file(client, png_bytes(), cams="Edema, Cardiomegaly").json())
    assert set(some.gradcam) == {"Edema", "Cardiomegaly"}
    auto = PredictionResponse.model_validate(post_file(client, png_bytes()).json())
    flagged = [k for k, p in auto.predictions.items() if p.decision != "negative"]
    assert set(auto.gradcam) <= set(flagged)
    assert len(auto.gradcam) == min(4, len(flagged))


def test_legacy_path_and_request_id_header(client: httpx.Client) -> None:
    response = client.post(
        "/predict", files={"file": ("x.png", png_bytes(), "image/png")}, headers={"X-Request-ID": "ris-42.a"}
    )
    assert response.status_code == 200
    assert response.json()["request_id"] == "ris-42.a"
    assert response.headers["x-request-id"] == "ris-42.a"
    odd = client.post("/predict", files={"file": ("x.png", png_bytes())}, headers={"X-Request-ID": "<script>"})
    assert odd.json()["request_id"] != "<script>"


def test_dicom_monochrome1_and_no_patient_identifiers_leak(client: httpx.Client) -> None:
    response = post_file(client, dicom_with_identifiers(), cams="all")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["format"] == "dicom"
    assert body["image"]["photometric"] == "MONOCHROME1"
    # The heatmaps' base64 is random-looking text in which "Doe" turns up now and then (this test failed so): it
    # is checked as pixels elsewhere, and left out here.
    text = response.text
    for heatmap in body["gradcam"].values():
        text = text.replace(heatmap["png_base64"], "")
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, "ACC-5551234"):
        assert secret not in text


def test_a_child_or_lateral_dicom_is_referred_as_outside_the_intended_population(client: httpx.Client) -> None:
    ds = pydicom.dcmread(pydicom_data("RG1_UNCR.dcm"))
    ds.PatientAge = "006Y"
    ds.ViewPosition = "LL"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    response = post_file(client, buffer.getvalue(), cams="none")
    assert response.status_code == 200, response.text
    referral = response.json()["referral"]
    assert referral["refer"] is True and "outside_intended_population" in referral["reasons"]
    assert referral["population"] == ["paediatric", "lateral_or_oblique_view"]
    assert "006Y" not in response.text


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        (b"", 422, "empty"),
        (b"<html><body>not an image</body></html>", 415, "PNG, JPEG or DICOM"),
        (b"GIF89a" + b"\x00" * 64, 415, "GIF"),
        (png_bytes()[:300], 422, "truncated"),
        (bomb_png(), 413, "pixel"),
    ],
)
def test_bad_uploads_get_problem_details_never_500(
    client: httpx.Client, payload: bytes, status: int, fragment: str
) -> None:
    response = post_file(client, payload)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert fragment.lower() in problem["detail"].lower()
    assert problem["request_id"] == response.headers["x-request-id"]


def test_bad_parameters_and_missing_file(client: httpx.Client) -> None:
    wrong_label = post_file(client, png_bytes(), cams="Edema,Broken Heart")
    assert wrong_label.status_code == 422
    assert "Broken Heart" in wrong_label.json()["detail"]
    assert post_file(client, png_bytes(), mc_samples=0).status_code == 422
    assert post_file(client, png_bytes(), mc_samples=101).status_code == 422
    missing = client.post("/v1/predict", files={"wrong": ("x.png", png_bytes())})
    assert missing.status_code == 422
    assert "'file'" in missing.json()["detail"]


def test_raw_body_upload_answers_as_the_form_does(client: httpx.Client) -> None:
    image = png_bytes(seed=3)
    form = post_file(client, image, cams="all", mc_samples=20)
    raw = client.post(
        "/v1/predict", content=image, headers={"Content-Type": "image/png"}, params={"cams": "all", "mc_samples": 20}
    )
    assert form.status_code == raw.status_code == 200, raw.text
    a, b = PredictionResponse.model_validate(form.json()), PredictionResponse.model_validate(raw.json())
    assert a.image == b.image
    assert a.gradcam.keys() == b.gradcam.keys()
    for label, finding in a.predictions.items():  # the same film; the MC draws differ from request to request
        assert abs(finding.conf - b.predictions[label].conf) < 0.1
    dicom = client.post("/predict", content=dicom_with_identifiers(), headers={"Content-Type": "application/dicom"})
    assert dicom.status_code == 200 and dicom.json()["image"]["format"] == "dicom"
    octets = client.post("/v1/preview", content=image, headers={"Content-Type": "application/octet-stream"})
    assert octets.status_code == 200 and octets.content.startswith(b"\x89PNG")


def test_raw_body_bad_input(client: httpx.Client) -> None:
    wrong_type = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert "multipart/form-data" in wrong_type.json()["detail"]
    empty = client.post("/v1/predict", content=b"", headers={"Content-Type": "image/png"})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    not_png = client.post("/v1/predict", content=b"GIF89a" + b"\0" * 64, headers={"Content-Type": "image/png"})
    assert not_png.status_code == 415  # sniffed from the bytes, whatever the header claims
    big = client.post(
        "/v1/predict", content=b"\x89PNG" + b"\0" * (9 * 1024 * 1024), headers={"Content-Type": "image/png"}
    )
    assert big.status_code == 413
    assert client.get("/readyz").status_code == 200


def test_openapi_documents_the_raw_body_beside_the_form(client: httpx.Client) -> None:
    body = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/dicom"} <= body.keys()


def test_body_over_the_limit_is_refused_while_streaming(client: httpx.Client) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must act on the bytes received
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for start in range(0, len(big), 256 * 1024):
            yield big[start : start + 256 * 1024]
        yield b"\r\n--xyz--\r\n"

    response = client.post(
        "/v1/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert client.get("/readyz").status_code == 200


def test_batch_endpoint_keeps_order_and_isolates_bad_files(client: httpx.Client) -> None:
    files = [
        ("files", ("a.png", png_bytes(seed=1), "image/png")),
        ("files", ("notes.txt", b"just text", "text/plain")),
        ("files", ("b.png", png_bytes(seed=2), "image/png")),
    ]
    response = client.post("/v1/predict/batch", files=files, params={"cams": "none"})
    assert response.status_code == 200, response.text
    body = BatchResponse.model_validate(response.json())
    assert [item.index for item in body.results] == [0, 1, 2]
    assert [item.filename for item in body.results] == ["a.png", "notes.txt", "b.png"]
    assert body.results[0].result is not None
    assert body.results[2].result is not None
    assert body.results[1].error is not None
    assert body.results[1].error.status == 415


def test_preview_renders_dicom_as_png(client: httpx.Client) -> None:
    response = post_file(client, pydicom_data("RG1_UNCR.dcm").read_bytes(), path="/v1/preview")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "L"
    assert max(image.size) == 1024


def test_metrics_and_offline_docs(client: httpx.Client) -> None:
    post_file(client, png_bytes())
    text = client.get("/metrics").text
    for series in (
        'cxr_http_requests_total{method="POST",route="/v1/predict",status="200"}',
        "cxr_http_request_duration_seconds_bucket",
        "cxr_queue_wait_seconds_count",
        "cxr_batch_size_images_count",
        "cxr_batch_inference_seconds_count",
        "cxr_images_processed_total",
        'cxr_model_info{name="tiny-test-model",version="1.2.3"} 1.0',
    ):
        assert series in text, series
    docs = client.get("/docs").text
    assert "/swagger-assets/swagger-ui-bundle.js" in docs
    assert "cdn" not in docs.lower()
    assert client.get("/swagger-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "PredictionResponse" in schema["components"]["schemas"]
    assert {"/v1/predict", "/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])


def test_api_keys_when_configured(tiny_service_checkpoint: Path) -> None:
    settings = tiny_settings(tiny_service_checkpoint, api_keys=["s3cret-key"], warmup=False)
    with live_server(settings) as live, live.client() as c:
        assert post_file(c, png_bytes()).status_code == 401
        wrong = c.post("/v1/predict", files={"file": ("x.png", png_bytes())}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        assert "s3cret" not in wrong.text
        ok = c.post("/v1/predict", files={"file": ("x.png", png_bytes())}, headers={"X-API-Key": "s3cret-key"})
        assert ok.status_code == 200
        bearer = c.post(
            "/v1/predict", files={"file": ("x.png", png_bytes())}, headers={"Authorization": "Bearer s3cret-key"}
        )
        assert bearer.status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_full_queue_answers_503_at_once_and_the_loop_stays_responsive(tiny_service_checkpoint: Path) -> None:
    settings = tiny_settings(tiny_service_checkpoint, max_queue=1, max_batch_images=1, max_wait_ms=0.0)
    with live_server(settings) as live:
        held = HeldInference(live)
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            with live.client() as c:
                results[name] = post_file(c, png_bytes(), cams="none")

        first = threading.Thread(target=send, args=("running",))
        first.start()
        with live.client() as c:
            held.wait_until_running()  # the first request holds the inference worker
            second = threading.Thread(target=send, args=("queued",))
            second.start()
            wait_until(lambda: live.state.batcher is not None and live.state.batcher.queue_depth == 1)
            rejected = post_file(c, png_bytes(), cams="none")
            assert rejected.status_code == 503
            assert int(rejected.headers["retry-after"]) >= 1
            assert c.get("/healthz").status_code == 200  # the event loop is not blocked by the model
        held.release()
        first.join(timeout=60)
        second.join(timeout=60)
        assert results["running"].status_code == 200
        assert results["queued"].status_code == 200


def test_a_failing_batch_fails_only_its_requests(tiny_service_checkpoint: Path) -> None:
    with live_server(tiny_settings(tiny_service_checkpoint)) as live, live.client() as c:
        predictor = live.state.predictor
        assert predictor is not None
        original = predictor.run
        calls = {"n": 0}

        def flaky_run(requests):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated CUDA error")
            return original(requests)

        predictor.run = flaky_run  # type: ignore[method-assign]
        failed = post_file(c, png_bytes(), cams="none")
        assert failed.status_code == 500
        assert failed.json()["request_id"] == failed.headers["x-request-id"]
        assert "simulated" not in failed.text  # internals stay in the logs
        assert post_file(c, png_bytes(), cams="none").status_code == 200
        assert c.get("/readyz").status_code == 200


def test_shutdown_finishes_accepted_requests(tiny_service_checkpoint: Path) -> None:
    settings = tiny_settings(tiny_service_checkpoint, max_batch_images=1)
    result: dict[str, httpx.Response] = {}
    with live_server(settings) as live:
        held = HeldInference(live)

        def send() -> None:
            with live.client() as c:
                result["r"] = post_file(c, png_bytes(), cams="none")

        sender = threading.Thread(target=send)
        sender.start()
        held.wait_until_running()  # accepted and in the model
        live.server.should_exit = True  # what SIGTERM does to uvicorn
        held.release()
        sender.join(timeout=60)
    assert result["r"].status_code == 200
