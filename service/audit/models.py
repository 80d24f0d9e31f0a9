"""The audit trail's schema, in one module (SQLAlchemy 2 declarative). Alembic migrations are generated from it.

One ``audit_events`` row per image a prediction route handled (a batch upload: one per file), refusals
included; one ``audit_findings`` row per trained label of a row that produced predictions. Nothing here can
hold a patient identifier: inputs are known by their sha256, format, size and photometric interpretation,
never a DICOM header value; clients by a key id, never the key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: BIGINT on PostgreSQL; SQLite only auto-increments an ``INTEGER PRIMARY KEY``.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class AuditEvent(Base):
    """One prediction request (or one file of a batch), answered or refused."""

    __tablename__ = "audit_events"

    #: Insertion order: the read API's cursor.
    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    #: Unique per record (uuid4 hex): replaying the on-disk spool twice cannot duplicate a record.
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    #: Position in a batch upload; None for the single-image routes.
    item_index: Mapped[int | None] = mapped_column(Integer)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    route: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str] = mapped_column(String(100))
    model_sha256: Mapped[str] = mapped_column(String(64))
    input_sha256: Mapped[str] = mapped_column(String(64))
    #: sha256 of a DICOM upload's Study and SOP Instance UIDs (``service.audit.uids``): how a radiologist's verdict
    #: sent by UID finds its film, without the trail holding the UIDs; NULL for other uploads and older records.
    study_uid_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_uid_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    input_bytes: Mapped[int] = mapped_column(BigInteger)
    input_format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    photometric: Mapped[str | None] = mapped_column(String(32))
    mc_samples: Mapped[int | None] = mapped_column(Integer)
    refer: Mapped[bool | None] = mapped_column(Boolean, index=True)
    referral_reasons: Mapped[list[str]] = mapped_column(JSON)
    population: Mapped[list[str]] = mapped_column(JSON)
    #: ``referral.population_verified`` / ``.population_missing``; NULL in records older than revision 0002.
    population_verified: Mapped[bool | None] = mapped_column(Boolean)
    population_missing: Mapped[list[str] | None] = mapped_column(JSON)
    #: What the image's decoding and header checks noted (``image.warnings``); NULL in records older than 0003.
    warnings: Mapped[list[str] | None] = mapped_column(JSON)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood_threshold: Mapped[float | None] = mapped_column(Float)
    in_distribution: Mapped[bool | None] = mapped_column(Boolean)
    latency_ms: Mapped[float] = mapped_column(Float)

    findings: Mapped[list[AuditFinding]] = relationship(
        back_populates="event", cascade="all, delete-orphan", passive_deletes=True, order_by="AuditFinding.label"
    )


class AuditFinding(Base):
    """One label's output for one audited image."""

    __tablename__ = "audit_findings"

    event_pk: Mapped[int] = mapped_column(_ID, ForeignKey("audit_events.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    conf: Mapped[float] = mapped_column(Float)
    std: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16), index=True)
    #: 5th and 95th percentile of the MC samples (the rule's "interval" score); NULL in records older than 0004.
    interval_low: Mapped[float | None] = mapped_column(Float)
    interval_high: Mapped[float | None] = mapped_column(Float)

    event: Mapped[AuditEvent] = relationship(back_populates="findings")


class AuditOutcome(Base):
    """A radiologist's final verdict on one finding of one audited film (issue #30, docs/guarantee.md)."""

    __tablename__ = "audit_outcomes"
    __table_args__ = (UniqueConstraint("event_pk", "label", name="uq_audit_outcomes_event_label"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    event_pk: Mapped[int] = mapped_column(_ID, ForeignKey("audit_events.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column(Boolean)
    #: How it arrived: "fhir", "hl7", "csv" or "ndjson".
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The key id of the sender (as ``audit_events.client_id``), never the key.
    submitted_by: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(128))


class AuditOutcomeCorrection(Base):
    """A verdict the radiologist changed after signing it: what it was before the correction replaced it in
    ``audit_outcomes`` (which holds the verdict that stands), when, and who sent the correction."""

    __tablename__ = "audit_outcome_corrections"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    outcome_pk: Mapped[int] = mapped_column(_ID, ForeignKey("audit_outcomes.id", ondelete="CASCADE"), index=True)
    previous_present: Mapped[bool] = mapped_column(Boolean)
    previous_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    present: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submitted_by: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(128))


class GuaranteeTransition(Base):
    """One change of the referral rule's operating state: who, when, why (docs/guarantee.md)."""

    __tablename__ = "guarantee_transitions"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    previous_state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(1000))
