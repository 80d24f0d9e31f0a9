"""A prediction as a DICOM Structured Report: Comprehensive 3D SR with TID 1500 Measurement Report as its root.

The content follows IHE AI Results (AIR): every finding present / absent / indeterminate (from ``decision``) with
its Monte-Carlo mean probability (one concept per finding, "<label> probability (MC dropout mean)") and standard
deviation, the thresholds and reason of the rule that decided, and the referral with its reasons. A finding with a
heatmap is a planar ROI measurement group (TID 1410) whose region is the heatmap's hot spot on the source image;
the other findings and the referral are TID 1500's report-level qualitative evaluations, because OHIF (3.13) fails
on a measurement group without coordinates and ignores that container (docs/dicom.md, "Reading the result in
OHIF"). The algorithm is named in Algorithm Identification (TID 4019) and in the Contributing Equipment Sequence
with purpose "Processing Algorithm", as AIR asks. The source radiograph is the evidence (Current Requested
Procedure Evidence Sequence and the Image Library), the SR joins the source's study in a new series, and highdicom
copies the source's patient and study modules so a PACS can file it; header values invalid for their VR or
meaningless (a zero pixel spacing) are left out first, each with a warning (``checked_source``). Nothing else from
the source header is copied, and none of it is logged.

Built from highdicom's information model (``MeasurementReport``, ``QualitativeEvaluation``, content items), never
by setting tags one by one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.config import RAISE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import validate_value

from bayesnet import sniff_format
from bayesnet.decision import REASON_TEXT, Reason
from bayesnet.labels import CHEXPERT_LABELS
from service.codes import SNOMED_BY_LABEL, finding_code
from service.schemas import PredictionResponse

#: Private coding scheme (PS3.3 8.2: "99" prefix) for the project's own concepts.
SCHEME = "99BAYESCXR"
MANUFACTURER = "bayesnet-cxr"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "bayesnet-cxr AI result (research use only)"

PROCEDURE = CodedConcept("36554-4", "LN", "XR Chest Single view")
#: Code value prefix of a finding's probability (MC mean) concept: ``probability_concept``.
PROBABILITY_PREFIX = "prob-"
MC_STD = CodedConcept("MCSTD", SCHEME, "Monte-Carlo dropout standard deviation")
CLEAR_BELOW = CodedConcept("CLEARBELOW", SCHEME, "Rule: cleared below this score")
POSITIVE_AT = CodedConcept("POSITIVEAT", SCHEME, "Rule: positive at this score")
DECISION_REASON = CodedConcept("DECREASON", SCHEME, "Decision reason")
WITHHELD = CodedConcept("WITHHELD", SCHEME, "Finding decisions withheld")
MC_DROPOUT = CodedConcept("MCDROPOUT", SCHEME, "Monte-Carlo dropout")
PROBABILITY_UNIT = CodedConcept("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
METHOD = CodedConcept("370129005", "SCT", "Measurement Method")
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")
REFER = CodedConcept("REFER", SCHEME, "Refer to a radiologist")
REFERRAL_REASON = CodedConcept("REFREASON", SCHEME, "Referral reason")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
INDETERMINATE = CodedConcept("82334004", "SCT", "Indeterminate")
VALUE_BY_DECISION = {"positive": PRESENT, "negative": ABSENT, "uncertain": INDETERMINATE}

#: Referral reason codes (service.schemas.Referral) -> code meanings.
REASON_MEANINGS = {
    "possible_finding": "A finding decided positive",
    "uncertain_finding": "A finding neither cleared nor positive",
    "not_cleared_as_normal": "Film not confidently normal",
    "out_of_distribution": "Out-of-distribution image",
    "outside_intended_population": "Outside the intended population",
    "population_unverified": "Intended population not verified",
    "no_referral_rule": "No fitted referral rule",
    "shadow_mode": "Rule in shadow mode: every film read",
    "guarantee_suspended": "Rule's guarantee suspended",
}

# Type 2 attributes of the patient and general study modules that highdicom reads from the source; a source
# that lacks them gets them empty (as type 2 allows), never invented.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class DicomSourceError(ValueError):
    """The upload is not a DICOM image that an SR can reference; the message completes "an SR needs DICOM, and ..."."""


def dicom_source(data: bytes) -> Dataset:
    """The upload's DICOM header without its pixels (what the SR copies from and references).

    Content-sniffed like every upload (``bayesnet.sniff_format``): the file name and part headers are not evidence.
    """
    return checked_source(data)[0]


def checked_source(data: bytes) -> tuple[Dataset, list[str]]:
    """:func:`dicom_source` and what it left out: one warning per header value the result objects do not copy
    (:func:`with_header_warnings` puts them in the answer and so in the audit record). The warnings name the
    attribute, never its value."""
    kind = sniff_format(data)
    if kind != "dicom":
        raise DicomSourceError(f"this upload is {'a ' + kind.upper() + ' image' if kind else 'not a DICOM file'}")
    try:
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except Exception as err:  # pydicom raises many types for a damaged header; the sender learns which
        raise DicomSourceError(f"its DICOM header could not be read ({type(err).__name__})") from err
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if k not in source]
    if missing:
        raise DicomSourceError(f"its DICOM header lacks {', '.join(missing)}, so a result cannot reference it")
    warnings = _drop_invalid_values(source)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in source:
            setattr(source, keyword, None)
    for keyword in ("PatientName", "ReferringPhysicianName"):
        # A one-component name ("Smith") is valid DICOM, but highdicom warns about it with the name in the message,
        # and warnings reach logs: the same name with its empty trailing components spelled out ("Smith^", PS3.5
        # 6.2.1) is identical in meaning and draws no warning.
        name = str(source.get(keyword) or "")
        if name and "^" not in name and "=" not in name:
            setattr(source, keyword, name + "^")
    return source, warnings


def with_header_warnings(result: PredictionResponse, warnings: Sequence[str]) -> PredictionResponse:
    """``result`` with ``warnings`` (from :func:`checked_source`) added to ``image.warnings``."""
    if not warnings:
        return result
    image = result.image.model_copy(update={"warnings": [*result.image.warnings, *warnings]})
    return result.model_copy(update={"image": image})


#: Spacings a derived object may copy (the SR's Image Library describes the film with them): a zero or negative
#: value, as some exports carry ("0.000\\0.000"), is no spacing, and a viewer that trusts it shows nothing.
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def _drop_invalid_values(source: Dataset) -> list[str]:
    """Remove header values that are invalid for their VR (``Patient's Age`` "62" for "062Y") or meaningless (a zero
    pixel spacing) so the objects that copy them stay valid and displayable; a type 2 attribute is emptied instead.
    Unique identifiers are left: the SR needs them as sent. Returns one warning per value removed.
    """
    warnings = []
    for element in list(source):
        if element.VR in ("SQ", "UI") or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        problem = "is not valid for its value representation"
        try:
            for value in values:
                # pydicom keeps DS and IS values as numbers that remember their text; the text is what is checked.
                validate_value(element.VR, str(value) if element.VR in ("DS", "IS") else value, RAISE)
            if element.keyword in _SPACINGS and any(float(value) <= 0 for value in values):
                problem = "is zero or negative"
                raise ValueError(problem)
        except (ValueError, TypeError):
            name = element.keyword or str(element.tag)
            if element.keyword in _TYPE2_PATIENT_STUDY:
                element.value = None
                warnings.append(f"DICOM header: {name} {problem}; the AI result objects carry it empty")
            else:
                del source[element.tag]
                warnings.append(f"DICOM header: {name} {problem}; the AI result objects leave it out")
    return warnings


def probability_concept(label: str) -> CodedConcept:
    """The concept of a finding's probability (the MC mean), one per finding, so its name travels with the number:
    OHIF labels a region only with its measurements' names and values ("Consolidation probability (MC dropout
    mean): 0.75")."""
    return CodedConcept(PROBABILITY_PREFIX + finding_code(label), SCHEME, f"{label} probability (MC dropout mean)")


def finding_concept(label: str) -> CodedConcept:
    """SNOMED CT where the concept is unambiguous (as in the FHIR mapping), else the project code."""
    if label in SNOMED_BY_LABEL:
        code, meaning = SNOMED_BY_LABEL[label]
        return CodedConcept(code, "SCT", meaning)
    return CodedConcept(finding_code(label), SCHEME, label)


@dataclass(frozen=True)
class SRFinding:
    """One finding as read back from an SR (what the tests compare with the JSON answer)."""

    decision: str
    conf: float
    std: float
    reason: str
    clear_below: float | None
    positive_at: float | None


def _algorithm(result: PredictionResponse) -> hd.sr.AlgorithmIdentification:
    model = result.model
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights sha256 {model.sha256}", f"MC samples {result.mc_samples}"],
        manufacturer=MANUFACTURER,
    )


def _measurement_items(
    label: str, result: PredictionResponse
) -> tuple[CodedConcept, CodedConcept, list[tuple[CodedConcept, float]]]:
    """A finding's coded value, the reason code of the rule that decided, and its numbers (MC mean and standard
    deviation, the thresholds the rule has), as the JSON answer carries them."""
    prediction = result.predictions[label]
    reason = CodedConcept(prediction.reason, SCHEME, REASON_TEXT[Reason(prediction.reason)])
    numbers = [(probability_concept(label), prediction.conf), (MC_STD, prediction.std)]
    numbers += [
        (name, value)
        for name, value in ((CLEAR_BELOW, prediction.clear_below), (POSITIVE_AT, prediction.positive_at))
        if value is not None
    ]
    return VALUE_BY_DECISION[prediction.decision], reason, numbers


def _region_group(
    label: str,
    source: Dataset,
    result: PredictionResponse,
    algorithm: hd.sr.AlgorithmIdentification,
    spot: tuple[float, float],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A finding with a region: a planar ROI group (TID 1410) whose region is ``spot`` (where its heatmap is hottest,
    ``(column, row)`` in the film's pixels) on the source image, so a viewer that shows SR content as image
    annotations (OHIF) can place and list it."""
    concept = finding_concept(label)
    value, reason, numbers = _measurement_items(label, result)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([spot], dtype=np.float32),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
        referenced_region=region,
        finding_type=concept,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=value),
            hd.sr.QualitativeEvaluation(name=DECISION_REASON, value=reason),
        ],
        measurements=[
            hd.sr.Measurement(name=name, value=number, unit=PROBABILITY_UNIT, method=MC_DROPOUT, algorithm_id=algorithm)
            for name, number in numbers
        ],
    )


def _number(name: CodedConcept, value: float) -> hd.sr.NumContentItem:
    item = hd.sr.NumContentItem(
        name=name, value=value, unit=PROBABILITY_UNIT, relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.CodeContentItem(METHOD, MC_DROPOUT, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)]
    )
    return item


def _code_item(
    name: CodedConcept,
    value: CodedConcept,
    relationship: hd.sr.RelationshipTypeValues,
    children: Sequence[hd.sr.ContentItem] = (),
) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(name=name, value=value, relationship_type=relationship)
    if children:
        item.ContentSequence = hd.sr.ContentSequence(children)
    return item


def _qualitative_evaluations(
    labels: Sequence[str], result: PredictionResponse, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.ContainerContentItem:
    """What has no region on the image, at the report level (TID 1500's "Qualitative Evaluations" container): each
    such finding as a coded value with its numbers and reason as properties, then the referral and its reasons.

    Not measurement groups: OHIF (3.13) hydrates every group under "Imaging Measurements" as an image annotation
    and fails on one without coordinates (its viewport stays black), while it leaves this container alone."""
    has_properties = hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = [*algorithm]  # TID 4019, as in a measurement group
    for label in labels:
        value, reason, numbers = _measurement_items(label, result)
        children = [
            *(_number(name, number) for name, number in numbers),
            _code_item(DECISION_REASON, reason, has_properties),
        ]
        items.append(_code_item(finding_concept(label), value, contains, children))
    referral = result.referral
    reasons: list[hd.sr.ContentItem] = [
        _code_item(REFERRAL_REASON, CodedConcept(reason, SCHEME, REASON_MEANINGS[reason]), has_properties)
        for reason in referral.reasons
    ]
    if result.decisions_withheld:
        reasons.append(_code_item(WITHHELD, YES, has_properties))
    items.append(_code_item(REFER, YES if referral.refer else NO, contains, reasons))
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _placeholder_group(algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group :class:`highdicom.sr.MeasurementReport` accepts, removed with its container before the SR is built."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="placeholder"), algorithm_id=algorithm
    )


def _has_library_descriptors(source: Dataset) -> bool:
    """Whether highdicom can describe ``source`` in the Image Library (TID 1602 needs its pixel spacing).

    Without them the image is still referenced: in the evidence sequence and in every measurement group.
    """
    try:
        hd.sr.ImageLibraryEntryDescriptors(source)
    except (AttributeError, ValueError):
        return False
    return True


def build_sr(
    source: Dataset,
    result: PredictionResponse,
    *,
    created: datetime,
    derived: Sequence[Dataset] = (),
    spots: Mapping[str, tuple[float, float]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of ``result`` for the image whose header is ``source`` (from :func:`dicom_source`).

    ``derived``: the other objects made for the same result (the result page and the heatmap images), listed beside
    the source in the evidence so the SR names every object of the result. ``spots``: per finding, where its
    heatmap is hottest on the source image (``service.dicom.heatmaps.hot_spots``); those findings get a region.
    """
    algorithm = _algorithm(result)
    # A film whose decisions are withheld (flagged by a gate) reports no finding as if it applied.
    labels = [] if result.decisions_withheld else list(result.predictions)
    spots = spots or {}
    groups = [_region_group(label, source, result, algorithm, spots[label]) for label in labels if label in spots]
    evaluations = _qualitative_evaluations([label for label in labels if label not in spots], result, algorithm)
    # One device UID per weights file, the same in every SR it writes (derived from the sha256, not random).
    device_uid = generate_uid(entropy_srcs=[MANUFACTURER, result.model.name, result.model.sha256])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=result.model.name, manufacturer_name=MANUFACTURER, model_name=result.model.name
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=PROCEDURE,
        # highdicom insists on at least one group (it builds TID 1500's "Imaging Measurements" row only); a film
        # with no region gets the report without that container (the template's other rows may stand alone).
        imaging_measurements=groups or [_placeholder_group(algorithm)],
        referenced_images=[source] if _has_library_descriptors(source) else None,
    )
    root = report[0].ContentSequence
    if not groups:
        del root[next(i for i, item in enumerate(root) if _item_name(item) == IMAGING_MEASUREMENTS)]
    root.append(evaluations)
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=result.model.name,
        software_versions=[result.model.version, result.model.sha256],
        contribution_datetime=created,
        contribution_description=(
            f"{result.model.name} {result.model.version}, weights sha256 {result.model.sha256}, "
            f"Monte-Carlo dropout with {result.mc_samples} samples"
        ),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, *derived],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        contributing_equipment=[equipment],
        series_description=SR_SERIES_DESCRIPTION,
        content_date=created.date(),
        content_time=created.time(),
    )
    return sr


def sr_answer(
    source: Dataset,
    result: PredictionResponse,
    created: datetime,
    derived: Sequence[Dataset] = (),
    spots: Mapping[str, tuple[float, float]] | None = None,
) -> bytes:
    """:func:`build_sr` as a Part 10 file: what ``POST /v1/predict`` answers for ``Accept: application/dicom``."""
    return sr_bytes(build_sr(source, result, created=created, derived=derived, spots=spots))


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (explicit VR little endian)."""
    buffer = io.BytesIO()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _concept(value: object) -> CodedConcept:
    if not isinstance(value, CodedConcept):
        raise ValueError(f"expected a coded value, got {type(value).__name__}")
    return value


def _code(value: object) -> str:
    return str(_concept(value).value)


def read_sr_findings(sr: Dataset) -> tuple[dict[str, SRFinding], bool, list[str]]:
    """``(findings by label, refer, reasons)`` read back from an SR this module built (tests and clients): the region
    groups and the report-level qualitative evaluations alike."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 Measurement Report")
    decision_by_value = {PRESENT: "positive", ABSENT: "negative", INDETERMINATE: "uncertain"}

    def finding(value: object, reason: object, numbers: Mapping[CodedConcept, float]) -> SRFinding:
        return SRFinding(
            decision=decision_by_value[_concept(value)],
            conf=next(float(v) for name, v in numbers.items() if str(name.value).startswith(PROBABILITY_PREFIX)),
            std=float(numbers[MC_STD]),
            reason=_code(reason),
            clear_below=float(numbers[CLEAR_BELOW]) if CLEAR_BELOW in numbers else None,
            positive_at=float(numbers[POSITIVE_AT]) if POSITIVE_AT in numbers else None,
        )

    findings: dict[str, SRFinding] = {}
    for group in report.get_planar_roi_measurement_groups():
        evaluations = group.get_qualitative_evaluations()
        reason = next(item.value for item in evaluations if item.name == DECISION_REASON)
        numbers = {m.name: m.value for m in group.get_measurements()}
        findings[str(group.tracking_identifier)] = finding(evaluations[0].value, reason, numbers)
    refer = False
    reasons: list[str] = []
    label_by_concept = {finding_concept(label): label for label in CHEXPERT_LABELS}
    for container in report[0].ContentSequence:
        if container.ValueType != "CONTAINER" or _item_name(container) != QUALITATIVE_EVALUATIONS:
            continue
        for item in container.ContentSequence:
            name = _item_name(item)
            if item.ValueType != "CODE" or (name != REFER and name not in label_by_concept):
                continue
            children = list(getattr(item, "ContentSequence", []))
            if name == REFER:
                refer = _item_value(item) == YES
                reasons = [_code(_item_value(c)) for c in children if _item_name(c) == REFERRAL_REASON]
                continue
            numbers = {
                _item_name(c): float(c.MeasuredValueSequence[0].NumericValue) for c in children if c.ValueType == "NUM"
            }
            decided_by = next(_item_value(c) for c in children if _item_name(c) == DECISION_REASON)
            findings[label_by_concept[name]] = finding(_item_value(item), decided_by, numbers)
    return findings, refer, reasons


def _item_name(item: Dataset) -> CodedConcept:
    return CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])


def _item_value(item: Dataset) -> CodedConcept:
    return CodedConcept.from_dataset(item.ConceptCodeSequence[0])
