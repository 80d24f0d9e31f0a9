"""The audit trail's schema, in one module (SQLAlchemy 2 declarative). Alembic migrations are generated from it.

One ``audit_events`` row per image a prediction route handled (a batch upload: one per file), refusals
included; one ``audit_findings`` row per trained label of a row that produced predictions. Nothing here can
hold a patient identifier: inputs are known by their sha256, format, size and photometric interpretation,
never a DICOM header value; clients by a key id, never the key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String
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

    event: Mapped[AuditEvent] = relationship(back_populates="findings")
