"""Outcome parsing (issue #30): radiologists' final verdicts from CSV/NDJSON, FHIR R4 and HL7 v2 ORU^R01.

The HL7 messages are built with hl7apy's own API and the FHIR reports are validated with the ``fhir.resources``
R4B models before they are parsed, so the inputs are what a real sender produces, not hand-typed strings that
only this parser would accept.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from hl7apy.core import Message, Segment
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesnet.labels import CHEXPERT_LABELS
from service.codes import SNOMED_BY_LABEL, finding_code
from service.fhir import FINDING_SYSTEM, INTERPRETATION, REQUEST_ID_SYSTEM, SNOMED
from service.outcomes import parsing
from service.outcomes.parsing import CodeMap, FilmKey, OutcomeRow, RowError, parse_fhir, parse_hl7, parse_tabular

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SOP_UID = "1.2.826.0.1.3680043.8.498.1.1.1"
SITE_SYSTEM = "99RAD"
MediaType = Literal["text/csv", "application/x-ndjson"]


@pytest.fixture
def site_codes(tmp_path: Path) -> CodeMap:
    """A site's code map: two local codes on top of the defaults, as an operator would write it."""
    path = tmp_path / "codes.json"
    path.write_text(
        json.dumps(
            {
                "mappings": [
                    {"system": SITE_SYSTEM, "code": "PTX", "label": "Pneumothorax"},
                    {"system": "", "code": "EFF", "label": "Pleural Effusion"},
                ]
            }
        )
    )
    return CodeMap.from_file(path)


def codes_of(errors: list[RowError]) -> list[tuple[int, str]]:
    return [(error.row, error.code) for error in errors]


# --- CodeMap and FilmKey -------------------------------------------------------------------------------------------


def test_default_code_map_knows_the_services_own_codings() -> None:
    codes = CodeMap.default()
    for label in CHEXPERT_LABELS:
        assert codes.label(FINDING_SYSTEM, finding_code(label)) == label
        assert codes.label("label", label.upper()) == label
    for label, (code, _) in SNOMED_BY_LABEL.items():
        for system in ("http://snomed.info/sct", "SCT", "SNOMED"):
            assert codes.label(system, code) == label
    assert codes.label("sct", "8186001") is None  # systems are compared exactly
    assert codes.label(None, "8186001") is None  # a code without a system is not guessed
    assert codes.label("label", "Effusion") is None


def test_code_map_from_file_is_merged_over_the_defaults(site_codes: CodeMap, tmp_path: Path) -> None:
    assert site_codes.label(SITE_SYSTEM, "PTX") == "Pneumothorax"
    assert site_codes.label(None, "EFF") == "Pleural Effusion"
    assert site_codes.label("SCT", "8186001") == "Cardiomegaly"
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"mappings": [{"system": "SCT", "code": "8186001", "label": "Edema"}]}))
    assert CodeMap.from_file(override).label("SCT", "8186001") == "Edema"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"maps": []}', '"mappings" list'),
        ('{"mappings": [{"system": "X", "code": "1"}]}', "exactly the keys"),
        ('{"mappings": [{"system": "X", "code": 1, "label": "Edema"}]}', "must be strings"),
        ('{"mappings": [{"system": "X", "code": "1", "label": "Oedema"}]}', "'Oedema' is not one of the CheXpert"),
    ],
)
def test_a_bad_code_map_file_is_a_value_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "codes.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        CodeMap.from_file(path)


def test_film_key_item_index_only_with_a_request_id() -> None:
    assert FilmKey("request_id", "abc", 2).item_index == 2
    with pytest.raises(ValueError, match="item_index"):
        FilmKey("sop_instance_uid", SOP_UID, 0)


# --- CSV and NDJSON ------------------------------------------------------------------------------------------------


def test_csv_lines_of_one_film_are_merged_in_the_order_films_appear() -> None:
    text = (
        "request_id,item_index,sop_instance_uid,finding,verdict,reported_at,message_id\n"
        "req-1,0,,Pleural Effusion,present,2026-12-07T10:30:00,m-1\n"
        ",,1.2.3.4,cardiomegaly,NEGATIVE,,\n"
        "\n"
        "req-1,0,,Edema,0,2026-12-07T11:00:00+01:00,m-2\n"
        "req-1,1,,Edema,yes,,\n"
        "req-1,0,,Pleural Effusion,True,,\n"
    )
    rows, errors = parse_tabular(text, "text/csv", CodeMap.default())
    assert errors == []
    assert rows == [
        OutcomeRow(
            row=1,
            key=FilmKey("request_id", "req-1", 0),
            verdicts={"Pleural Effusion": True, "Edema": False},
            reported_at=datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc),  # the later of 10:30Z and 10:00Z
            message_id="m-1",
        ),
        OutcomeRow(2, FilmKey("sop_instance_uid", "1.2.3.4"), {"Cardiomegaly": False}, None, None),
        OutcomeRow(5, FilmKey("request_id", "req-1", 1), {"Edema": True}, None, None),
    ]


def test_csv_conflicting_verdicts_keep_neither() -> None:
    text = (
        "study_instance_uid,finding,verdict\n"
        f"{STUDY_UID},Edema,present\n"
        f"{STUDY_UID},Atelectasis,absent\n"
        f"{STUDY_UID},Edema,absent\n"
        f"{STUDY_UID},Edema,present\n"
    )
    rows, errors = parse_tabular(text, "text/csv", CodeMap.default())
    assert rows == [OutcomeRow(1, FilmKey("study_instance_uid", STUDY_UID), {"Atelectasis": False}, None, None)]
    assert codes_of(errors) == [(3, "conflict_in_row"), (4, "conflict_in_row")]
    assert "present" in errors[0].detail and "row 1" in errors[0].detail


def test_csv_bad_lines_are_errors_and_the_rest_is_kept(site_codes: CodeMap) -> None:
    text = (
        "request_id,sop_instance_uid,finding,code_system,code,verdict,reported_at\n"
        "r1,,Edema,,,maybe,\n"  # 1: bad verdict
        "r1,,Oedema,,,present,\n"  # 2: unknown finding
        ",,Edema,,,present,\n"  # 3: no film
        "r1,1.2.3,Edema,,,present,\n"  # 4: two keys
        "r1,,,SCT,8186001,present,\n"  # 5: SNOMED CT code
        f"r1,,,{SITE_SYSTEM},PTX,absent,\n"  # 6: site code
        "r1,,,SCT,999,present,\n"  # 7: unknown code
        "r1,,Edema,,,present,yesterday\n"  # 8: bad date
        "r1,,Edema,,,,\n"  # 9: no verdict
        "r2,,Edema,,,present,,extra\n"  # 10: too many fields
        ",not-a-uid,Edema,,,present,\n"  # 11: not a UID
        "r1,,Edema,SCT,8186001,present,\n"  # 12: finding and code disagree
    )
    rows, errors = parse_tabular(text, "text/csv", site_codes)
    assert rows == [
        OutcomeRow(5, FilmKey("request_id", "r1"), {"Cardiomegaly": True, "Pneumothorax": False}, None, None)
    ]
    assert codes_of(errors) == [
        (1, "bad_value"),
        (2, "unknown_code"),
        (3, "no_film_key"),
        (4, "ambiguous_film_key"),
        (7, "unknown_code"),
        (8, "bad_value"),
        (9, "missing_value"),
        (10, "malformed"),
        (11, "bad_value"),
        (12, "bad_value"),
    ]
    assert all(len(error.detail) < 400 for error in errors)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("request_id,finding,verdict,patient_name", "unknown_column"),
        ("request_id,finding", "missing_column"),
        ("finding,verdict", "missing_column"),
        ("request_id,finding,verdict,verdict", "duplicate_column"),
    ],
)
def test_a_bad_csv_header_is_one_error_for_the_file(header: str, code: str) -> None:
    rows, errors = parse_tabular(f"{header}\nr1,Edema,present,x\n", "text/csv", CodeMap.default())
    assert rows == []
    assert codes_of(errors) == [(0, code)]


@pytest.mark.parametrize(
    ("text", "media_type"),
    [("", "text/csv"), ("request_id,finding,verdict\n\n", "text/csv"), ("\n", "application/x-ndjson")],
)
def test_an_empty_submission_says_so(text: str, media_type: MediaType) -> None:
    empty = RowError(0, "empty", "The submission has no outcome lines.")
    assert parse_tabular(text, media_type, CodeMap.default()) == ([], [empty])


def test_ndjson_lines(site_codes: CodeMap) -> None:
    lines = [
        {"sop_instance_uid": f"urn:oid:{SOP_UID}", "finding": "Pneumothorax", "verdict": True, "message_id": "x-1"},
        "this is not json",
        {"sop_instance_uid": SOP_UID, "code_system": SITE_SYSTEM, "code": "PTX", "verdict": "present"},
        {"request_id": "r1", "item_index": 3, "code": "EFF", "verdict": 0, "reported_at": "2026-12-07T10:30:00Z"},
        [1, 2],
        {"request_id": "r1", "finding": "Edema", "verdict": "perhaps"},
        {"request_id": "r1", "finding": "Edema", "verdict": "present", "accession": "A1"},
        {"request_id": 7, "finding": "Edema", "verdict": "present"},
        {"request_id": "r1", "item_index": -1, "finding": "Edema", "verdict": "present"},
        {"sop_instance_uid": SOP_UID, "finding": "Pneumothorax", "verdict": "absent"},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n"
    rows, errors = parse_tabular(text, "application/x-ndjson", site_codes)
    assert rows == [
        OutcomeRow(
            4,
            FilmKey("request_id", "r1", 3),
            {"Pleural Effusion": False},
            datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc),
            None,
        ),
    ]
    assert codes_of(errors) == [
        (2, "malformed"),
        (5, "malformed"),
        (6, "bad_value"),
        (7, "unknown_column"),
        (8, "bad_value"),
        (9, "bad_value"),
        (10, "conflict_in_row"),
    ]
    assert "'accession'" in errors[3].detail


def test_the_row_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    line = json.dumps({"request_id": "r1", "finding": "Edema", "verdict": "present"})
    too_many = "\n".join([line] * (parsing.MAX_ROWS + 1))
    assert codes_of(parse_tabular(too_many, "application/x-ndjson", CodeMap.default())[1]) == [(0, "too_many_rows")]
    monkeypatch.setattr(parsing, "MAX_ROWS", 3)
    csv_text = "request_id,finding,verdict\n" + "r1,Edema,present\n" * 4
    assert parse_tabular(csv_text, "text/csv", CodeMap.default()) == ([], [parsing._too_many()])
    rows, errors = parse_tabular(
        "request_id,finding,verdict\n" + "r1,Edema,present\n" * 3, "text/csv", CodeMap.default()
    )
    assert len(rows) == 1 and errors == []


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab,"\n\r{}[]:0\x00\\ '))))
def test_tabular_never_raises(text: str) -> None:
    media_types: tuple[MediaType, ...] = ("text/csv", "application/x-ndjson")
    for media_type in media_types:
        rows, errors = parse_tabular(text, media_type, CodeMap.default())
        assert isinstance(rows, list) and isinstance(errors, list)


# --- FHIR R4 -------------------------------------------------------------------------------------------------------


def observation(obs_id: str, codings: list[dict[str, str]], status: str = "final", **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": status,
        "code": {"coding": codings},
        **value,
    }


def snomed_value(present: bool) -> dict[str, Any]:
    code, display = ("52101004", "Present") if present else ("2667000", "Absent")
    return {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": code, "display": display}]}}


def imaging_study(instances: int) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "study",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "subject": {"display": "not held"},
        "series": [
            {
                "uid": f"{STUDY_UID}.1",
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                "instance": [
                    {
                        "uid": f"{STUDY_UID}.1.{n}",
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1"},
                    }
                    for n in range(1, instances + 1)
                ],
            }
        ],
    }


def radiologist_report(
    *,
    report_id: str = "final-1",
    status: str = "final",
    request_id: str | None = None,
    study: dict[str, Any] | None = None,
    observations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A radiologist's final DiagnosticReport: contained verdict Observations, the film by request id or study."""
    if observations is None:
        observations = [
            observation(
                "effusion",
                [{"system": SNOMED, "code": "60046008", "display": "Pleural effusion"}],
                **snomed_value(True),
            ),
            observation(
                "cardiomegaly",
                [{"system": FINDING_SYSTEM, "code": "cardiomegaly"}],
                interpretation=[{"coding": [{"system": INTERPRETATION, "code": "NEG"}]}],
            ),
            observation(
                "ptx",
                [{"system": "http://loinc.org", "code": "x"}, {"system": SITE_SYSTEM, "code": "PTX"}],
                valueBoolean=True,
            ),
        ]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "contained": [*observations, *([study] if study is not None else [])],
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4"}]},
        "issued": "2026-12-07T11:30:00.000+01:00",
        "result": [{"reference": f"#{o['id']}"} for o in observations],
    }
    if request_id is not None:
        report["identifier"] = [{"system": REQUEST_ID_SYSTEM, "value": request_id}]
    if study is not None:
        report["imagingStudy"] = [{"reference": f"#{study['id']}"}]
    return report


def test_fhir_report_with_a_contained_single_instance_study_names_the_sop_instance(site_codes: CodeMap) -> None:
    report = radiologist_report(study=imaging_study(instances=1))
    DiagnosticReport.model_validate(report)
    rows, errors = parse_fhir(report, site_codes)
    assert errors == []
    assert rows == [
        OutcomeRow(
            row=1,
            key=FilmKey("sop_instance_uid", f"{STUDY_UID}.1.1"),
            verdicts={"Pleural Effusion": True, "Cardiomegaly": False, "Pneumothorax": True},
            reported_at=datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc),
            message_id="final-1",
        )
    ]


def test_fhir_bundle_of_two_reports(site_codes: CodeMap) -> None:
    by_request = radiologist_report(report_id="a", status="amended", request_id="req-7-0")
    by_study = radiologist_report(
        report_id="b",
        status="corrected",
        study=imaging_study(instances=2),
        observations=[observation("o1", [{"system": "SCT", "code": "8186001"}], **snomed_value(False))],
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": by_request}, {"resource": by_study}],
    }
    Bundle.model_validate(bundle)
    rows, errors = parse_fhir(bundle, site_codes)
    assert errors == []
    assert [(row.row, row.key, row.message_id) for row in rows] == [
        (1, FilmKey("request_id", "req-7-0"), "a"),  # the "-<n>" suffix is kept as sent
        (2, FilmKey("study_instance_uid", STUDY_UID), "b"),  # two instances: the study
    ]
    assert rows[1].verdicts == {"Cardiomegaly": False}


def test_fhir_problems_are_per_report(site_codes: CodeMap) -> None:
    preliminary = radiologist_report(status="preliminary", request_id="r1")
    keyless = radiologist_report()
    bogus = radiologist_report(status="bogus", request_id="r1")
    unknown_element = {**radiologist_report(request_id="r1"), "verdict": "present"}
    mixed = radiologist_report(
        request_id="r2",
        observations=[
            observation("o1", [{"system": "SCT", "code": "8186001"}], status="preliminary", **snomed_value(True)),
            observation("o2", [{"system": "urn:site", "code": "zzz"}], **snomed_value(True)),
            observation("o3", [{"system": "SCT", "code": "19242006"}], **snomed_value(True)),
            observation("o4", [{"system": "SCT", "code": "46621007"}], valueString="see report"),
        ],
    )
    mixed["result"].append({"reference": "Observation/elsewhere"})
    for valid in (preliminary, keyless, bogus, mixed):
        DiagnosticReport.model_validate(valid)  # fhir.resources accepts them: the problems are the parser's to find
    entries = [preliminary, keyless, bogus, unknown_element, mixed, {"resourceType": "Patient", "id": "p"}]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": r} for r in entries]}
    rows, errors = parse_fhir(bundle, site_codes)
    assert rows == [OutcomeRow(5, FilmKey("request_id", "r2"), {"Edema": True}, rows[0].reported_at, "final-1")]
    assert codes_of(errors) == [
        (1, "not_final"),
        (2, "no_film_key"),
        (3, "malformed"),
        (4, "malformed"),
        (5, "not_final"),
        (5, "unknown_code"),
        (5, "bad_value"),
        (5, "unresolved_reference"),
        (6, "not_a_report"),
    ]
    assert "DiagnosticReport.verdict" in errors[3].detail
    assert "urn:site|zzz" in errors[5].detail


def test_fhir_body_that_is_not_a_report() -> None:
    assert codes_of(parse_fhir({"resourceType": "Patient"}, CodeMap.default())[1]) == [(0, "not_a_report")]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    assert codes_of(parse_fhir(bundle, CodeMap.default())[1]) == [(0, "malformed")]
    empty = {"resourceType": "Bundle", "type": "collection"}
    assert codes_of(parse_fhir(empty, CodeMap.default())[1]) == [(0, "empty")]


def test_fhir_resource_that_fhir_resources_cannot_model_is_malformed() -> None:
    report = radiologist_report(request_id="r1")
    report["contained"].append({"resourceType": "NoSuchResource", "id": "x"})
    rows, errors = parse_fhir(report, CodeMap.default())
    assert rows == [] and codes_of(errors) == [(1, "malformed")]


def test_ndjson_strings_may_hold_line_separators() -> None:
    line = json.dumps({"request_id": "r1", "finding": "Edema", "verdict": "present", "message_id": "a\u2028b"})
    rows, errors = parse_tabular(line.replace("\\u2028", "\u2028") + "\r\n", "application/x-ndjson", CodeMap.default())
    assert errors == [] and rows[0].message_id == "a\u2028b"


# --- HL7 v2 ORU^R01 ------------------------------------------------------------------------------------------------


def oru(
    control_id: str,
    observations: list[tuple[str, str, str, str]],
    *,
    study_uid: str | None = None,
    filler: str | None = None,
    obr_status: str = "F",
    reported: str | None = None,
) -> str:
    """An ORU^R01 built through hl7apy; observations are (OBX-2 type, OBX-3, OBX-5, OBX-11)."""
    message = Message("ORU_R01", version="2.5")
    message.msh.msh_3 = "RIS"
    message.msh.msh_4 = "HOSPITAL"
    message.msh.msh_7 = "20261207103000"
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = control_id
    message.msh.msh_11 = "P"
    order = message.add_group("ORU_R01_PATIENT_RESULT").add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    if filler is not None:
        order.obr.obr_3 = f"{filler}^RIS"
    order.obr.obr_4 = "36554-4^XR Chest Single view^LN"
    if reported is not None:
        order.obr.obr_22 = reported
    order.obr.obr_25 = obr_status
    if study_uid is not None:
        zds = Segment("ZDS", version="2.5")
        zds.zds_1 = f"{study_uid}^RIS^Application^DICOM"
        order.add(zds)
    for number, (value_type, identifier, value, status) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(number)
        obx.obx_2 = value_type
        obx.obx_3 = identifier
        obx.obx_5 = value
        if status:
            obx.obx_11 = status
    er7: str = message.to_er7()
    return er7


def test_hl7_messages_built_with_hl7apy_are_read_back(site_codes: CodeMap) -> None:
    first = oru(
        "MSG-1",
        [
            ("CWE", "8186001^Cardiomegaly^SCT", "52101004^Present^SCT", "F"),
            ("CWE", f"PTX^Pneumothorax (site)^{SITE_SYSTEM}", "2667000^Absent^SCT", "C"),
        ],
        study_uid=STUDY_UID,
        reported="20261207113000+0100",
    )
    second = oru("MSG-2", [("ST", "EFF^Effusion", "Positive", "")], filler="req-42")
    assert "\rZDS|" in first and "\rOBX|2|" in first
    rows, errors = parse_hl7(f"{first}\n{second}\r\n", site_codes)
    assert errors == []
    assert rows == [
        OutcomeRow(
            1,
            FilmKey("study_instance_uid", STUDY_UID),
            {"Cardiomegaly": True, "Pneumothorax": False},
            datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc),
            "MSG-1",
            frozenset({"Pneumothorax"}),  # OBX-11 C: a correction of a stored verdict
        ),
        OutcomeRow(
            2,
            FilmKey("request_id", "req-42"),  # OBX-11 empty: OBR-25 F decides; no OBR-22: MSH-7 as UTC
            {"Pleural Effusion": True},
            datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc),
            "MSG-2",
        ),
    ]


def test_hl7_problems_are_per_message(site_codes: CodeMap) -> None:
    preliminary = oru("P-1", [("CWE", "8186001^Cardiomegaly^SCT", "52101004^Present^SCT", "P")], filler="r1")
    unknown = oru(
        "U-1",
        [
            ("CWE", "999^Something^SCT", "52101004^Present^SCT", "F"),
            ("CWE", "19242006^Pulmonary edema^SCT", "2667000^Absent^SCT", "F"),
            ("NM", "46621007^Atelectasis^SCT", "0.7", "F"),
        ],
        filler="r2",
    )
    keyless = oru("K-1", [("ST", "19242006^Edema^SCT", "absent", "F")])
    preliminary_order = oru("O-1", [("ST", "19242006^Edema^SCT", "absent", "")], filler="r3", obr_status="P")
    garbage = "MSH|this is not hl7\rOBX|1"
    not_oru = "MSH|^~\\&|ADT||||20261207103000||ADT^A01^ADT_A01|A-1|P|2.5"
    text = "\r".join([preliminary, unknown, keyless, garbage, not_oru, preliminary_order])
    rows, errors = parse_hl7("\x0b" + text + "\x1c\r", site_codes)  # MLLP framing is tolerated
    assert rows == [OutcomeRow(2, FilmKey("request_id", "r2"), {"Edema": False}, rows[0].reported_at, "U-1")]
    assert codes_of(errors) == [
        (1, "not_final"),
        (2, "unknown_code"),
        (2, "bad_value"),
        (3, "no_film_key"),
        (4, "malformed"),
        (5, "not_a_report"),
        (6, "not_final"),
    ]
    assert "999^Something^SCT" in errors[1].detail


def test_hl7_one_film_per_order() -> None:
    """A message with two orders gives two films at the same row; a ZDS before the first OBR belongs to it."""
    text = "\r".join(
        [
            "MSH|^~\\&|RIS|H|||20261207103000||ORU^R01^ORU_R01|M-9|P|2.5",
            f"ZDS|{STUDY_UID}^RIS^Application^DICOM",
            "OBR|1||acc-1|36554-4^XR Chest^LN|||||||||||||||||||F",
            "OBX|1|CE|60046008^Pleural effusion^SCT||52101004^Present^SCT||||||F",
            "OBR|2||req-5|36554-4^XR Chest^LN|||||||||||||||||||F",
            "OBX|1|CE|^^^8186001^Cardiomegaly^SCT||2667000^Absent^SCT||||||F",  # the alternate coding maps
            "OBX|2|ST|19242006^Pulmonary edema^SCT||present||||||F",
            "OBX|3|ST|19242006^Pulmonary edema^SCT||present||||||F",
        ]
    )
    rows, errors = parse_hl7(text, CodeMap.default())
    assert errors == []
    assert [(row.row, row.key, row.verdicts) for row in rows] == [
        (1, FilmKey("study_instance_uid", STUDY_UID), {"Pleural Effusion": True}),
        (1, FilmKey("request_id", "req-5"), {"Cardiomegaly": False, "Edema": True}),
    ]


def test_hl7_text_that_is_no_message() -> None:
    assert codes_of(parse_hl7("", CodeMap.default())[1]) == [(0, "empty")]
    assert codes_of(parse_hl7("hello\rworld", CodeMap.default())[1]) == [(1, "malformed")]
    bad_time = oru("T-1", [("ST", "19242006^Edema^SCT", "absent", "F")], filler="r1", reported="2026-12-07")
    assert codes_of(parse_hl7(bad_time, CodeMap.default())[1]) == [(1, "bad_value")]


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("20261207103000", datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc)),
        ("20261207103000-0500", datetime(2026, 12, 7, 15, 30, tzinfo=timezone.utc)),
        ("20261207103000.25+0000", datetime(2026, 12, 7, 10, 30, 0, 250000, tzinfo=timezone.utc)),
        ("202612071030", datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc)),
        ("20261207", datetime(2026, 12, 7, tzinfo=timezone.utc)),
        ("20261307", None),
        ("2026-12-07", None),
        ("20261207103000+2500", None),
    ],
)
def test_hl7_timestamps(stamp: str, expected: datetime | None) -> None:
    assert parsing._parse_hl7_time(stamp) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("MSHOBXZD|^~\\&\r\n12F"))))
def test_hl7_never_raises(text: str) -> None:
    rows, errors = parse_hl7(text, CodeMap.default())
    assert isinstance(rows, list) and isinstance(errors, list)
