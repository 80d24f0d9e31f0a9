"""The audit trail: one durable record per image a prediction route handles (docs/audit.md).

``models`` (the schema) -> ``migrations`` (Alembic) -> ``store`` (engine, queries, purge) -> ``writer`` (the thread
that commits in batches, ``spool`` when the database is down) -> ``recorder`` (what the routes call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.audit.metrics import AuditSnapshot
from service.audit.recorder import Auditor, AuditSubject, RollingRates, client_id_for
from service.audit.spool import Spool, SpoolFullError
from service.audit.store import AuditQuery, AuditStore, SqliteSynchronous, create_audit_engine, migrate
from service.audit.writer import AuditPolicy, AuditWriter
from service.settings import AuditSettings

log = logging.getLogger("service.audit")

__all__ = [
    "AuditPolicy",
    "AuditQuery",
    "AuditStore",
    "AuditSubject",
    "AuditTrail",
    "AuditWriter",
    "Auditor",
    "RollingRates",
    "Spool",
    "SpoolFullError",
    "SqliteSynchronous",
    "client_id_for",
    "create_audit_engine",
    "migrate",
    "snapshot",
]


@dataclass
class AuditTrail:
    """What the lifespan opens and closes: the store, its writer thread and the recorder the routes use."""

    store: AuditStore
    writer: AuditWriter
    auditor: Auditor

    @classmethod
    def open(
        cls,
        url: str,
        *,
        policy: AuditPolicy,
        spool_dir: Path | None,
        spool_max_records: int,
        retention_days: int | None,
        rolling_window: int,
        durable_timeout_s: float = 60.0,
        sqlite_synchronous: SqliteSynchronous = "NORMAL",
        group_commit_s: float = 0.0,
        more_coming: Callable[[], bool] | None = None,
    ) -> AuditTrail:
        """Connect, migrate the schema to the newest revision and start the writer (blocking: call off the loop).

        Start-up fails when the database cannot be reached, whatever the policy: a service that has never
        written its trail should not begin answering."""
        store = AuditStore.open(url, sqlite_synchronous=sqlite_synchronous)
        spool = Spool(spool_dir, max_records=spool_max_records) if policy == "buffer" and spool_dir else None
        writer = AuditWriter(
            store,
            policy=policy,
            spool=spool,
            retention_days=retention_days,
            group_commit_s=group_commit_s,
            more_coming=more_coming,
        )
        writer.start()
        auditor = Auditor(writer, rolling_window=rolling_window, durable_timeout_s=durable_timeout_s)
        return cls(store=store, writer=writer, auditor=auditor)

    @classmethod
    def from_settings(
        cls, settings: AuditSettings, *, durable_timeout_s: float, more_coming: Callable[[], bool] | None = None
    ) -> AuditTrail:
        """:meth:`open` as the ``CXR_AUDIT_*`` settings say. ``more_coming``: the writer's group-commit hint
        (``LoadSignals.answers_coming``)."""
        trail = cls.open(
            settings.url,
            policy=settings.policy,
            spool_dir=settings.spool_path,
            spool_max_records=settings.spool_max_records,
            retention_days=settings.retention_days,
            rolling_window=settings.rolling_window,
            durable_timeout_s=durable_timeout_s,
            sqlite_synchronous=settings.sqlite_synchronous,
            group_commit_s=settings.group_commit_ms / 1e3,
            more_coming=more_coming,
        )
        log.info("audit trail: %s (%s)", trail.store.engine.url.render_as_string(hide_password=True), settings.policy)
        return trail

    def close(self) -> None:
        self.writer.stop()
        self.store.close()


def snapshot(trail: AuditTrail) -> AuditSnapshot:
    """The numbers /metrics exports (service.audit.metrics.AuditCollector)."""
    stats, rolling = trail.writer.stats, trail.auditor.rolling
    return AuditSnapshot(
        lag_s=trail.writer.lag_s,
        queued=trail.writer.queued,
        spool_depth=trail.writer.spool_depth,
        written=stats.written,
        commits=stats.commits,
        failures=stats.failures,
        spooled=stats.spooled,
        replayed=stats.replayed,
        purged=stats.purged,
        window=rolling.size,
        referred=rolling.referred,
        ood=rolling.ood,
        positives=dict(rolling.positives),
        conf_sum=dict(rolling.conf_sum),
        counts=dict(rolling.counts),
    )
