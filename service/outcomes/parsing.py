"""Radiologists' final verdicts on films the service scored, parsed into plain rows.

A site sends outcomes in one of three forms: a CSV or NDJSON file (back-filling in bulk), FHIR R4
``DiagnosticReport``s (one, or a ``Bundle`` of them), or HL7 v2 ``ORU^R01`` messages. Each parser returns the
films it could read as :class:`OutcomeRow` (one film, its verdicts per CheXpert finding) and every problem as a
:class:`RowError` naming the position in the submission, so a sender can fix the lines that failed and resend
them. The parsers never raise on bad input and never touch a database or the network.

A film is named by what the service knows about it (:class:`FilmKey`): the request id it answered with, or the
DICOM SOP Instance or Study Instance UID of the film. A finding is named by a site's code, translated through a
:class:`CodeMap` (configuration: the service's own codes and SNOMED CT by default, a site's file on top).

Error codes (``RowError.code``); row 0 means the submission as a whole:

- ``empty``, ``too_many_rows``: nothing to read, or more than :data:`MAX_ROWS` lines, reports or messages.
- ``missing_column``, ``unknown_column``, ``duplicate_column``: a CSV header (row 0) or an NDJSON line's keys.
- ``malformed``: not CSV / JSON / a valid FHIR resource / parseable HL7.
- ``not_a_report``: a FHIR resource other than a DiagnosticReport, an HL7 message other than ORU^R01.
- ``no_film_key``, ``ambiguous_film_key``: no film identifier, or several in one CSV/NDJSON line.
- ``unknown_code``: a finding whose code (or label text) the code map does not know.
- ``missing_value``, ``bad_value``: a required value absent, or one that cannot be read (verdict, date, UID).
- ``not_final``: a report or observation that is not final (or amended / corrected).

A verdict the radiologist changed after signing (an addendum) arrives as a **correction**: a FHIR report or
Observation with status ``amended`` or ``corrected``, an HL7 result status ``C`` (OBX-11, else OBR-25), or a CSV /
NDJSON line with ``status`` ``corrected`` (or ``amended``). ``OutcomeRow.corrected`` names those findings; the
store replaces the earlier verdict with it and keeps the earlier one in the correction history. A verdict that is
not a correction and differs from a stored one is refused (``contradicts``).
- ``conflict_in_row``: the same film and finding given both present and absent; neither verdict is kept.
- ``unresolved_reference``: a FHIR reference that does not point at a contained resource.
- ``no_verdicts``: a final report or message without any finding in it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import pydantic
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from bayesnet.labels import CHEXPERT_LABELS
from service.codes import SNOMED_BY_LABEL, finding_code
from service.fhir import FINDING_SYSTEM, INTERPRETATION, REQUEST_ID_SYSTEM, SNOMED

__all__ = [
    "MAX_ROWS",
    "CodeMap",
    "FilmKey",
    "FindingLabel",
    "OutcomeRow",
    "RowError",
    "parse_fhir",
    "parse_hl7",
    "parse_tabular",
]

#: One of ``bayesnet.labels.CHEXPERT_LABELS``.
FindingLabel: TypeAlias = str
FilmKeyKind: TypeAlias = Literal["request_id", "sop_instance_uid", "study_instance_uid"]

#: The most lines (CSV after the header, NDJSON), reports (FHIR Bundle) or messages (HL7) one submission may hold.
MAX_ROWS = 100_000
#: The code-map system under which a finding's label text is looked up (CSV/NDJSON ``finding``).
LABEL_SYSTEM = "label"
#: Coding-system names for SNOMED CT: the FHIR URI, the HL7 v2 table 0396 name and a common local spelling.
SNOMED_SYSTEMS = (SNOMED, "SCT", "SNOMED")
#: SNOMED CT qualifier values a radiologist's verdict is coded with (FHIR valueCodeableConcept, HL7 OBX-5).
PRESENCE_BY_SNOMED = {"52101004": True, "2667000": False}  # Present, Absent
#: v3 ObservationInterpretation codes that state a verdict (IND and the rest do not).
PRESENCE_BY_INTERPRETATION = {"POS": True, "NEG": False}
#: DiagnosticReport / Observation statuses that mean the radiologist has signed the result off.
FINAL_STATUSES = frozenset({"final", "amended", "corrected"})
#: Of those, the statuses of a result changed after it was first signed: its verdicts replace the stored ones.
CORRECTION_STATUSES = frozenset({"amended", "corrected"})
#: The R4 status value sets; fhir.resources checks the type but not the code, so a typo is caught here.
REPORT_STATUSES = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
OBSERVATION_STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
FHIR_BUNDLE_TYPES = frozenset({"collection", "transaction", "batch"})
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: HL7 v2 result statuses (OBR-25, OBX-11) that mean final: F (final) and C (corrected: a correction).
HL7_FINAL_STATUSES = frozenset({"F", "C"})
HL7_CORRECTION = "C"
HL7_CODED_TYPES = frozenset({"CE", "CWE", "CNE"})
HL7_TEXT_TYPES = frozenset({"ST", "TX", "FT", ""})

#: Verdict words accepted in CSV/NDJSON (case-insensitive).
TABULAR_VERDICTS = {
    "present": True,
    "positive": True,
    "1": True,
    "true": True,
    "yes": True,
    "absent": False,
    "negative": False,
    "0": False,
    "false": False,
    "no": False,
}
#: CSV/NDJSON ``status`` values (case-insensitive; blank: final): whether the line corrects a stored verdict.
TABULAR_STATUSES = {"final": False, "corrected": True, "amended": True}
#: Verdict words accepted in a free-text result (HL7 OBX-5 of type ST, TX or FT; case-insensitive).
TEXT_VERDICTS = {"present": True, "positive": True, "absent": False, "negative": False}

KEY_COLUMNS: tuple[FilmKeyKind, ...] = ("request_id", "sop_instance_uid", "study_instance_uid")
TABULAR_COLUMNS = frozenset(
    {*KEY_COLUMNS, "item_index", "finding", "code_system", "code", "verdict", "status", "reported_at", "message_id"}
)
#: How much of a sender's input an error message quotes.
QUOTE_LIMIT = 80

_DICOM_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: The service's request ids (service.api.middleware) plus the "-<index>" a batch item adds.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,160}$")
_HL7_DTM = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?(?:\.(?P<frac>\d{1,4}))?"
    r"(?P<tz>[+-]\d{4})?$"
)

JSONDict = dict[str, Any]


@dataclass(frozen=True)
class FilmKey:
    """How a verdict names the film it is about.

    ``request_id``: the id the service answered with (``X-Request-ID``, the FHIR report's identifier); with
    ``item_index`` the 0-based position of the film in a batch upload (``BatchItem.index``). ``sop_instance_uid`` /
    ``study_instance_uid``: the DICOM UIDs of the film or its study, for films the service received as DICOM.
    """

    kind: FilmKeyKind
    value: str
    item_index: int | None = None

    def __post_init__(self) -> None:
        if self.item_index is not None and self.kind != "request_id":
            raise ValueError("item_index only goes with a request_id key")


@dataclass(frozen=True)
class OutcomeRow:
    """One film's final verdicts: each named finding present (True) or absent (False); ``corrected``: the findings
    whose verdict is a correction of an earlier one (it replaces what is stored)."""

    row: int
    key: FilmKey
    verdicts: dict[FindingLabel, bool]
    reported_at: datetime | None
    message_id: str | None
    corrected: frozenset[FindingLabel] = frozenset()


@dataclass(frozen=True)
class RowError:
    """A problem at one position of a submission (0: the submission as a whole), in words a sender can act on."""

    row: int
    code: str
    detail: str


@dataclass(frozen=True)
class CodeMap:
    """The site's codes -> the 14 findings. Configuration, not code.

    ``by_code`` maps ``(system, code)`` to a CheXpert label; systems are compared exactly as given. A code sent
    without a system is looked up under the system ``""``, so a site that sends bare local codes lists them so.
    Label text (system ``"label"``) also matches case-insensitively.
    """

    by_code: Mapping[tuple[str, str], FindingLabel]
    _by_folded_label: Mapping[str, FindingLabel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted({label for label in self.by_code.values() if label not in CHEXPERT_LABELS})
        if unknown:
            raise ValueError(f"not CheXpert labels: {', '.join(map(repr, unknown))}")
        folded: dict[str, FindingLabel] = {}
        for (system, code), label in self.by_code.items():
            if system == LABEL_SYSTEM:
                folded.setdefault(code.strip().casefold(), label)
        object.__setattr__(self, "by_code", MappingProxyType(dict(self.by_code)))
        object.__setattr__(self, "_by_folded_label", MappingProxyType(folded))

    def label(self, system: str | None, code: str) -> FindingLabel | None:
        """The finding ``code`` stands for in ``system`` (``None``: sent without one), or ``None`` if unmapped."""
        system = "" if system is None else system.strip()
        code = code.strip()
        found = self.by_code.get((system, code))
        if found is None and system == LABEL_SYSTEM:
            found = self._by_folded_label.get(code.casefold())
        return found

    @classmethod
    def default(cls) -> CodeMap:
        """The codes the service itself writes: the project CodeSystem, SNOMED CT (three spellings), label text."""
        by_code: dict[tuple[str, str], FindingLabel] = {}
        for label in CHEXPERT_LABELS:
            by_code[(FINDING_SYSTEM, finding_code(label))] = label
            by_code[(LABEL_SYSTEM, label)] = label
        for label, (code, _display) in SNOMED_BY_LABEL.items():
            for system in SNOMED_SYSTEMS:
                by_code[(system, code)] = label
        return cls(by_code)

    @classmethod
    def from_file(cls, path: Path) -> CodeMap:
        """A site's mappings from a JSON file, on top of :meth:`default` (a site entry wins over a default one).

        The file reads ``{"mappings": [{"system": "...", "code": "...", "label": "Cardiomegaly"}, ...]}``; a
        malformed file or a label that is not one of the 14 findings is a ``ValueError`` saying which entry (a file
        that cannot be read is the usual ``OSError``).
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"code map {path}: not valid JSON ({err})") from err
        if not isinstance(document, dict) or not isinstance(document.get("mappings"), list):
            raise ValueError(f'code map {path}: expected an object with a "mappings" list')
        by_code = dict(cls.default().by_code)
        for number, entry in enumerate(document["mappings"]):
            where = f"code map {path}, mappings[{number}]"
            if not isinstance(entry, dict) or set(entry) != {"system", "code", "label"}:
                raise ValueError(f'{where}: expected exactly the keys "system", "code" and "label"')
            system, code, label = entry["system"], entry["code"], entry["label"]
            if not all(isinstance(value, str) for value in (system, code, label)):
                raise ValueError(f"{where}: system, code and label must be strings")
            if not code.strip():
                raise ValueError(f"{where}: the code is empty")
            if label not in CHEXPERT_LABELS:
                raise ValueError(
                    f"{where}: {_quote(label)} is not one of the CheXpert labels ({', '.join(CHEXPERT_LABELS)})"
                )
            by_code[(system.strip(), code.strip())] = label
        return cls(by_code)


# --- Shared helpers ------------------------------------------------------------------------------------------------


def _quote(value: object) -> str:
    """A sender's value for an error message, shortened so a detail never carries much of the input."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def _short(message: str, limit: int = 200) -> str:
    """A library's error message, clipped (it may quote the input)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _uid_problem(uid: str) -> str | None:
    if len(uid) > 64 or not _DICOM_UID.match(uid):
        return f"{_quote(uid)} is not a DICOM UID (digits and dots, at most 64 characters)"
    return None


def _key_problem(key: FilmKey) -> str | None:
    """Why a film key cannot name a film the service scored, or ``None``."""
    if key.kind == "request_id":
        if not _REQUEST_ID.match(key.value):
            return f"{_quote(key.value)} is not a request id (letters, digits and . _ : -, at most 160 characters)"
        return None
    return _uid_problem(key.value)


def _as_utc(moment: datetime) -> datetime:
    """A timestamp in UTC; one without a zone is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _parse_iso(text: str) -> datetime | None:
    """ISO 8601 date or date-time (``Z`` accepted on every Python), in UTC; ``None`` if it is not one."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        return _as_utc(datetime.fromisoformat(text))
    except ValueError:
        return None


class _Film:
    """A film's verdicts while they are collected. A finding given both ways is taken out and stays out."""

    def __init__(self, row: int, key: FilmKey) -> None:
        self.row = row
        self.key = key
        self.verdicts: dict[FindingLabel, bool] = {}
        self.seen_in: dict[FindingLabel, str] = {}
        self.conflicted: set[FindingLabel] = set()
        self.corrected: set[FindingLabel] = set()
        self.reported_at: datetime | None = None
        self.message_id: str | None = None

    def add(
        self, label: FindingLabel, present: bool, row: int, where: str, *, correction: bool = False
    ) -> RowError | None:
        """Record a verdict (``correction``: it corrects a stored one); a contradiction within the submission is a
        ``conflict_in_row`` error at ``row`` (``where`` names it)."""
        if correction:
            self.corrected.add(label)
        if label in self.conflicted:
            return RowError(
                row,
                "conflict_in_row",
                f"{where}: {label} is given both present and absent for this film elsewhere in the submission; "
                "no verdict on it is kept. Send the finding once with the radiologist's final verdict.",
            )
        previous = self.verdicts.get(label)
        if previous is None:
            self.verdicts[label] = present
            self.seen_in[label] = where
            return None
        if previous == present:
            return None
        del self.verdicts[label]
        self.conflicted.add(label)
        first = "present" if previous else "absent"
        earlier = self.seen_in[label][:1].lower() + self.seen_in[label][1:]
        return RowError(
            row,
            "conflict_in_row",
            f"{where}: {label} is {'present' if present else 'absent'} here but {first} in {earlier} "
            "for the same film; neither verdict is kept. Send the finding once with the radiologist's final verdict.",
        )

    def note_time(self, moment: datetime | None) -> None:
        """The film's report time: the latest one given (the verdict that stands is the last one signed)."""
        if moment is not None and (self.reported_at is None or moment > self.reported_at):
            self.reported_at = moment

    def outcome(self) -> OutcomeRow | None:
        if not self.verdicts:
            return None
        corrected = frozenset(self.corrected & set(self.verdicts))
        return OutcomeRow(self.row, self.key, dict(self.verdicts), self.reported_at, self.message_id, corrected)


# --- CSV / NDJSON --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """One CSV/NDJSON line, read: a film, a finding and its verdict."""

    key: FilmKey
    label: FindingLabel
    present: bool
    reported_at: datetime | None
    message_id: str | None
    correction: bool = False


def parse_tabular(
    text: str, media_type: Literal["text/csv", "application/x-ndjson"], codes: CodeMap
) -> tuple[list[OutcomeRow], list[RowError]]:
    """Outcomes from a CSV file (with a header) or NDJSON (one JSON object a line): one line per film and finding.

        A line names the film by exactly one of ``request_id`` (with an optional 0-based ``item_index``),
        ``sop_instance_uid`` or ``study_instance_uid``; the finding by ``finding`` (a CheXpert label, any case) or by
        ``code_system`` + ``code`` (through ``codes``); the verdict by ``verdict`` (present/absent, positive/negative,
        1/0, true/false, yes/no); optionally ``status`` (``final``, the default, or ``corrected`` / ``amended``: the
    verdict corrects a stored one), ``reported_at`` (ISO 8601, UTC when no zone) and ``message_id``. Lines of
        one film are merged into one row, in the order films first appear (``row``: the film's first line after the
        header). Empty lines are skipped but counted, so rows match the sender's line numbers.
    """
    if media_type == "text/csv":
        records = _csv_records(text)
    elif media_type == "application/x-ndjson":
        records = _ndjson_records(text)
    else:
        raise ValueError(f"unsupported media type {media_type!r}: expected text/csv or application/x-ndjson")
    films: dict[FilmKey, _Film] = {}
    errors: list[RowError] = []
    for row, record in records:
        if isinstance(record, RowError):
            if record.code == "too_many_rows":
                return [], [record]
            errors.append(record)
            continue
        read = _read_line(row, record, codes)
        if isinstance(read, RowError):
            errors.append(read)
            continue
        film = films.get(read.key)
        if film is None:
            film = films[read.key] = _Film(row, read.key)
        conflict = film.add(read.label, read.present, row, f"Row {row}", correction=read.correction)
        if conflict is not None:
            errors.append(conflict)
        film.note_time(read.reported_at)
        if film.message_id is None:
            film.message_id = read.message_id
    if not films and not errors:
        errors.append(RowError(0, "empty", "The submission has no outcome lines."))
    rows = [outcome for film in films.values() if (outcome := film.outcome()) is not None]
    return rows, errors


def _too_many() -> RowError:
    return RowError(0, "too_many_rows", f"The submission has more than {MAX_ROWS} lines; split it into smaller files.")


def _csv_records(text: str) -> Iterator[tuple[int, Mapping[str, object] | RowError]]:
    """The CSV's lines after the header as column -> value, or an error per line (row 0: the header)."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    header: list[str] | None = None
    row = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            yield (row + 1, RowError(row + 1, "malformed", f"Row {row + 1} is not valid CSV ({_short(str(err))})."))
            return  # the reader cannot be trusted past a broken line
        if header is None:
            if not fields:
                continue  # blank lines before the header
            header = [name.strip().lower() for name in fields]
            problem = _header_problem(header)
            if problem is not None:
                yield (0, problem)
                return
            continue
        row += 1
        if row > MAX_ROWS:
            yield (row, _too_many())
            return
        if not any(value.strip() for value in fields):
            continue
        if len(fields) > len(header):
            yield (
                row,
                RowError(row, "malformed", f"Row {row} has {len(fields)} fields; the header has {len(header)}."),
            )
            continue
        yield (row, dict(zip(header, fields, strict=False)))  # a short line leaves its last columns empty


def _header_problem(header: Sequence[str]) -> RowError | None:
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        return RowError(0, "duplicate_column", f"The header repeats the column(s) {', '.join(duplicated)}.")
    unknown = [name for name in header if name not in TABULAR_COLUMNS]
    if unknown:
        return RowError(
            0,
            "unknown_column",
            f"Unknown column(s) {_quote(', '.join(unknown))}; the columns are {', '.join(sorted(TABULAR_COLUMNS))}.",
        )
    missing = []
    if not any(name in header for name in KEY_COLUMNS):
        missing.append("one of " + ", ".join(KEY_COLUMNS))
    if "finding" not in header and "code" not in header:
        missing.append("finding (or code_system and code)")
    if "verdict" not in header:
        missing.append("verdict")
    if missing:
        return RowError(0, "missing_column", f"The header lacks {'; '.join(missing)}.")
    return None


def _ndjson_records(text: str) -> Iterator[tuple[int, Mapping[str, object] | RowError]]:
    """The NDJSON's lines as key -> value, or an error per line.

    Lines end at LF (a CR before it is dropped), not at every character ``str.splitlines`` breaks on: a JSON
    string may hold U+2028 and the like unescaped.
    """
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    if lines and not lines[-1]:
        lines.pop()  # the final newline ends the last line, it does not start another
    if len(lines) > MAX_ROWS:
        yield (0, _too_many())
        return
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except (ValueError, RecursionError) as err:
            yield (row, RowError(row, "malformed", f"Row {row} is not JSON ({_short(str(err))})."))
            continue
        if not isinstance(document, dict):
            yield (row, RowError(row, "malformed", f"Row {row} is JSON but not an object."))
            continue
        unknown = [name for name in document if name not in TABULAR_COLUMNS]
        if unknown:
            yield (
                row,
                RowError(
                    row,
                    "unknown_column",
                    f"Row {row} has unknown key(s) {_quote(', '.join(unknown))}; the keys are "
                    f"{', '.join(sorted(TABULAR_COLUMNS))}.",
                ),
            )
            continue
        yield (row, document)


def _text_value(record: Mapping[str, object], name: str, row: int) -> str | RowError | None:
    """A text value: ``None`` when absent or blank; a number or other JSON type is an error."""
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        return RowError(row, "bad_value", f"Row {row}: {name} must be a string, not {_quote(value)}.")
    return value.strip() or None


def _read_line(row: int, record: Mapping[str, object], codes: CodeMap) -> _Line | RowError:
    """One line's film, finding and verdict, or the first thing wrong with it."""
    texts: dict[str, str | None] = {}
    for name in (*KEY_COLUMNS, "finding", "code_system", "code", "status", "reported_at", "message_id"):
        value = _text_value(record, name, row)
        if isinstance(value, RowError):
            return value
        texts[name] = value
    key = _line_key(row, record, texts)
    if isinstance(key, RowError):
        return key
    label = _line_label(row, texts, codes)
    if isinstance(label, RowError):
        return label
    present = _line_verdict(row, record.get("verdict"))
    if isinstance(present, RowError):
        return present
    status = (texts["status"] or "final").lower()
    if status not in TABULAR_STATUSES:
        return RowError(
            row,
            "bad_value",
            f"Row {row}: status {_quote(texts['status'])} is not final, corrected or amended.",
        )
    reported_at = None
    if texts["reported_at"] is not None:
        reported_at = _parse_iso(texts["reported_at"])
        if reported_at is None:
            return RowError(
                row,
                "bad_value",
                f"Row {row}: reported_at {_quote(texts['reported_at'])} is not an ISO 8601 date-time "
                "(e.g. 2026-12-07T10:30:00Z).",
            )
    return _Line(key, label, present, reported_at, texts["message_id"], TABULAR_STATUSES[status])


def _line_key(row: int, record: Mapping[str, object], texts: Mapping[str, str | None]) -> FilmKey | RowError:
    given = [kind for kind in KEY_COLUMNS if texts[kind] is not None]
    if not given:
        return RowError(
            row, "no_film_key", f"Row {row} names no film: give request_id, sop_instance_uid or study_instance_uid."
        )
    if len(given) > 1:
        return RowError(
            row, "ambiguous_film_key", f"Row {row} names the film more than one way ({', '.join(given)}); give one."
        )
    kind = given[0]
    value = texts[kind]
    assert value is not None
    if kind != "request_id":
        value = value.removeprefix("urn:oid:")
    index = _item_index(row, record.get("item_index"))
    if isinstance(index, RowError):
        return index
    if index is not None and kind != "request_id":
        return RowError(row, "bad_value", f"Row {row}: item_index only goes with request_id, not {kind}.")
    key = FilmKey(kind, value, index)
    problem = _key_problem(key)
    return key if problem is None else RowError(row, "bad_value", f"Row {row}: {kind} {problem}.")


def _item_index(row: int, value: object) -> int | RowError | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1_000_000_000:
        return value
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii() and len(value.strip()) <= 9:
        return int(value.strip())
    return RowError(
        row, "bad_value", f"Row {row}: item_index {_quote(value)} is not a position in a batch (0, 1, 2, ...)."
    )


def _line_label(row: int, texts: Mapping[str, str | None], codes: CodeMap) -> FindingLabel | RowError:
    finding, system, code = texts["finding"], texts["code_system"], texts["code"]
    by_code = by_text = None
    if code is not None:
        by_code = codes.label(system, code)
        if by_code is None:
            return RowError(
                row,
                "unknown_code",
                f"Row {row}: code {_quote(code)} in system {_quote(system or '')} is not in the code map; "
                "add it to the site's code map or send the finding's label.",
            )
    elif system is not None:
        return RowError(row, "missing_value", f"Row {row}: code_system is given without a code.")
    if finding is not None:
        by_text = codes.label(LABEL_SYSTEM, finding)
        if by_text is None:
            return RowError(
                row,
                "unknown_code",
                f"Row {row}: finding {_quote(finding)} is not one of the CheXpert findings "
                f"({', '.join(CHEXPERT_LABELS)}).",
            )
    if by_code is not None and by_text is not None and by_code != by_text:
        return RowError(
            row, "bad_value", f"Row {row}: finding says {by_text} but the code stands for {by_code}; give one."
        )
    label = by_code or by_text
    if label is None:
        return RowError(row, "missing_value", f"Row {row} names no finding: give finding, or code_system and code.")
    return label


def _line_verdict(row: int, value: object) -> bool | RowError:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return RowError(row, "missing_value", f"Row {row} has no verdict: give present or absent.")
    if isinstance(value, str) and value.strip().lower() in TABULAR_VERDICTS:
        return TABULAR_VERDICTS[value.strip().lower()]
    return RowError(
        row,
        "bad_value",
        f"Row {row}: verdict {_quote(value)} is not one of present/absent, positive/negative, 1/0, true/false, yes/no.",
    )


# --- FHIR R4 -------------------------------------------------------------------------------------------------------


def parse_fhir(body: Mapping[str, Any], codes: CodeMap) -> tuple[list[OutcomeRow], list[RowError]]:
    """Outcomes from a FHIR ``DiagnosticReport`` or a ``Bundle`` (collection, transaction, batch) of them.

    Each report is validated with the ``fhir.resources`` R4B models (as the service's own output is in its tests),
    must be final (or amended / corrected), names its film by the service's request-id identifier or by a contained
    ``ImagingStudy``'s DICOM UIDs, and carries its verdicts as contained ``Observation``s referenced from
    ``result``. ``row``: the report's 1-based position in the bundle (1 for a lone report).
    """
    resource_type = body.get("resourceType") if isinstance(body, Mapping) else None
    if resource_type == "DiagnosticReport":
        reports: list[tuple[int, object]] = [(1, body)]
    elif resource_type == "Bundle":
        bundle_type = body.get("type")
        if bundle_type not in FHIR_BUNDLE_TYPES:
            return [], [
                RowError(
                    0,
                    "malformed",
                    f"Bundle type {_quote(bundle_type)} is not one of {', '.join(sorted(FHIR_BUNDLE_TYPES))}.",
                )
            ]
        entries = body.get("entry", [])
        if not isinstance(entries, list):
            return [], [RowError(0, "malformed", "Bundle.entry is not a list.")]
        if len(entries) > MAX_ROWS:
            return [], [
                RowError(0, "too_many_rows", f"The bundle has more than {MAX_ROWS} entries; send smaller bundles.")
            ]
        reports = [
            (row, entry.get("resource") if isinstance(entry, dict) else None) for row, entry in enumerate(entries, 1)
        ]
    else:
        return [], [
            RowError(0, "not_a_report", f"Expected a DiagnosticReport or a Bundle, not {_quote(resource_type)}.")
        ]
    rows: list[OutcomeRow] = []
    errors: list[RowError] = []
    for row, report in reports:
        outcome = _fhir_report(row, report, codes, errors)
        if outcome is not None:
            rows.append(outcome)
    if not reports:
        errors.append(RowError(0, "empty", "The bundle has no entries."))
    return rows, errors


def _fhir_location(loc: Sequence[int | str]) -> str:
    path = "DiagnosticReport"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _fhir_report(row: int, report: object, codes: CodeMap, errors: list[RowError]) -> OutcomeRow | None:
    where = f"Report {row}"
    if not isinstance(report, dict):
        errors.append(RowError(row, "malformed", f"{where}: the bundle entry has no resource."))
        return None
    if report.get("resourceType") != "DiagnosticReport":
        errors.append(
            RowError(row, "not_a_report", f"{where} is a {_quote(report.get('resourceType'))}, not a DiagnosticReport.")
        )
        return None
    try:
        model = DiagnosticReport.model_validate(report)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        errors.append(
            RowError(
                row,
                "malformed",
                f"{where} is not a valid FHIR DiagnosticReport: {_fhir_location(first['loc'])}: {_short(first['msg'])}",
            )
        )
        return None
    except Exception as err:  # fhir.resources also fails otherwise, e.g. KeyError on an unknown resourceType
        errors.append(
            RowError(row, "malformed", f"{where} is not a valid FHIR DiagnosticReport ({_short(repr(err))}).")
        )
        return None
    # From here on the report is read as the model normalised it: every value has its FHIR JSON type.
    report = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    status = report["status"]
    if status not in REPORT_STATUSES:
        errors.append(
            RowError(
                row, "malformed", f"{where}: DiagnosticReport.status {_quote(status)} is not a FHIR report status."
            )
        )
        return None
    if status not in FINAL_STATUSES:
        errors.append(
            RowError(row, "not_final", f"{where} has status {status}; only final, amended or corrected reports count.")
        )
        return None
    contained = {
        resource["id"]: resource
        for resource in report.get("contained", [])
        if isinstance(resource, dict) and isinstance(resource.get("id"), str)
    }
    key = _fhir_film_key(report, contained)
    if key is None:
        errors.append(
            RowError(
                row,
                "no_film_key",
                f"{where} names no film: give an identifier with system {REQUEST_ID_SYSTEM} (the request id) or an "
                f"imagingStudy referencing a contained ImagingStudy with a {DICOM_UID_SYSTEM} identifier.",
            )
        )
        return None
    problem = _key_problem(key)
    if problem is not None:
        errors.append(RowError(row, "bad_value", f"{where}: {key.kind} {problem}."))
        return None
    film = _Film(row, key)
    film.message_id = report.get("id")
    film.note_time(_parse_iso(report["issued"]) if "issued" in report else None)
    results = report.get("result", [])
    before = len(errors)
    for number, reference in enumerate(results):
        at = f"{where}, result[{number}]"
        target = reference.get("reference", "")
        observation = contained.get(target[1:]) if target.startswith("#") else None
        if observation is None or observation.get("resourceType") != "Observation":
            errors.append(
                RowError(
                    row,
                    "unresolved_reference",
                    f"{at}: {_quote(target)} is not a contained Observation; contain the Observations and refer "
                    "to them as #id.",
                )
            )
            continue
        verdict = _fhir_observation(row, at, observation, codes)
        if isinstance(verdict, RowError):
            errors.append(verdict)
            continue
        correction = status in CORRECTION_STATUSES or observation.get("status") in CORRECTION_STATUSES
        conflict = film.add(*verdict, row, at, correction=correction)
        if conflict is not None:
            errors.append(conflict)
    if not results and len(errors) == before:
        errors.append(RowError(row, "no_verdicts", f"{where} has no result Observations."))
    return film.outcome()


def _fhir_film_key(report: Mapping[str, Any], contained: Mapping[str, JSONDict]) -> FilmKey | None:
    """The request id identifier, else the DICOM UIDs of the first contained ImagingStudy that has one."""
    for identifier in report.get("identifier", []):
        if identifier.get("system") == REQUEST_ID_SYSTEM and identifier.get("value"):
            return FilmKey("request_id", identifier["value"])
    for reference in report.get("imagingStudy", []):
        target = reference.get("reference", "")
        study = contained.get(target[1:]) if target.startswith("#") else None
        if study is None or study.get("resourceType") != "ImagingStudy":
            continue
        for identifier in study.get("identifier", []):
            if identifier.get("system") == DICOM_UID_SYSTEM and identifier.get("value"):
                series = study.get("series", [])
                if len(series) == 1 and len(series[0].get("instance", [])) == 1:
                    return FilmKey("sop_instance_uid", series[0]["instance"][0]["uid"])
                return FilmKey("study_instance_uid", identifier["value"].removeprefix("urn:oid:"))
    return None


def _fhir_observation(
    row: int, at: str, observation: Mapping[str, Any], codes: CodeMap
) -> tuple[FindingLabel, bool] | RowError:
    status = observation["status"]
    if status not in OBSERVATION_STATUSES:
        return RowError(row, "malformed", f"{at}: Observation.status {_quote(status)} is not a FHIR status.")
    if status not in FINAL_STATUSES:
        return RowError(
            row, "not_final", f"{at}: the Observation has status {status}; only final, amended or corrected count."
        )
    codings = observation["code"].get("coding", [])
    label = next(
        (found for c in codings if (found := codes.label(c.get("system"), c.get("code", ""))) is not None), None
    )
    if label is None:
        named = ", ".join(f"{c.get('system', '')}|{c.get('code', '')}" for c in codings) or "no coding"
        return RowError(
            row, "unknown_code", f"{at}: no coding of the Observation is in the code map ({_short(named, 150)})."
        )
    verdicts: set[bool] = set()
    if isinstance(observation.get("valueBoolean"), bool):
        verdicts.add(observation["valueBoolean"])
    for coding in observation.get("valueCodeableConcept", {}).get("coding", []):
        if coding.get("system") == SNOMED and coding.get("code") in PRESENCE_BY_SNOMED:
            verdicts.add(PRESENCE_BY_SNOMED[coding["code"]])
    for concept in observation.get("interpretation", []):
        for coding in concept.get("coding", []):
            if coding.get("system") == INTERPRETATION and coding.get("code") in PRESENCE_BY_INTERPRETATION:
                verdicts.add(PRESENCE_BY_INTERPRETATION[coding["code"]])
    if len(verdicts) != 1:
        why = "says both present and absent" if verdicts else "states neither present nor absent"
        return RowError(
            row,
            "bad_value",
            f"{at} ({label}) {why}: give valueCodeableConcept SNOMED CT 52101004 (present) or 2667000 (absent), "
            "valueBoolean, or interpretation POS/NEG.",
        )
    return label, verdicts.pop()


# --- HL7 v2 ORU^R01 ------------------------------------------------------------------------------------------------


def parse_hl7(text: str, codes: CodeMap) -> tuple[list[OutcomeRow], list[RowError]]:
    """Outcomes from one or more HL7 v2 ``ORU^R01`` messages (segments split by CR or LF, each message from MSH).

    Per order (OBR and what follows it): the film is the ZDS segment's Study Instance UID (IHE Radiology), else the
    OBR-3 filler order number as the request id. Each OBX names a finding in OBX-3 (code^text^system, through
    ``codes``) and its verdict in OBX-5 (SNOMED CT present/absent, or the words present/absent/positive/negative);
    only F (final) and C (corrected) results count (OBX-11, else OBR-25). ``row``: the message's 1-based position.
    """
    messages = _split_messages(text)
    if not messages:
        return [], [RowError(0, "empty", "The submission holds no HL7 message.")]
    if len(messages) > MAX_ROWS:
        return [], [RowError(0, "too_many_rows", f"More than {MAX_ROWS} messages; send them in smaller batches.")]
    rows: list[OutcomeRow] = []
    errors: list[RowError] = []
    for row, segments in enumerate(messages, start=1):
        rows.extend(_hl7_message(row, segments, codes, errors))
    return rows, errors


def _split_messages(text: str) -> list[list[str]]:
    """The messages of a submission, each a list of segments; MLLP framing bytes are dropped."""
    messages: list[list[str]] = []
    for line in re.split(r"\r\n|\r|\n", text.replace("\x0b", "").replace("\x1c", "")):
        segment = line.strip()
        if not segment:
            continue
        if segment.startswith("MSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return messages


@dataclass
class _Order:
    """An OBR and the ZDS and OBX segments that follow it."""

    obr: Mapping[int, str]
    zds: Mapping[int, str] | None = None
    obx: list[Mapping[int, str]] = field(default_factory=list)


class _Er7:
    """Reads a parsed message's fields as text: first repetition, split into components, escapes undone."""

    def __init__(self, encoding: Mapping[str, str]) -> None:
        self.component = encoding["COMPONENT"]
        self.repetition = encoding["REPETITION"]
        self.escape = encoding["ESCAPE"]
        self.unescaped = {
            "F": encoding["FIELD"],
            "S": encoding["COMPONENT"],
            "T": encoding["SUBCOMPONENT"],
            "R": encoding["REPETITION"],
            "E": encoding["ESCAPE"],
        }
        esc = re.escape(self.escape)
        self._sequence = re.compile(f"{esc}([FSTRE]){esc}")

    def fields(self, segment: Any) -> dict[int, str]:
        """Field number -> ER7 text of its first repetition (hl7apy lists each repetition as its own child)."""
        found: dict[int, str] = {}
        for child in segment.children:
            number = int(child.name.rsplit("_", 1)[1])
            found.setdefault(number, child.to_er7())
        return found

    def components(self, raw: str) -> list[str]:
        return [self.text(part) for part in raw.split(self.repetition, 1)[0].split(self.component)]

    def text(self, raw: str) -> str:
        return self._sequence.sub(lambda match: self.unescaped[match.group(1)], raw).strip()


def _component(components: Sequence[str], index: int) -> str:
    return components[index] if index < len(components) else ""


def _hl7_message(row: int, segments: list[str], codes: CodeMap, errors: list[RowError]) -> list[OutcomeRow]:
    """The films of one message (one per OBR that yields a verdict); its problems are appended to ``errors``."""
    where = f"Message {row}"
    if not segments[0].startswith("MSH"):
        errors.append(RowError(row, "malformed", f"{where} does not start with an MSH segment."))
        return []
    try:
        message = parse_message("\r".join(segments), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        er7 = _Er7(message.encoding_chars)
        parsed = [(segment.name, er7.fields(segment)) for segment in message.children]
    except Exception as err:  # hl7apy raises a variety of errors on hostile input; each is this message's problem
        errors.append(RowError(row, "malformed", f"{where} is not parseable HL7 v2 ({_short(str(err))})."))
        return []
    msh = parsed[0][1]
    kind = er7.components(msh.get(9, ""))
    if kind[:2] != ["ORU", "R01"]:
        errors.append(
            RowError(row, "not_a_report", f"{where} is {_quote('^'.join(kind[:2]))}; outcomes come as ORU^R01.")
        )
        return []
    message_id = er7.text(msh.get(10, "")) or None
    orders: list[_Order] = []
    leading_zds: Mapping[int, str] | None = None
    for name, fields in parsed[1:]:
        if name == "OBR":
            orders.append(_Order(fields))
        elif name == "ZDS":
            if not orders:
                leading_zds = leading_zds or fields
            elif orders[-1].zds is None:
                orders[-1].zds = fields
        elif name == "OBX":
            if not orders:
                errors.append(RowError(row, "malformed", f"{where}: an OBX comes before any OBR."))
                return []
            orders[-1].obx.append(fields)
    if not orders:
        errors.append(RowError(row, "no_verdicts", f"{where} has no OBR/OBX: no verdict to read."))
        return []
    if orders[0].zds is None:
        orders[0].zds = leading_zds
    films = []
    for number, order in enumerate(orders, start=1):
        at = where if len(orders) == 1 else f"{where}, OBR {number}"
        outcome = _hl7_order(row, at, order, msh, message_id, er7, codes, errors)
        if outcome is not None:
            films.append(outcome)
    return films


def _hl7_order(
    row: int,
    at: str,
    order: _Order,
    msh: Mapping[int, str],
    message_id: str | None,
    er7: _Er7,
    codes: CodeMap,
    errors: list[RowError],
) -> OutcomeRow | None:
    study_uid = _component(er7.components(order.zds.get(1, "")), 0) if order.zds is not None else ""
    filler = _component(er7.components(order.obr.get(3, "")), 0)
    if study_uid:
        key = FilmKey("study_instance_uid", study_uid.removeprefix("urn:oid:"))
    elif filler:
        key = FilmKey("request_id", filler)
    else:
        errors.append(
            RowError(
                row, "no_film_key", f"{at} names no film: give a ZDS Study Instance UID or the request id in OBR-3."
            )
        )
        return None
    problem = _key_problem(key)
    if problem is not None:
        errors.append(RowError(row, "bad_value", f"{at}: {key.kind} {problem}."))
        return None
    stamp = _component(er7.components(order.obr.get(22, "")), 0) or _component(er7.components(msh.get(7, "")), 0)
    reported_at = _parse_hl7_time(stamp) if stamp else None
    if stamp and reported_at is None:
        errors.append(RowError(row, "bad_value", f"{at}: {_quote(stamp)} (OBR-22 or MSH-7) is not an HL7 date-time."))
        return None
    film = _Film(row, key)
    film.message_id = message_id
    film.reported_at = reported_at
    order_status = er7.text(order.obr.get(25, "")).upper()
    before = len(errors)
    for obx in order.obx:
        set_id = er7.text(obx.get(1, "")) or "?"
        where = f"{at}, OBX {set_id}"
        status = er7.text(obx.get(11, "")).upper() or order_status
        if status not in HL7_FINAL_STATUSES:
            errors.append(
                RowError(
                    row,
                    "not_final",
                    f"{where} has result status {_quote(status)} (OBX-11, else OBR-25); only F (final) and "
                    "C (corrected) count.",
                )
            )
            continue
        verdict = _hl7_observation(row, where, obx, er7, codes)
        if isinstance(verdict, RowError):
            errors.append(verdict)
            continue
        conflict = film.add(*verdict, row, where, correction=status == HL7_CORRECTION)
        if conflict is not None:
            errors.append(conflict)
    if not order.obx and len(errors) == before:
        errors.append(RowError(row, "no_verdicts", f"{at} has no OBX segments."))
    return film.outcome()


def _hl7_observation(
    row: int, where: str, obx: Mapping[int, str], er7: _Er7, codes: CodeMap
) -> tuple[FindingLabel, bool] | RowError:
    identifier = er7.components(obx.get(3, ""))
    label = None
    for code_at, system_at in ((0, 2), (3, 5)):  # the coding, then the alternate coding of a CE/CWE
        code = _component(identifier, code_at)
        if code:
            label = codes.label(_component(identifier, system_at) or None, code)
            if label is not None:
                break
    if label is None:
        return RowError(
            row,
            "unknown_code",
            f"{where}: OBX-3 {_quote('^'.join(identifier))} is not in the code map (code^text^system).",
        )
    value_type = er7.text(obx.get(2, "")).upper()
    raw = obx.get(5, "")
    present: bool | None = None
    if value_type in HL7_CODED_TYPES:
        value = er7.components(raw)
        codes_given = (_component(value, 0), _component(value, 3))
        present = next((PRESENCE_BY_SNOMED[c] for c in codes_given if c in PRESENCE_BY_SNOMED), None)
    elif value_type in HL7_TEXT_TYPES:
        present = TEXT_VERDICTS.get(er7.text(raw.split(er7.repetition, 1)[0]).lower())
    if present is None:
        return RowError(
            row,
            "bad_value",
            f"{where} ({label}): OBX-5 {_quote(raw)} of type {_quote(value_type)} is neither present nor absent; "
            "send CE/CWE SNOMED CT 52101004 (present) or 2667000 (absent), or ST text present/absent.",
        )
    return label, present


def _parse_hl7_time(stamp: str) -> datetime | None:
    """An HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]``) in UTC; no offset means UTC."""
    match = _HL7_DTM.match(stamp)
    if match is None:
        return None
    parts = match.groupdict()
    try:
        moment = datetime(
            int(parts["y"]),
            int(parts["mo"] or 1),
            int(parts["d"] or 1),
            int(parts["h"] or 0),
            int(parts["mi"] or 0),
            int(parts["s"] or 0),
            int((parts["frac"] or "0").ljust(6, "0")),
        )
        if parts["tz"]:
            sign = -1 if parts["tz"][0] == "-" else 1
            hours, minutes = int(parts["tz"][1:3]), int(parts["tz"][3:5])
            if hours > 14 or minutes > 59:
                return None
            moment = moment.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
    except ValueError:
        return None
    return _as_utc(moment)
