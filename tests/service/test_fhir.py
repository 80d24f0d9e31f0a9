"""FHIR R4 output: content negotiation on the predict endpoints and the DiagnosticReport / Bundle mapping.

Every FHIR body is validated with the ``fhir.resources`` models for R4B (4.3.0, the closest to R4 that
fhir.resources 8 ships; DiagnosticReport, Observation, Media, Device, Bundle and OperationOutcome have the
same structure in R4 and R4B). Those models check structure, data types and unknown elements but not
required-binding code values, so the tests check the codes themselves.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from PIL import Image

from service import fhir
from service.api.negotiation import FHIR_JSON, JSON, choose_media_type
from service.schemas import (
    BatchItem,
    BatchItemError,
    FindingPrediction,
    Heatmap,
    ImageInfo,
    ModelRef,
    OODResult,
    PredictionResponse,
    Referral,
    Timing,
)
from tests.service.live import LiveServer

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "diagnostic-report.json"
ISSUED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
INTERPRETATIONS = {"positive": "POS", "negative": "NEG", "uncertain": "IND"}


REASON_BY_DECISION = {"positive": "above_positive_threshold", "negative": "cleared", "uncertain": "between_thresholds"}


def finding(conf: float, decision: str) -> FindingPrediction:
    """A finding decided by a rule that clears below 0.1 and calls positive at 0.6 (consistent with ``decision``)."""
    return FindingPrediction(
        conf=conf,
        uncertainty=0.0025,
        std=0.05,
        mc_standard_error=0.0112,
        interval=(max(conf - 0.08, 0.0), min(conf + 0.08, 1.0)),
        mutual_information=0.004,
        decision=decision,  # type: ignore[arg-type]
        clear_below=0.1,
        positive_at=0.6,
        decided_on="conf",
        reason=REASON_BY_DECISION[decision],  # type: ignore[arg-type]
        threshold=0.5,
    )


def one_pixel_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 2)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prediction(
    *, uncertain: bool, cams: bool, ood: OODResult | None = None, cleared: bool = False
) -> PredictionResponse:
    """Two positive findings (plus an uncertain one), or with ``cleared`` a film the study rule cleared as normal."""
    if cleared:
        predictions = {"Cardiomegaly": finding(0.04, "negative"), "Pneumothorax": finding(0.03, "negative")}
    else:
        predictions = {
            "Cardiomegaly": finding(0.81, "positive"),
            "Pneumothorax": finding(0.03, "negative"),
            "Lung Lesion": finding(0.62, "positive"),
        }
    if uncertain:
        predictions["Pleural Effusion"] = finding(0.47, "uncertain")
    reasons = [
        *(["out_of_distribution"] if ood is not None and not ood.in_distribution else []),
        *([] if cleared else ["possible_finding"]),
        *(["uncertain_finding"] if uncertain else []),
    ]
    return PredictionResponse(
        request_id="req-42",
        model=ModelRef(name="demo-model", version="0.1.0+cal", sha256="ab" * 32),
        mc_samples=20,
        mc_seed="0123456789abcdef",
        predictions=predictions,
        decisions_withheld=["out_of_distribution"] if ood is not None and not ood.in_distribution else [],
        uncertain=uncertain,
        referral=Referral(refer=bool(reasons), reasons=reasons),  # type: ignore[arg-type]
        ood=ood,
        gradcam={"Cardiomegaly": Heatmap(png_base64=one_pixel_png(), width=2, height=2)} if cams else {},
        image=ImageInfo(format="png", width=512, height=512, photometric="L", warnings=[]),
        timing_ms=Timing(queue=1.0, inference=2.0, total=3.0),
    )


def contained(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in report.get("contained", []) if r["resourceType"] == kind]


def codes(concept: dict[str, Any], system: str) -> list[str]:
    return [c["code"] for c in concept.get("coding", []) if c["system"] == system]


def check_report(report: dict[str, Any]) -> DiagnosticReport:
    """R4B validation plus the invariants the models cannot check (codes, internal references)."""
    model = DiagnosticReport.model_validate(report)
    assert report["status"] == "preliminary"
    assert codes(report["category"][0], fhir.V2_0074) == ["RAD"]
    assert report["code"]["coding"] == [fhir.REPORT_CODE]
    assert "subject" not in report  # the service never receives patient identity
    ids = {r["id"] for r in report["contained"]}
    references = [r["reference"] for r in report["result"]] + [m["link"]["reference"] for m in report.get("media", [])]
    references += [study["reference"] for study in report.get("imagingStudy", [])]
    assert {ref.removeprefix("#") for ref in references} | {"model"} == ids, "every contained resource is referenced"
    device = contained(report, "Device")
    assert len(device) == 1 and device[0]["identifier"][0]["system"] == fhir.MODEL_SHA256_SYSTEM
    uncertain = []
    findings = [o for o in contained(report, "Observation") if o["id"] != "ood-gate"]
    for observation in findings:
        assert observation["status"] == "preliminary"
        assert observation["device"]["reference"] == "#model"
        assert observation["valueQuantity"]["code"] == "1" and 0 <= observation["valueQuantity"]["value"] <= 1
        label = observation["code"]["text"]
        assert codes(observation["code"], fhir.FINDING_SYSTEM) == [fhir.finding_code(label)]
        (interpretation,) = codes(observation["interpretation"][0], fhir.INTERPRETATION)
        assert interpretation in {"POS", "NEG", "IND"}
        assert ("note" in observation) == (interpretation == "IND")
        if interpretation == "IND":
            uncertain.append(label)
        component_codes = [code for c in observation["component"] for code in codes(c["code"], fhir.MEASURE_SYSTEM)]
        assert component_codes == [
            "mc-variance",
            "mc-std",
            "mc-interval-90",
            "mutual-information",
            "mc-standard-error",
            "clear-below-threshold",
            "positive-at-threshold",
            "decision-reason",
        ]
    referral = [
        c for c in report.get("conclusionCode", []) if codes(c, fhir.MEASURE_SYSTEM) == ["refer-to-radiologist"]
    ]
    ood = [o for o in contained(report, "Observation") if o["id"] == "ood-gate"]
    flagged = bool(ood) and codes(ood[0]["interpretation"][0], fhir.INTERPRETATION) == ["H"]
    assert bool(referral) == ("Refer to a radiologist" in report["conclusion"])
    if uncertain or flagged:
        assert referral, "an uncertain finding or a flagged image is always referred"
    for label in uncertain:
        assert label in report["conclusion"]
    return model


# --- content negotiation (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("application/json", JSON),
        ("application/fhir+json", FHIR_JSON),
        ("application/fhir+json; fhirVersion=4.0", FHIR_JSON),
        ('application/fhir+json;fhirversion="4.0.1"', FHIR_JSON),
        ("application/json+fhir", FHIR_JSON),
        ("Application/FHIR+JSON", FHIR_JSON),
        ("application/fhir+json, application/json", JSON),  # equally acceptable: the default
        ("application/fhir+json, */*;q=0.8", FHIR_JSON),
        ("application/json;q=0.5, application/fhir+json;q=0.9", FHIR_JSON),
        ("application/json;q=0.9, application/fhir+json;q=0.5", JSON),
        ("application/json;q=0, */*", FHIR_JSON),  # the most specific range decides JSON's weight
        ("application/fhir+json;q=0, */*", JSON),
        ("text/html, application/xhtml+xml, application/xml;q=0.9, */*;q=0.8", JSON),  # a browser
        ("application/json;q=bogus, application/fhir+json", FHIR_JSON),  # a malformed range is ignored
        ("garbage", JSON),  # nothing parseable: as if absent
        ("text/html", None),
        ("application/fhir+xml", None),
        ("application/fhir+json; fhirVersion=3.0", None),
        ("application/json;q=0, application/fhir+json;q=0", None),
    ],
)
def test_accept_header_picks_json_or_fhir(accept: str | None, chosen: str | None) -> None:
    assert choose_media_type(accept, (JSON, FHIR_JSON)) == chosen


# --- mapping (pure) ---------------------------------------------------------------------------------------


def test_report_maps_findings_decisions_and_referral() -> None:
    response = prediction(uncertain=True, cams=True)
    report = fhir.diagnostic_report(response, issued=ISSUED)
    model = check_report(report)
    assert model.issued is not None and report["issued"] == "2026-01-02T03:04:05.000+00:00"
    assert report["identifier"] == [{"system": fhir.REQUEST_ID_SYSTEM, "value": "req-42"}]

    observations = {o["code"]["text"]: o for o in contained(report, "Observation")}
    assert list(observations) == list(response.predictions)
    for label, o in observations.items():
        p = response.predictions[label]
        assert codes(o["interpretation"][0], fhir.INTERPRETATION) == [INTERPRETATIONS[p.decision]]
        assert o["valueQuantity"]["value"] == p.conf
        by_code = {c["code"]["coding"][0]["code"]: c for c in o["component"]}
        assert by_code["mc-variance"]["valueQuantity"]["value"] == p.uncertainty
        assert by_code["mc-std"]["valueQuantity"]["value"] == p.std
        interval = by_code["mc-interval-90"]["valueRange"]
        assert (interval["low"]["value"], interval["high"]["value"]) == p.interval
        assert by_code["mutual-information"]["valueQuantity"]["value"] == p.mutual_information
        # The rule that decided, never the legacy point threshold (0.5 here) that does not.
        assert by_code["clear-below-threshold"]["valueQuantity"]["value"] == p.clear_below
        assert by_code["positive-at-threshold"]["valueQuantity"]["value"] == p.positive_at
        assert codes(by_code["decision-reason"]["valueCodeableConcept"], fhir.REASON_SYSTEM) == [p.reason]
        assert by_code["mc-standard-error"]["valueQuantity"]["value"] == p.mc_standard_error
        assert "demo-model 0.1.0+cal" in o["method"]["text"] and "20 samples" in o["method"]["text"]
    # SNOMED CT only where the concept is unambiguous; the project code always.
    assert codes(observations["Cardiomegaly"]["code"], fhir.SNOMED) == ["8186001"]
    assert codes(observations["Pleural Effusion"]["code"], fhir.SNOMED) == ["60046008"]
    assert codes(observations["Lung Lesion"]["code"], fhir.SNOMED) == []

    text = report["conclusion"]
    assert (
        "Positive: Cardiomegaly (probability 0.81; cleared below 0.10, positive at 0.60; at or above the rule's "
        "positive threshold); Lung Lesion (probability 0.62; cleared below 0.10, positive at 0.60; at or above the "
        "rule's positive threshold)."
    ) in text
    assert (
        "Uncertain: Pleural Effusion (probability 0.47; cleared below 0.10, positive at 0.60; neither ruled out nor "
        "called positive by the rule)."
    ) in text
    assert "threshold 0.50" not in text
    assert "Refer to a radiologist for review (possible finding, uncertain finding)." in text
    assert "Pneumothorax" not in text
    assert "not a medical device" in text
    conclusion_codes = [c["coding"][0]["code"] for c in report["conclusionCode"]]
    assert conclusion_codes == ["cardiomegaly", "lung-lesion", "refer-to-radiologist"]

    (media,) = contained(report, "Media")
    assert media["content"]["contentType"] == "image/png"
    assert media["content"]["data"] == response.gradcam["Cardiomegaly"].png_base64
    assert codes(media["reasonCode"][0], fhir.FINDING_SYSTEM) == ["cardiomegaly"]
    assert report["media"] == [
        {"comment": "Grad-CAM heatmap: Cardiomegaly", "link": {"reference": "#gradcam-cardiomegaly"}}
    ]

    device = contained(report, "Device")[0]
    assert device["identifier"][0]["value"] == "ab" * 32
    assert device["version"] == [{"value": "0.1.0+cal"}]


def test_a_film_cleared_as_normal_has_no_referral_and_no_media() -> None:
    report = fhir.diagnostic_report(prediction(uncertain=False, cams=False, cleared=True), issued=ISSUED)
    check_report(report)
    assert "media" not in report and not contained(report, "Media")
    assert "Refer" not in report["conclusion"]
    assert "Cleared as normal under the model's risk-controlled referral rule." in report["conclusion"]
    assert "conclusionCode" not in report, "no positive finding and no referral: nothing to code"


@pytest.mark.parametrize("in_distribution", [True, False])
def test_out_of_distribution_gate_is_an_observation_and_flags_the_conclusion(in_distribution: bool) -> None:
    ood = OODResult(score=7.5 if in_distribution else 42.0, threshold=12.0, in_distribution=in_distribution)
    report = fhir.diagnostic_report(prediction(uncertain=False, cams=False, ood=ood, cleared=True), issued=ISSUED)
    check_report(report)
    (gate,) = [o for o in contained(report, "Observation") if o["id"] == "ood-gate"]
    assert {"reference": "#ood-gate", "display": "Out-of-distribution score"} in report["result"]
    assert gate["valueQuantity"]["value"] == ood.score
    assert gate["referenceRange"][0]["high"]["value"] == 12.0
    assert codes(gate["interpretation"][0], fhir.INTERPRETATION) == (["N"] if in_distribution else ["H"])
    conclusion_codes = [code for c in report.get("conclusionCode", []) for code in codes(c, fhir.MEASURE_SYSTEM)]
    if in_distribution:
        assert "does not look like" not in report["conclusion"] and conclusion_codes == []
    else:
        assert report["conclusion"].startswith("Preliminary AI result from model demo-model 0.1.0+cal. This image")
        assert conclusion_codes == ["out-of-distribution", "refer-to-radiologist"]


def test_report_requires_an_aware_issued_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        fhir.diagnostic_report(prediction(uncertain=False, cams=False), issued=datetime(2026, 1, 1))


def test_batch_bundle_keeps_order_with_operation_outcomes_for_failures() -> None:
    items = [
        BatchItem(index=0, filename="a.png", result=prediction(uncertain=False, cams=False)),
        BatchItem(index=1, filename="b.txt", error=BatchItemError(status=415, title="Unsupported", detail="text")),
    ]
    bundle = fhir.batch_bundle("req-7", items, issued=ISSUED)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["DiagnosticReport", "OperationOutcome"]
    issue = bundle["entry"][1]["resource"]["issue"][0]
    assert (issue["severity"], issue["code"]) == ("error", "not-supported")
    assert issue["diagnostics"] == "file 1 (b.txt): text"


def test_example_file_is_valid_and_current() -> None:
    """docs/examples/diagnostic-report.json (written by docs/examples/make_fhir_example.py) still matches."""
    report = json.loads(EXAMPLE.read_text())
    check_report(report)
    assert not contained(report, "Media")  # generated with cams=none to stay small


# --- over HTTP, with real radiographs ---------------------------------------------------------------------


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def radiographs(shared_data: Path) -> list[bytes]:
    folder = shared_data / "nih-cxr14-sample" / "images"
    return [(folder / name).read_bytes() for name in ("00000075_000.png", "00000211_000.png")]


def post(
    client: httpx.Client, data: bytes, accept: str | None, path: str = "/v1/predict", **params: str
) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    files = {"file": ("film.png", data, "image/png")}
    return client.post(path, files=files, params=params, headers=headers)


@pytest.mark.parametrize("path", ["/v1/predict", "/predict"])
def test_fhir_report_for_a_real_radiograph_with_heatmaps(
    client: httpx.Client, radiographs: list[bytes], server: LiveServer, path: str
) -> None:
    response = post(client, radiographs[0], "application/fhir+json", path, cams="all")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/fhir+json; fhirVersion=4.0"
    assert "accept" in response.headers["vary"].lower()
    report = response.json()
    check_report(report)
    assert report["identifier"][0]["value"] == response.headers["x-request-id"]
    loaded = server.state.loaded
    assert loaded is not None
    trained = list(loaded.spec.trained_labels)
    assert [o["code"]["text"] for o in contained(report, "Observation")] == trained
    media = contained(report, "Media")
    assert sorted(codes(m["reasonCode"][0], fhir.FINDING_SYSTEM)[0] for m in media) == sorted(
        fhir.finding_code(label) for label in trained
    )
    png = Image.open(io.BytesIO(base64.b64decode(media[0]["content"]["data"])))
    assert png.format == "PNG" and png.size == (media[0]["width"], media[0]["height"])
    device = contained(report, "Device")[0]
    assert (device["deviceName"][0]["name"], device["version"][0]["value"]) == ("tiny-test-model", "1.2.3")
    assert "imagingStudy" not in report, "a PNG has no DICOM study to reference"


def test_fhir_report_of_a_dicom_upload_references_its_study_by_uid(client: httpx.Client) -> None:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    path = Path(data_store.DataStore().get_path("RG1_UNCR.dcm"))
    source = pydicom.dcmread(path, stop_before_pixels=True)
    response = client.post(
        "/v1/predict",
        files={"file": ("film.dcm", path.read_bytes(), "application/dicom")},
        params={"cams": "none"},
        headers={"Accept": "application/fhir+json"},
    )
    assert response.status_code == 200, response.text
    report = response.json()
    check_report(report)
    (study,) = contained(report, "ImagingStudy")
    assert report["imagingStudy"] == [{"reference": "#study", "display": "The source DICOM study"}]
    assert study["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}]
    (series,) = study["series"]
    assert (series["uid"], series["instance"][0]["uid"]) == (source.SeriesInstanceUID, source.SOPInstanceUID)
    assert "reference" not in study["subject"], "the service never holds the patient's identity"
    for name in (str(source.get("PatientName") or "no-name-in-file"), str(source.get("PatientID") or "no-id")):
        assert name not in response.text


def test_fhir_report_without_heatmaps_when_cams_none(client: httpx.Client, radiographs: list[bytes]) -> None:
    response = post(client, radiographs[1], "application/fhir+json;q=1, application/json;q=0.5", cams="none")
    assert response.status_code == 200, response.text
    report = response.json()
    check_report(report)
    assert "media" not in report and not contained(report, "Media")


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/fhir+json;q=0.4, */*;q=0.5"])
def test_default_json_is_unchanged(client: httpx.Client, radiographs: list[bytes], accept: str | None) -> None:
    response = post(client, radiographs[0], accept, cams="none", mc_samples="2")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "accept" in response.headers["vary"].lower()
    body = PredictionResponse.model_validate(response.json())
    assert body.mc_samples == 2 and body.gradcam == {}


@pytest.mark.parametrize("accept", ["text/html", "application/fhir+json; fhirVersion=5.0", "application/xml"])
def test_unsatisfiable_accept_is_406_problem(client: httpx.Client, radiographs: list[bytes], accept: str) -> None:
    response = post(client, radiographs[0], accept)
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 406 and "application/fhir+json" in problem["detail"]


def test_errors_stay_problem_json_when_fhir_is_asked(client: httpx.Client) -> None:
    response = post(client, b"not an image at all", "application/fhir+json")
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"


def test_batch_as_a_fhir_bundle(client: httpx.Client, radiographs: list[bytes]) -> None:
    files = [
        ("files", ("a.png", radiographs[0], "image/png")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("b.png", radiographs[1], "image/png")),
    ]
    response = client.post(
        "/v1/predict/batch", files=files, params={"cams": "none"}, headers={"Accept": "application/fhir+json"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    assert bundle["identifier"]["value"] == response.headers["x-request-id"]
    resources = [e["resource"] for e in bundle["entry"]]
    assert [r["resourceType"] for r in resources] == ["DiagnosticReport", "OperationOutcome", "DiagnosticReport"]
    for index in (0, 2):
        check_report(resources[index])
        assert resources[index]["identifier"][0]["value"] == f"{bundle['identifier']['value']}-{index}"
    assert resources[1]["issue"][0]["code"] == "not-supported"
    assert "notes.txt" in resources[1]["issue"][0]["diagnostics"]


def test_openapi_documents_the_fhir_media_type(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/predict", "/predict", "/v1/predict/batch"):
        responses = paths[path]["post"]["responses"]
        sr = {"application/dicom"} if path != "/v1/predict/batch" else set()  # one DICOM image: an SR answer
        assert set(responses["200"]["content"]) == {"application/json", "application/fhir+json", *sr}, path
        assert "406" in responses, path
