"""Radiologists' verdicts into the audit trail, beside the predictions they judge: all of a submission or none.

Each verdict row names its film by the service's request id (and item index in a batch), or by DICOM SOP or Study
Instance UID (matched through their digests, ``service.audit.uids``). A row is refused, with the reason, when its
film is unknown or ambiguous, when the film's record has no prediction for the finding, when the finding already
has a verdict (the same one: a duplicate; another one: a contradiction), or when the parser refused it. One refused
row refuses the submission: nothing is half-written, and the sender fixes the rows named and sends it again.

A correction (``OutcomeRow.corrected``: an amended report, an HL7 status C, a CSV ``status`` corrected) replaces
the stored verdict for its finding, and the verdict it replaced goes to ``audit_outcome_corrections`` with when and
who; a correction that agrees with the stored verdict changes nothing; one for a finding without a verdict is
stored as the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, insert, select, update

from service.audit.models import AuditEvent, AuditFinding, AuditOutcome, AuditOutcomeCorrection
from service.audit.store import AuditStore
from service.audit.uids import uid_digest
from service.outcomes.parsing import FilmKey, OutcomeRow, RowError


@dataclass(frozen=True)
class OutcomeReceipt:
    """What became of a submission: stored (``errors`` empty) or refused whole."""

    films: int
    verdicts: int
    errors: list[RowError]
    #: Of ``verdicts``, corrections that replaced a stored verdict.
    corrected: int = 0

    @property
    def stored(self) -> bool:
        return not self.errors


def _candidates(connection: Connection, key: FilmKey) -> list[int]:
    """Primary keys of the answered records ``key`` names, newest first."""
    answered = AuditEvent.status == 200
    if key.kind == "request_id":
        where = and_(answered, AuditEvent.request_id == key.value)
        if key.item_index is not None:
            where = and_(where, AuditEvent.item_index == key.item_index)
    elif key.kind == "sop_instance_uid":
        where = and_(answered, AuditEvent.sop_uid_sha256 == uid_digest(key.value))
    else:
        where = and_(answered, AuditEvent.study_uid_sha256 == uid_digest(key.value))
    rows = connection.execute(
        select(AuditEvent.id, AuditEvent.sop_uid_sha256).where(where).order_by(AuditEvent.id.desc())
    ).all()
    if key.kind == "study_instance_uid" and len({sop for _, sop in rows}) > 1:
        return [-1]  # several films of the study were scored: the verdict must name one (SOP Instance UID)
    if key.kind == "request_id" and key.item_index is None and len(rows) > 1:
        return [-1]  # a batch or STOW-RS request: the verdict must name the film's item index
    return [int(pk) for pk, _ in rows]


def _describe(key: FilmKey) -> str:
    where = f" item {key.item_index}" if key.item_index is not None else ""
    return f"{key.kind.replace('_', ' ')} {key.value[:80]}{where}"


def store_outcomes(
    store: AuditStore,
    rows: Sequence[OutcomeRow],
    parse_errors: Sequence[RowError],
    *,
    source: str,
    submitted_by: str | None,
    received_at: datetime,
) -> OutcomeReceipt:
    """Match ``rows`` to their films and store every verdict in one transaction, or none (see the module)."""
    errors = list(parse_errors)
    inserts: list[dict[str, object]] = []
    corrections: list[tuple[int, dict[str, object], dict[str, object]]] = []  # (outcome pk, new values, history)
    films: set[int] = set()
    with store.engine.begin() as connection:
        for row in rows:
            found = _candidates(connection, row.key)
            if not found:
                errors.append(RowError(row.row, "unknown_film", f"No scored film has {_describe(row.key)}."))
                continue
            if found == [-1]:
                errors.append(
                    RowError(
                        row.row,
                        "ambiguous_film",
                        f"Several scored films have {_describe(row.key)}: name one by its SOP Instance UID, or by "
                        "request id and item index.",
                    )
                )
                continue
            event = found[0]  # a film scored twice (a retry): the newest answer is the one that was acted on
            scored = set(connection.scalars(select(AuditFinding.label).where(AuditFinding.event_pk == event)))
            known = {
                label: (int(pk), present, when)
                for pk, label, present, when in connection.execute(
                    select(AuditOutcome.id, AuditOutcome.label, AuditOutcome.present, AuditOutcome.received_at).where(
                        AuditOutcome.event_pk == event
                    )
                )
            }
            for label, present in row.verdicts.items():
                values: dict[str, object] = {
                    "present": present,
                    "source": source,
                    "received_at": received_at,
                    "reported_at": row.reported_at,
                    "submitted_by": submitted_by,
                    "message_id": row.message_id,
                }
                if label not in scored:
                    errors.append(
                        RowError(row.row, "not_scored", f"The film's prediction has no {label}: nothing to judge.")
                    )
                elif label in known and label in row.corrected and known[label][0] == -1:
                    # Corrects a verdict earlier in this submission (a bundle's final report, then its amendment):
                    # the stored verdict is the correction's; nothing was there before it.
                    pending = next(r for r in inserts if r["event_pk"] == event and r["label"] == label)
                    pending.update(values)
                    known[label] = (-1, present, received_at)
                elif label in known and label in row.corrected:
                    pk, before, when = known[label]
                    if before != present:
                        history = {"outcome_pk": pk, "previous_present": before, "previous_received_at": when}
                        corrections.append((pk, values, {**values, **history}))
                        known[label] = (pk, present, received_at)
                        films.add(event)
                elif label in known:
                    same = known[label][1] == present
                    stored = "present" if known[label][1] else "absent"
                    errors.append(
                        RowError(
                            row.row,
                            "duplicate" if same else "contradicts",
                            f"{label} already has a verdict for this film"
                            + (
                                "."
                                if same
                                else f" ({stored}), and this one differs. If the radiologist changed it, send it as "
                                "a correction: a FHIR report or Observation with status amended or corrected, HL7 "
                                "result status C, or a CSV/NDJSON line with status corrected."
                            ),
                        )
                    )
                else:
                    inserts.append({"event_pk": event, "label": label, **values})
                    known[label] = (-1, present, received_at)
                    films.add(event)
        if errors:
            return OutcomeReceipt(films=0, verdicts=0, errors=sorted(errors, key=lambda e: e.row))
        if inserts:
            connection.execute(insert(AuditOutcome), inserts)
        for pk, values, history in corrections:
            connection.execute(update(AuditOutcome).where(AuditOutcome.id == pk).values(**values))
            connection.execute(insert(AuditOutcomeCorrection).values(**history))
    return OutcomeReceipt(
        films=len(films), verdicts=len(inserts) + len(corrections), errors=[], corrected=len(corrections)
    )
