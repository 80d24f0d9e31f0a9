"""The audit database: engine set-up (SQLite WAL or PostgreSQL), Alembic migrations, writes, queries, purge.

Every method blocks; the service calls them from the writer thread (:mod:`service.audit.writer`) or a worker
thread, never from the event loop.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, exists, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, selectinload

from service.audit.models import AuditEvent, AuditFinding, AuditOutcome
from service.schemas import AuditFindingRecord, AuditRecord, ModelRef, OODResult, Referral

log = logging.getLogger("service.audit")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Any fixed 64-bit number: serialises concurrent start-ups (several Gunicorn workers) migrating PostgreSQL.
_PG_MIGRATION_LOCK = 0x63787261756469


SqliteSynchronous = Literal["FULL", "NORMAL"]


def create_audit_engine(url: str, *, sqlite_synchronous: SqliteSynchronous = "NORMAL") -> Engine:
    """An engine for ``url``. SQLite: WAL journal (readers never block the writer), foreign keys on, and
    ``synchronous=FULL`` (each commit fsyncs the WAL: a committed record survives a power cut) or ``NORMAL``
    (no fsync per commit: a committed record survives a crash of the service, SIGKILL included, but not of the
    operating system). PostgreSQL: psycopg 3, pre-ping."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(parsed, pool_pre_ping=True, pool_size=2, connect_args=connect_args)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe with several processes starting)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    lock_path = Path(f"{database}.migrate-lock") if database and database != ":memory:" else None
    lock_file = lock_path.open("a") if lock_path is not None else None
    try:
        if lock_file is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        if lock_file is not None:
            lock_file.close()


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the read API and the monitor; None means any."""

    since: datetime | None = None
    until: datetime | None = None
    model: str | None = None
    label: str | None = None
    decision: str | None = None
    refer: bool | None = None


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were stored in UTC); PostgreSQL aware."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _event_values(record: AuditRecord) -> dict[str, Any]:
    """The ``audit_events`` columns of ``record`` (Core inserts: several times cheaper than ORM objects)."""
    return {
        "event_id": record.event_id,
        "request_id": record.request_id,
        "item_index": record.item_index,
        "occurred_at": as_utc(record.occurred_at),
        "route": record.route,
        "client_id": record.client_id,
        "status": record.status,
        "error": record.error,
        "model_name": record.model.name,
        "model_version": record.model.version,
        "model_sha256": record.model.sha256,
        "input_sha256": record.input_sha256,
        "study_uid_sha256": record.study_uid_sha256,
        "sop_uid_sha256": record.sop_uid_sha256,
        "input_bytes": record.input_bytes,
        "input_format": record.input_format,
        "width": record.width,
        "height": record.height,
        "photometric": record.photometric,
        "warnings": list(record.warnings),
        "mc_samples": record.mc_samples,
        "refer": None if record.referral is None else record.referral.refer,
        "referral_reasons": [] if record.referral is None else list(record.referral.reasons),
        "population": [] if record.referral is None else list(record.referral.population),
        "population_verified": None if record.referral is None else record.referral.population_verified,
        "population_missing": None if record.referral is None else list(record.referral.population_missing),
        "ood_score": None if record.ood is None else record.ood.score,
        "ood_threshold": None if record.ood is None else record.ood.threshold,
        "in_distribution": None if record.ood is None else record.ood.in_distribution,
        "latency_ms": record.latency_ms,
    }


def from_row(row: AuditEvent) -> AuditRecord:
    ood = None
    if row.ood_score is not None and row.ood_threshold is not None and row.in_distribution is not None:
        ood = OODResult(score=row.ood_score, threshold=row.ood_threshold, in_distribution=row.in_distribution)
    referral = None
    if row.refer is not None:
        referral = Referral.model_validate(
            {
                "refer": row.refer,
                "reasons": row.referral_reasons,
                "population": row.population,
                "population_verified": bool(row.population_verified),  # NULL: a record older than the field
                "population_missing": row.population_missing or [],
            }
        )
    return AuditRecord.model_validate(
        {
            "event_id": row.event_id,
            "request_id": row.request_id,
            "item_index": row.item_index,
            "occurred_at": as_utc(row.occurred_at),
            "route": row.route,
            "client_id": row.client_id,
            "status": row.status,
            "error": row.error,
            "model": ModelRef(name=row.model_name, version=row.model_version, sha256=row.model_sha256),
            "input_sha256": row.input_sha256,
            "study_uid_sha256": row.study_uid_sha256,
            "sop_uid_sha256": row.sop_uid_sha256,
            "input_bytes": row.input_bytes,
            "input_format": row.input_format,
            "width": row.width,
            "height": row.height,
            "photometric": row.photometric,
            "warnings": row.warnings or [],
            "mc_samples": row.mc_samples,
            "findings": {
                f.label: AuditFindingRecord.model_validate(
                    {
                        "conf": f.conf,
                        "std": f.std,
                        "decision": f.decision,
                        "interval": None if f.interval_low is None else (f.interval_low, f.interval_high),
                    }
                )
                for f in row.findings
            },
            "referral": referral,
            "ood": ood,
            "latency_ms": row.latency_ms,
        }
    )


class AuditStore:
    """Writes and reads audit records in one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(
        cls, url: str, *, migrate_schema: bool = True, sqlite_synchronous: SqliteSynchronous = "NORMAL"
    ) -> AuditStore:
        engine = create_audit_engine(url, sqlite_synchronous=sqlite_synchronous)
        if migrate_schema:
            migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def insert(self, records: Sequence[AuditRecord], *, skip_existing: bool = False) -> int:
        """Insert ``records`` in one transaction; committed (durable) when this returns. ``skip_existing``: leave
        out event ids already stored (replaying a spool file whose earlier replay committed but was not deleted).
        Returns how many rows were inserted."""
        wanted = list(records)
        with self.engine.begin() as connection:
            if skip_existing and wanted:
                ids = [r.event_id for r in wanted]
                stored = set(connection.scalars(select(AuditEvent.event_id).where(AuditEvent.event_id.in_(ids))))
                wanted = [r for r in wanted if r.event_id not in stored]
            if not wanted:
                return 0
            statement = insert(AuditEvent).returning(AuditEvent.id, sort_by_parameter_order=True)
            keys = list(connection.scalars(statement, [_event_values(r) for r in wanted]))
            findings = [
                {
                    "event_pk": key,
                    "label": label,
                    "conf": f.conf,
                    "std": f.std,
                    "decision": f.decision,
                    "interval_low": None if f.interval is None else f.interval[0],
                    "interval_high": None if f.interval is None else f.interval[1],
                }
                for key, record in zip(keys, wanted, strict=True)
                for label, f in record.findings.items()
            ]
            if findings:
                connection.execute(insert(AuditFinding), findings)
        return len(wanted)

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def _select(self, query: AuditQuery) -> Any:
        statement = select(AuditEvent).options(selectinload(AuditEvent.findings))
        if query.since is not None:
            statement = statement.where(AuditEvent.occurred_at >= as_utc(query.since))
        if query.until is not None:
            statement = statement.where(AuditEvent.occurred_at < as_utc(query.until))
        if query.model is not None:
            statement = statement.where(AuditEvent.model_name == query.model)
        if query.refer is not None:
            statement = statement.where(AuditEvent.refer == query.refer)
        if query.label is not None or query.decision is not None:
            finding = exists().where(AuditFinding.event_pk == AuditEvent.id)
            if query.label is not None:
                finding = finding.where(AuditFinding.label == query.label)
            if query.decision is not None:
                finding = finding.where(AuditFinding.decision == query.decision)
            statement = statement.where(finding)
        return statement

    def page(
        self, query: AuditQuery, *, after: int | None = None, limit: int = 100
    ) -> tuple[list[AuditRecord], int | None]:
        """Records matching ``query`` in insertion order after the row ``after``; and the cursor of the next page."""
        statement = self._select(query).order_by(AuditEvent.id).limit(limit + 1)
        if after is not None:
            statement = statement.where(AuditEvent.id > after)
        with Session(self.engine) as session:
            rows = list(session.scalars(statement))
            more = len(rows) > limit
            rows = rows[:limit]
            return [from_row(row) for row in rows], (rows[-1].id if more and rows else None)

    def iter_records(self, query: AuditQuery, *, chunk: int = 1000) -> Iterator[AuditRecord]:
        after: int | None = None
        while True:
            records, after = self.page(query, after=after, limit=chunk)
            yield from records
            if after is None:
                return

    def by_request(self, request_id: str) -> list[AuditRecord]:
        """The records of one HTTP request (a batch upload has one per file), in upload order."""
        statement = (
            select(AuditEvent)
            .options(selectinload(AuditEvent.findings))
            .where(AuditEvent.request_id == request_id)
            .order_by(AuditEvent.item_index, AuditEvent.id)
        )
        with Session(self.engine) as session:
            return [from_row(row) for row in session.scalars(statement)]

    def count(self, query: AuditQuery | None = None, *, before: datetime | None = None) -> int:
        """How many records match ``query`` (all: None) and occurred before ``before`` (any time: None)."""
        statement = select(func.count()).select_from(AuditEvent)
        if query is not None:
            statement = self._select(query).with_only_columns(func.count()).order_by(None)
        if before is not None:
            statement = statement.where(AuditEvent.occurred_at < as_utc(before))
        with Session(self.engine) as session:
            return int(session.scalar(statement) or 0)

    def purge(self, before: datetime, *, chunk: int = 1000) -> int:
        """Delete the records that occurred before ``before`` (and their findings), in short transactions of
        ``chunk`` rows so that writers are never blocked for long. Returns how many records were deleted."""
        deleted = 0
        while True:
            with Session(self.engine) as session, session.begin():
                ids = list(
                    session.scalars(
                        select(AuditEvent.id)
                        .where(AuditEvent.occurred_at < as_utc(before))
                        .order_by(AuditEvent.id)
                        .limit(chunk)
                    )
                )
                if not ids:
                    return deleted
                # Explicitly, not only by ON DELETE CASCADE: a SQLite connection without foreign keys on would
                # otherwise leave orphaned findings.
                session.execute(delete(AuditFinding).where(AuditFinding.event_pk.in_(ids)))
                session.execute(delete(AuditOutcome).where(AuditOutcome.event_pk.in_(ids)))
                session.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
                deleted += len(ids)
