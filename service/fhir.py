"""Prediction results as FHIR R4 resources: a ``DiagnosticReport`` per radiograph, a ``Bundle`` per batch.

Pure mapping (``PredictionResponse`` -> JSON-ready dict), no HTTP: the routes negotiate the media type and
call these functions. The report is self-contained, because a synchronous API has no FHIR server behind it
to resolve references: the per-finding ``Observation``s, the Grad-CAM ``Media`` and the model's ``Device``
are ``contained`` and referenced as ``#id``. The service never sees patient identity, so ``subject``,
``basedOn``, ``encounter`` and ``imagingStudy`` are left for the integration engine to fill. The codings
(project CodeSystems, LOINC, SNOMED CT, HL7 terminology) are documented in docs/fhir.md.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from bayesnet.decision import REASON_TEXT, Reason
from service.codes import SNOMED_BY_LABEL, finding_code
from service.schemas import BatchItem, BatchItemError, FindingPrediction, Heatmap, OODResult, PredictionResponse
from service.wording import DISCLAIMER, NO_CLEARING, OOD_WARNING, WITHHELD_WORDS

JSONDict = dict[str, Any]

PROJECT_URL = "https://github.com/bayesnet-cxr/bayesnet-cxr/fhir"
#: One code per CheXpert finding (kebab-case of the label), always present on a finding's Observation.
FINDING_SYSTEM = f"{PROJECT_URL}/CodeSystem/chexpert-finding"
#: The project's own measures: MC-dropout summaries, the method, the referral recommendation.
MEASURE_SYSTEM = f"{PROJECT_URL}/CodeSystem/bayesnet-cxr"
#: The API's finding reason codes (``predictions[label].reason``).
REASON_SYSTEM = f"{PROJECT_URL}/CodeSystem/finding-reason"
#: Identifier systems: the request id (X-Request-ID) and the sha256 of the model weights.
REQUEST_ID_SYSTEM = f"{PROJECT_URL}/sid/request-id"
MODEL_SHA256_SYSTEM = f"{PROJECT_URL}/sid/model-sha256"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
ISSUE_TYPE_BY_STATUS = {
    401: "security",
    413: "too-long",
    415: "not-supported",
    422: "invalid",
    503: "transient",
    504: "timeout",
}

#: The report's code: the LOINC/RSNA Playbook term for one chest radiograph. A site that orders a
#: different study (e.g. "XR Chest 2 Views") substitutes its own orderable code.
REPORT_CODE = {"system": LOINC, "code": "36554-4", "display": "XR Chest Single view"}

#: decision -> v3 ObservationInterpretation (IND: the MC samples disagree, so the result is indeterminate).
INTERPRETATION_BY_DECISION = {
    "positive": ("POS", "Positive"),
    "negative": ("NEG", "Negative"),
    "uncertain": ("IND", "Indeterminate"),
}


def finding_concept(label: str) -> JSONDict:
    """The CodeableConcept of a finding: the project coding, plus SNOMED CT where the concept is unambiguous."""
    codings: list[JSONDict] = [{"system": FINDING_SYSTEM, "code": finding_code(label), "display": label}]
    if label in SNOMED_BY_LABEL:
        code, display = SNOMED_BY_LABEL[label]
        codings.append({"system": SNOMED, "code": code, "display": display})
    return {"coding": codings, "text": label}


def _measure(code: str, display: str) -> JSONDict:
    return {"coding": [{"system": MEASURE_SYSTEM, "code": code, "display": display}]}


def _probability(value: float) -> JSONDict:
    """A probability in [0, 1] as a UCUM dimensionless Quantity."""
    return {"value": value, "unit": "probability", "system": UCUM, "code": "1"}


def _reason_words(reason: str) -> str:
    """A finding's reason code in a clinician's words (bayesnet.decision.REASON_TEXT, shared with the DICOM SR)."""
    return REASON_TEXT[Reason(reason)]


def _components(prediction: FindingPrediction) -> list[JSONDict]:
    """The finding's uncertainty and the rule that decided it (the thresholds it carries, the reason code)."""
    low, high = prediction.interval
    components: list[JSONDict] = [
        {"code": _measure("mc-variance", "MC-dropout variance"), "valueQuantity": _probability(prediction.uncertainty)},
        {"code": _measure("mc-std", "MC-dropout standard deviation"), "valueQuantity": _probability(prediction.std)},
        {
            "code": _measure("mc-interval-90", "MC-dropout 5th to 95th percentile"),
            "valueRange": {"low": _probability(low), "high": _probability(high)},
        },
        {
            "code": _measure("mutual-information", "Mutual information (epistemic uncertainty)"),
            "valueQuantity": {"value": prediction.mutual_information, "unit": "nat"},
        },
    ]
    if prediction.mc_standard_error is not None:
        components.append(
            {
                "code": _measure("mc-standard-error", "Monte-Carlo standard error of the mean probability"),
                "valueQuantity": _probability(prediction.mc_standard_error),
            }
        )
    on = "the mean probability" if prediction.decided_on == "conf" else "the MC interval"
    for code, display, value in (
        ("clear-below-threshold", f"Cleared when {on} is below", prediction.clear_below),
        ("positive-at-threshold", f"Positive when {on} reaches", prediction.positive_at),
    ):
        component: JSONDict = {"code": _measure(code, display)}
        if value is None:
            component["dataAbsentReason"] = {
                "coding": [{"system": DATA_ABSENT, "code": "not-applicable", "display": "Not Applicable"}],
                "text": "The model's rule has no such threshold for this finding",
            }
        else:
            component["valueQuantity"] = _probability(value)
        components.append(component)
    components.append(
        {
            "code": _measure("decision-reason", "Why this decision"),
            "valueCodeableConcept": {
                "coding": [{"system": REASON_SYSTEM, "code": prediction.reason}],
                "text": _reason_words(prediction.reason),
            },
        }
    )
    return components


def _model_text(response: PredictionResponse) -> str:
    model = response.model
    return f"{model.name} {model.version} (weights sha256 {model.sha256})"


def _observation(label: str, prediction: FindingPrediction, response: PredictionResponse, issued: str) -> JSONDict:
    code, display = INTERPRETATION_BY_DECISION[prediction.decision]
    observation: JSONDict = {
        "resourceType": "Observation",
        "id": f"finding-{finding_code(label)}",
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": finding_concept(label),
        "issued": issued,
        "valueQuantity": _probability(prediction.conf),
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}],
        "method": {
            "coding": [{"system": MEASURE_SYSTEM, "code": "mc-dropout", "display": "Monte-Carlo dropout"}],
            "text": f"Monte-Carlo dropout mean of {response.mc_samples} samples, model {_model_text(response)}",
        },
        "device": {"reference": "#model", "display": f"{response.model.name} {response.model.version}"},
        "component": _components(prediction),
    }
    if prediction.decision == "uncertain":
        observation["note"] = [{"text": f"{_reason_words(prediction.reason).capitalize()}: refer to a radiologist."}]
    return observation


def _ood_observation(ood: OODResult, issued: str) -> JSONDict:
    """The out-of-distribution gate as an Observation: the score against its threshold (the range's high)."""
    code, display = ("N", "Normal") if ood.in_distribution else ("H", "High")
    observation: JSONDict = {
        "resourceType": "Observation",
        "id": "ood-gate",
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": {**_measure("ood-score", "Out-of-distribution score"), "text": "Out-of-distribution score"},
        "issued": issued,
        "valueQuantity": {"value": ood.score, "unit": "score", "system": UCUM, "code": "1"},
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}],
        "referenceRange": [
            {
                "high": {"value": ood.threshold, "unit": "score", "system": UCUM, "code": "1"},
                "text": "Scores above the threshold: not like the training radiographs",
            }
        ],
        "device": {"reference": "#model"},
    }
    if not ood.in_distribution:
        observation["note"] = [{"text": OOD_WARNING}]
    return observation


def _refer(response: PredictionResponse) -> bool:
    """The response's own triage outcome (``referral.refer``): every reason it lists sends the film to a reader."""
    return response.referral.refer


def _device(response: PredictionResponse) -> JSONDict:
    model = response.model
    return {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": model.sha256}],
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "Chest radiograph classification software (Bayesian EfficientNet, Monte-Carlo dropout)"},
        "version": [{"value": model.version}],
        "note": [{"text": DISCLAIMER}],
    }


def _media(label: str, heatmap: Heatmap, issued: str) -> JSONDict:
    return {
        "resourceType": "Media",
        "id": f"gradcam-{finding_code(label)}",
        "status": "completed",
        "type": {"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}]},
        "reasonCode": [finding_concept(label)],
        "issued": issued,
        "device": {"reference": "#model"},
        "width": heatmap.width,
        "height": heatmap.height,
        "content": {
            "contentType": "image/png",
            "data": heatmap.png_base64,
            "title": f"Grad-CAM heatmap: {label}",
        },
        "note": [
            {
                "text": "PNG at the model's input resolution (indexed colour with a transparency table: it decodes to "
                "RGBA); alpha carries the Grad-CAM intensity. "
                "Stretch it over the whole radiograph to overlay it."
            }
        ],
    }


def _rule_text(p: FindingPrediction) -> str:
    """The thresholds that decided a finding, as the conclusion states them."""
    on = "" if p.decided_on == "conf" else " (on the MC interval)"
    clear = "cannot be ruled out" if p.clear_below is None else f"cleared below {p.clear_below:.2f}"
    positive = "never called positive" if p.positive_at is None else f"positive at {p.positive_at:.2f}"
    return f"{clear}, {positive}{on}"


def conclusion(response: PredictionResponse) -> str:
    """The report's conclusion: positive and uncertain findings with the rule that decided them, the referral.

    A film whose decisions are withheld (out of distribution, outside the intended population) lists no finding.
    """
    parts = [f"Preliminary AI result from model {response.model.name} {response.model.version}."]
    if response.ood is not None and not response.ood.in_distribution:
        parts.append(OOD_WARNING)
    if response.decisions_withheld:
        why = " and ".join(WITHHELD_WORDS[w] for w in response.decisions_withheld)
        parts.append(f"No findings are reported because {why}.")
    else:
        positive = [(lb, p) for lb, p in response.predictions.items() if p.decision == "positive"]
        uncertain = [(lb, p) for lb, p in response.predictions.items() if p.decision == "uncertain"]

        def listing(items: list[tuple[str, FindingPrediction]]) -> str:
            ordered = sorted(items, key=lambda item: -item[1].conf)
            return "; ".join(
                f"{label} (probability {p.conf:.2f}; {_rule_text(p)}; {_reason_words(p.reason)})"
                for label, p in ordered
            )

        if response.predictions and all(p.clear_below is None for p in response.predictions.values()):
            parts.append(NO_CLEARING)
        parts.append(f"Positive: {listing(positive)}." if positive else "No finding was decided positive.")
        if uncertain:
            parts.append(f"Uncertain: {listing(uncertain)}.")
    if _refer(response):
        reasons = ", ".join(reason.replace("_", " ") for reason in response.referral.reasons)
        parts.append(f"Refer to a radiologist for review ({reasons}).")
    else:
        parts.append("Cleared as normal under the model's risk-controlled referral rule.")
    parts.append(DISCLAIMER)
    return " ".join(parts)


@dataclass(frozen=True)
class StudyRef:
    """The DICOM study a DICOM upload belongs to, for the report's ``imagingStudy`` (UIDs only, no demographics)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None = None


def study_ref(source: Dataset) -> StudyRef:
    """The UIDs of a DICOM header (as read by :func:`service.dicom.dicom_source`) for :func:`diagnostic_report`."""
    return StudyRef(
        study_uid=str(source.StudyInstanceUID),
        series_uid=str(source.SeriesInstanceUID),
        sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
        modality=str(source.get("Modality") or "") or None,
    )


def _imaging_study(study: StudyRef) -> JSONDict:
    """The source study as a contained ``ImagingStudy``, identified as the DICOM SR to FHIR mapping does.

    ``subject`` is required by R4 but the service never holds the patient's identity: a display-only reference
    says so; a FHIR server that resolves the study by its UID links the real patient.
    """
    series: JSONDict = {
        "uid": study.series_uid,
        "instance": [
            {
                "uid": study.sop_instance_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{study.sop_class_uid}"},
            }
        ],
    }
    if study.modality:
        series["modality"] = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": study.modality}
    return {
        "resourceType": "ImagingStudy",
        "id": "study",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_uid}"}],
        "status": "available",
        "subject": {"display": "The patient of the source DICOM study (identity not held by this service)"},
        "series": [series],
    }


def diagnostic_report(response: PredictionResponse, *, issued: datetime, study: StudyRef | None = None) -> JSONDict:
    """One prediction as a FHIR R4 ``DiagnosticReport`` with contained Observations, Media and Device.

    ``issued`` must be timezone-aware (FHIR ``instant``); it is a parameter so the mapping stays pure. ``study``
    (DICOM uploads): the source study, contained as an ``ImagingStudy`` and referenced from ``imagingStudy``.
    """
    if issued.tzinfo is None:
        raise ValueError("issued must be timezone-aware: FHIR instants carry a time zone")
    when = issued.isoformat(timespec="milliseconds")
    # A flagged film's findings are not reported as if they applied: no finding Observations, no heatmaps.
    shown = {} if response.decisions_withheld else response.predictions
    observations = [_observation(lb, p, response, when) for lb, p in shown.items()]
    if response.ood is not None:
        observations.append(_ood_observation(response.ood, when))
    media = [] if response.decisions_withheld else [_media(lb, hm, when) for lb, hm in response.gradcam.items()]
    text = conclusion(response)
    conclusion_codes = [finding_concept(lb) for lb, p in response.predictions.items() if p.decision == "positive"]
    if response.ood is not None and not response.ood.in_distribution:
        conclusion_codes.append(_measure("out-of-distribution", "Image unlike the training radiographs"))
    if _refer(response):
        conclusion_codes.append(_measure("refer-to-radiologist", "Refer to a radiologist"))
    report: JSONDict = {
        "resourceType": "DiagnosticReport",
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(text, quote=False)}</p></div>',
        },
        "contained": [_device(response), *observations, *media],
        "identifier": [{"system": REQUEST_ID_SYSTEM, "value": response.request_id}],
        "status": "preliminary",
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [REPORT_CODE], "text": "Chest radiograph, AI findings"},
        "issued": when,
        "result": [{"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations],
        "conclusion": text,
    }
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    if media:
        report["media"] = [{"comment": m["content"]["title"], "link": {"reference": f"#{m['id']}"}} for m in media]
    if study is not None:
        report["contained"].append(_imaging_study(study))
        report["imagingStudy"] = [{"reference": "#study", "display": "The source DICOM study"}]
    return report


def operation_outcome(error: BatchItemError, *, index: int, filename: str | None) -> JSONDict:
    """A failed batch item as an ``OperationOutcome`` (the problem details' status, title and detail)."""
    where = f"file {index}" + (f" ({filename})" if filename else "")
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": ISSUE_TYPE_BY_STATUS.get(error.status, "exception"),
                "details": {"text": f"{error.status} {error.title}"},
                "diagnostics": f"{where}: {error.detail}",
            }
        ],
    }


def batch_bundle(request_id: str, items: Sequence[BatchItem], *, issued: datetime) -> JSONDict:
    """A batch as a ``collection`` Bundle: one entry per uploaded file, in upload order.

    A file that was scored is a ``DiagnosticReport``; one that failed is an ``OperationOutcome``.
    """
    entries: list[JSONDict] = []
    for item in items:
        if item.result is not None:
            entries.append({"resource": diagnostic_report(item.result, issued=issued)})
        elif item.error is not None:
            entries.append({"resource": operation_outcome(item.error, index=item.index, filename=item.filename)})
        else:
            raise ValueError(f"batch item {item.index} has neither a result nor an error")
    return {
        "resourceType": "Bundle",
        "identifier": {"system": REQUEST_ID_SYSTEM, "value": request_id},
        "type": "collection",
        "timestamp": issued.isoformat(timespec="milliseconds"),
        "entry": entries,
    }
