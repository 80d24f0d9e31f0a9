"""One film, one answer, as a hospital integrator meets it: the shipped demo model on a real loopback server.

The same film posted 10 times among 16 concurrent clients posting other films gets the same numbers, decisions,
referral and heatmaps; every finding's decision follows from the thresholds its own response carries; declared
patient age and view decide whether a PNG can be cleared; a flagged film's decisions are withheld in the JSON, the
FHIR report and the DICOM SR; the archive scorer and ``train evaluate`` give the numbers the service gives.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from csv import DictReader
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from skimage import data as skimage_data

from bayesnet import load_checkpoint
from service.archive import DistInfo, build_parser, run
from service.dicom.sr import read_sr_findings
from service.schemas import FindingPrediction, PredictionResponse
from tests.service.live import LiveServer, live_server, tiny_settings
from train.predict import collect, sigmoid, weights_sha256_of

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"
FILM = "00007833_000.png"  # the film of the user test: Atelectasis flipped between positive and uncertain
CLIENTS = 16
REPEATS = 10


@pytest.fixture(scope="module")
def films(shared_data: Path) -> list[Path]:
    folder = shared_data / "nih-cxr14-sample" / "images"
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def demo() -> Iterator[LiveServer]:
    if not (DEMO / "model.json").is_file():
        pytest.skip("models/demo is absent")
    with live_server(tiny_settings(DEMO, max_queue=256, request_timeout_s=120.0)) as live:
        yield live


def post(client: httpx.Client, data: bytes, **params: Any) -> httpx.Response:
    return client.post("/v1/predict", params=params, files={"file": ("film.png", data)})


def follows_from_its_thresholds(p: FindingPrediction) -> bool:
    """Recompute the decision from the rule the finding carries, as a client would."""
    if p.reason.startswith("withheld_"):
        return p.decision == "uncertain"
    low, high = (p.conf, p.conf) if p.decided_on == "conf" else (p.interval[1], p.interval[0])
    cleared = p.clear_below is not None and low < p.clear_below
    positive = p.positive_at is not None and high >= p.positive_at
    if p.reason == "no_rule_mc_disagreement":
        return p.decision == "uncertain"
    expected = "negative" if cleared and not positive else "positive" if positive and not cleared else "uncertain"
    return p.decision == expected


def alpha(png_base64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGBA")
    return np.asarray(image, dtype=np.int16)[..., 3]


def test_the_same_film_among_16_busy_clients_gets_the_same_answer_every_time(
    demo: LiveServer, films: list[Path]
) -> None:
    target = next(f for f in films if f.name == FILM).read_bytes()
    others = [f.read_bytes() for f in films if f.name != FILM]
    answers: list[PredictionResponse] = []
    other_answers: list[PredictionResponse] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        with demo.client() as http:
            for _ in range(REPEATS if index == 0 else 6):
                data = target if index == 0 else rng.choice(others)
                reply = post(http, data, cams="auto")
                assert reply.status_code == 200, reply.text
                body = PredictionResponse.model_validate(reply.json())
                with lock:
                    (answers if index == 0 else other_answers).append(body)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client, i) for i in range(CLIENTS)]:
            future.result()

    assert len(answers) == REPEATS and len(other_answers) == (CLIENTS - 1) * 6
    first = answers[0]
    for body in answers[1:]:
        assert body.mc_seed == first.mc_seed
        assert body.referral == first.referral and body.uncertain == first.uncertain
        assert body.gradcam.keys() == first.gradcam.keys()
        for label, p in body.predictions.items():
            q = first.predictions[label]
            assert (p.decision, p.reason, p.clear_below, p.positive_at) == (
                q.decision,
                q.reason,
                q.clear_below,
                q.positive_at,
            )
            assert p.conf == pytest.approx(q.conf, abs=1e-5)
            assert p.interval == pytest.approx(q.interval, abs=1e-5)
        for label, heatmap in body.gradcam.items():
            assert np.abs(alpha(heatmap.png_base64) - alpha(first.gradcam[label].png_base64)).max() <= 1
    assert len({b.mc_seed for b in other_answers} | {first.mc_seed}) > 10  # other films, other seeds
    for body in [*answers, *other_answers]:
        assert all(follows_from_its_thresholds(p) for p in body.predictions.values())
        assert all(p.mc_standard_error is not None and p.mc_standard_error <= p.std for p in body.predictions.values())


def test_the_answer_survives_a_restart(demo: LiveServer, films: list[Path]) -> None:
    data = films[0].read_bytes()
    with demo.client() as http:
        before = PredictionResponse.model_validate(post(http, data, cams="none").json())
    with live_server(tiny_settings(DEMO)) as fresh, fresh.client() as http:
        after = PredictionResponse.model_validate(post(http, data, cams="none").json())
    assert after.mc_seed == before.mc_seed
    for label, p in after.predictions.items():
        assert p.conf == before.predictions[label].conf  # same batch composition (alone): bitwise
        assert p.decision == before.predictions[label].decision


def test_the_demo_model_says_it_cannot_clear_and_shows_its_evidence(demo: LiveServer) -> None:
    with demo.client() as http:
        card = http.get("/v1/model").json()
    assert card["can_clear"] is False  # no finding has a clear-below threshold at the stated guarantee
    evidence = card["evidence"]
    assert set(evidence) == set(card["trained_labels"])
    atelectasis = evidence["Atelectasis"]
    assert atelectasis["ci_low"] < 0.5 < atelectasis["ci_high"] and atelectasis["better_than_chance"] is False
    assert all(e["n_films"] == 60 and "optimistic" in e["source"] for e in evidence.values())
    assert any(e["better_than_chance"] for e in evidence.values())


def test_a_png_is_cleared_only_for_a_declared_adult_frontal_film(demo: LiveServer, films: list[Path]) -> None:
    data = films[3].read_bytes()
    with demo.client() as http:
        nothing = PredictionResponse.model_validate(post(http, data, cams="none").json())
        adult_pa = PredictionResponse.model_validate(post(http, data, cams="none", patient_age=54, view="PA").json())
        child = PredictionResponse.model_validate(post(http, data, patient_age=5).json())
        lateral = PredictionResponse.model_validate(post(http, data, patient_age=40, view="LATERAL").json())
        bad_view = post(http, data, view="sideways")
        bad_age = post(http, data, patient_age=-3)
    assert nothing.referral.refer and "population_unverified" in nothing.referral.reasons
    assert not nothing.referral.population_verified and nothing.referral.population_missing == ["age", "view"]
    assert "population_unverified" not in adult_pa.referral.reasons and adult_pa.referral.population_verified
    assert adult_pa.mc_seed == nothing.mc_seed  # declarations change the verdict, never the numbers
    for flagged, why in ((child, "paediatric"), (lateral, "lateral_or_oblique_view")):
        assert flagged.referral.refer and flagged.referral.population == [why]
        assert "outside_intended_population" in flagged.referral.reasons
        assert not {"possible_finding", "uncertain_finding", "not_cleared_as_normal"} & set(flagged.referral.reasons)
        assert flagged.decisions_withheld == ["outside_intended_population"]
        assert all(
            p.decision == "uncertain" and p.reason == "withheld_outside_population"
            for p in flagged.predictions.values()
        )
        assert flagged.gradcam == {}  # cams=auto draws nothing for a film no finding is shown for
        for label, p in flagged.predictions.items():  # the numbers stay, for integrators
            assert p.conf == nothing.predictions[label].conf
    assert bad_view.status_code == 422 and bad_age.status_code == 422


def test_a_photo_is_withheld_in_json_fhir_and_sr(demo: LiveServer) -> None:
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format="PNG")
    with demo.client() as http:
        body = PredictionResponse.model_validate(post(http, buffer.getvalue()).json())
        report = http.post(
            "/v1/predict", files={"file": ("photo.png", buffer.getvalue())}, headers={"Accept": "application/fhir+json"}
        ).json()
    assert body.ood is not None and not body.ood.in_distribution
    assert body.decisions_withheld == ["out_of_distribution"] and body.gradcam == {}
    assert body.referral.reasons == ["out_of_distribution"]
    assert all(p.reason == "withheld_out_of_distribution" for p in body.predictions.values())
    observations = [r for r in report["contained"] if r["resourceType"] == "Observation"]
    assert [o["id"] for o in observations] == ["ood-gate"]  # no finding reported as if it applied
    assert (
        "No findings are reported because the image does not look like a frontal chest radiograph"
        in report["conclusion"]
    )
    assert "Positive:" not in report["conclusion"]


def test_a_dicom_sr_carries_the_deciding_rule(demo: LiveServer, shared_data: Path) -> None:
    data = (shared_data / "originals" / "siim-chest-cr-jpeg-baseline.dcm").read_bytes()
    with demo.client() as http:
        body = PredictionResponse.model_validate(post(http, data, cams="none").json())
        sr = http.post(
            "/v1/predict",
            params={"cams": "none"},
            files={"file": ("film.dcm", data)},
            headers={"Accept": "application/dicom"},
        )
    assert sr.status_code == 200, sr.text
    findings, refer, reasons = read_sr_findings(pydicom.dcmread(io.BytesIO(sr.content)))
    assert refer == body.referral.refer and reasons == list(body.referral.reasons)
    if body.decisions_withheld:
        assert findings == {}
    else:
        assert set(findings) == set(body.predictions)
        for label, p in body.predictions.items():
            f = findings[label]
            assert (f.decision, f.reason, f.clear_below) == (p.decision, p.reason, p.clear_below)
            assert f.positive_at == pytest.approx(p.positive_at) if p.positive_at is not None else f.positive_at is None


def test_openapi_documents_the_declared_fields_reasons_and_the_dicom_answer(demo: LiveServer) -> None:
    with demo.client() as http:
        schema = http.get("/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    names = {p["name"] for p in predict["parameters"]}
    assert {"patient_age", "view", "cams", "mc_samples"} <= names
    assert "application/dicom" in predict["responses"]["200"]["content"]
    batch = schema["paths"]["/v1/predict/batch"]["post"]
    assert {"patient_age", "view"} <= {p["name"] for p in batch["parameters"]}
    finding = schema["components"]["schemas"]["FindingPrediction"]["properties"]
    assert {"clear_below", "positive_at", "decided_on", "reason", "mc_standard_error"} <= set(finding)
    assert "cannot_be_cleared_by_this_model" in str(finding["reason"])
    referral = schema["components"]["schemas"]["Referral"]["properties"]
    assert "population_unverified" in str(referral["reasons"])
    assert "mc_seed" in schema["components"]["schemas"]["PredictionResponse"]["properties"]


def test_the_archive_scorer_and_train_evaluate_give_the_services_numbers(
    demo: LiveServer, shared_data: Path, tmp_path: Path
) -> None:
    lines = (shared_data / "nih-cxr14-sample" / "valid.csv").read_text().splitlines(keepends=True)
    (tmp_path / "nih-cxr14-sample").symlink_to(shared_data / "nih-cxr14-sample")
    csv = tmp_path / "subset" / "three.csv"  # paths resolve against the CSV folder's parent, as in CheXpert
    csv.parent.mkdir()
    csv.write_text("".join(lines[:4]))
    paths = [shared_data / row["Path"] for row in DictReader(io.StringIO(csv.read_text()))]
    folder = tmp_path / "archive"
    folder.mkdir()
    for path in paths:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "out.jsonl"
    run(build_parser().parse_args(["--input", str(folder), "--out", str(out), "--model", str(DEMO)]), DistInfo(0, 1, 0))
    archived = {
        line["path"]: PredictionResponse.model_validate(line["result"])
        for line in map(json.loads, out.read_text().splitlines())
    }
    model, spec = load_checkpoint(DEMO)
    preds = collect(
        model, spec, csv, policy="chexpert", mc_samples=spec.mc_samples, weights_sha256=weights_sha256_of(DEMO)
    )
    evaluated = sigmoid(preds.mc_logits / np.array(spec.temperature)).mean(axis=0)  # (N, K), as evaluate scores it
    with demo.client() as http:
        for i, path in enumerate(paths):
            served = PredictionResponse.model_validate(post(http, path.read_bytes(), cams="none").json())
            mine = archived[path.name]
            assert mine.mc_seed == served.mc_seed
            for label, p in served.predictions.items():
                assert mine.predictions[label].conf == pytest.approx(p.conf, abs=1e-5)
                assert mine.predictions[label].decision == p.decision
                assert evaluated[i, spec.label_index(label)] == pytest.approx(p.conf, abs=1e-5)
