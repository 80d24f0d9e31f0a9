"""The audit database layer against SQLite and a real PostgreSQL: migrations, writes, filters, cursor pages,
idempotent spool replay, retention purge and the writer thread's policies."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from service.audit import AuditQuery, AuditStore, AuditWriter, Spool
from service.errors import AuditUnavailableError
from tests.audit.records import record
from tests.audit.triggers import refuse_inserts

NOW = datetime.now(timezone.utc)


def test_migrations_build_the_schema_once_and_are_idempotent(audit_url: str) -> None:
    store = AuditStore.open(audit_url)
    AuditStore.open(audit_url).close()  # a second start-up migrates nothing and breaks nothing
    try:
        tables = set(inspect(store.engine).get_table_names())
        assert {"audit_events", "audit_findings", "alembic_version"} <= tables
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
    finally:
        store.close()


def test_filters_and_cursor_pages_return_each_matching_record_once(audit_url: str) -> None:
    store = AuditStore.open(audit_url)
    try:
        old = [record(NOW - timedelta(days=10), confs={"Effusion": 0.9}, refer=True) for _ in range(3)]
        new = [record(NOW - timedelta(hours=1), confs={"Effusion": 0.1}, refer=False) for _ in range(7)]
        new[0] = new[0].model_copy(update={"warnings": ["PixelSpacing in the DICOM header is zero or negative"]})
        other = [record(NOW - timedelta(hours=1), model="other-model") for _ in range(2)]
        store.insert([*old, *new, *other])

        def ids(query: AuditQuery) -> set[str]:
            return {r.event_id for r in store.iter_records(query, chunk=3)}

        assert ids(AuditQuery()) == {r.event_id for r in (*old, *new, *other)}
        assert ids(AuditQuery(since=NOW - timedelta(days=1), model="tiny-test-model")) == {r.event_id for r in new}
        assert ids(AuditQuery(until=NOW - timedelta(days=1))) == {r.event_id for r in old}
        assert ids(AuditQuery(label="Effusion", decision="positive")) == {r.event_id for r in old}
        assert ids(AuditQuery(refer=False)) == {r.event_id for r in new}
        pages, after = [], None
        while True:
            page, after = store.page(AuditQuery(), after=after, limit=5)
            pages.append(page)
            if after is None:
                break
        assert [len(p) for p in pages] == [5, 5, 2]
        stored = store.by_request(new[0].request_id)
        assert stored == [new[0]]  # every field round-trips
    finally:
        store.close()


def test_spool_replay_after_a_crash_duplicates_nothing(audit_url: str) -> None:
    store = AuditStore.open(audit_url)
    try:
        batch = [record(NOW) for _ in range(4)]
        assert store.insert(batch[:2]) == 2
        assert store.insert(batch, skip_existing=True) == 2  # the first two were committed before the "crash"
        assert store.count() == 4
    finally:
        store.close()


def test_purge_deletes_only_records_past_retention_with_their_findings(audit_url: str) -> None:
    store = AuditStore.open(audit_url)
    try:
        keep = [record(NOW - timedelta(days=10)) for _ in range(3)]
        store.insert([record(NOW - timedelta(days=400)) for _ in range(5)] + keep)
        assert store.purge(NOW - timedelta(days=200), chunk=2) == 5
        assert [r.event_id for r in store.iter_records(AuditQuery())] == [r.event_id for r in keep]
        with store.engine.connect() as connection:
            findings = connection.execute(text("SELECT count(*) FROM audit_findings")).scalar_one()
        assert findings == 3 * len(keep[0].findings)
    finally:
        store.close()


def test_fail_closed_writer_fails_while_the_database_refuses_then_recovers(audit_url: str) -> None:
    store = AuditStore.open(audit_url)
    writer = AuditWriter(store, policy="fail-closed", spool=None)
    writer.start()
    try:
        writer.submit(record(NOW)).result(timeout=30)
        with refuse_inserts(store.engine), pytest.raises(AuditUnavailableError):
            writer.submit(record(NOW)).result(timeout=30)
        writer.submit(record(NOW)).result(timeout=30)
        assert store.count() == 2
        assert writer.stats.failures == 1
    finally:
        writer.stop()
        store.close()


def test_buffer_writer_spools_replays_and_refuses_when_the_spool_is_full(audit_url: str, tmp_path: Path) -> None:
    store = AuditStore.open(audit_url)
    spool = Spool(tmp_path / "spool", max_records=3)
    writer = AuditWriter(store, policy="buffer", spool=spool, retry_s=0.05)
    writer.start()
    try:
        with refuse_inserts(store.engine):
            for _ in range(3):
                writer.submit(record(NOW)).result(timeout=30)  # durable in the spool
            assert spool.depth == 3 and store.count() == 0
            with pytest.raises(AuditUnavailableError):
                writer.submit(record(NOW)).result(timeout=30)  # no room left anywhere
        # A spool file survives a restart of the writer (a new process reads the same directory).
        assert Spool(tmp_path / "spool", max_records=3).depth == 3
        writer.submit(record(NOW)).result(timeout=30)
        assert spool.depth == 0
        assert store.count() == 4
        assert writer.stats.replayed == 3
    finally:
        writer.stop()
        store.close()


def test_the_migrations_build_exactly_the_models_schema(audit_url: str) -> None:
    """A model change without its reviewed migration fails here (Alembic's autogenerate comparison)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.audit.models import Base

    store = AuditStore.open(audit_url)
    try:
        with store.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        store.close()


def test_the_purge_command_is_safe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.audit.__main__ import main

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    assert main(["--url", url, "migrate"]) == 0
    store = AuditStore.open(url)
    store.insert([record(NOW - timedelta(days=300)), record(NOW - timedelta(days=1))])
    with pytest.raises(SystemExit):
        main(["--url", url, "purge", "--older-than-days", "30"])  # shorter than six months: refused
    assert main(["--url", url, "purge", "--older-than-days", "200", "--dry-run"]) == 0
    assert "would delete 1 records" in capsys.readouterr().out and store.count() == 2
    assert main(["--url", url, "purge", "--older-than-days", "200"]) == 0
    assert store.count() == 1 and store.count(AuditQuery(refer=True)) == 1
    store.close()


@pytest.mark.parametrize(("mode", "pragma"), [("FULL", 2), ("NORMAL", 1)])
def test_sqlite_runs_in_wal_mode_with_the_chosen_synchronous_level(tmp_path: Path, mode: str, pragma: int) -> None:
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.sqlite3'}", sqlite_synchronous=mode)  # type: ignore[arg-type]
    try:
        with store.engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert connection.execute(text("PRAGMA synchronous")).scalar_one() == pragma
    finally:
        store.close()


def test_group_commit_holds_a_transaction_only_while_more_records_are_coming(tmp_path: Path) -> None:
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    batches: list[int] = []
    insert = store.insert

    def counting_insert(records: Any, **kwargs: Any) -> int:
        batches.append(len(records))
        return insert(records, **kwargs)

    store.insert = counting_insert  # type: ignore[method-assign]
    coming = threading.Event()
    writer = AuditWriter(store, policy="fail-closed", spool=None, group_commit_s=30.0, more_coming=coming.is_set)
    writer.start()
    try:
        # Nothing else coming: a lone record is committed at once, never held for the (huge) window.
        writer.submit(record(NOW)).result(timeout=10)
        # Answers being finished: the first record waits for the others, all commit together...
        coming.set()
        first = writer.submit(record(NOW))
        time.sleep(0.05)
        assert not first.done()
        rest = [writer.submit(record(NOW)) for _ in range(2)]
        time.sleep(0.05)
        assert not first.done()
        # ... until the service says no more are coming and the last record arrives (as in the service: the
        # count drops, then that answer's record is submitted), well inside the 30 s window.
        coming.clear()
        last = writer.submit(record(NOW))
        for future in (first, *rest, last):
            future.result(timeout=10)
        assert batches == [1, 4] and store.count() == 5
    finally:
        writer.stop()
        store.close()


def test_group_commit_waits_no_longer_than_its_window(tmp_path: Path) -> None:
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    writer = AuditWriter(store, policy="fail-closed", spool=None, group_commit_s=0.2, more_coming=lambda: True)
    writer.start()
    try:
        started = time.monotonic()
        writer.submit(record(NOW)).result(timeout=10)  # "more coming" forever: the window ends the wait
        assert 0.2 <= time.monotonic() - started < 5
    finally:
        writer.stop()
        store.close()
