"""SIGKILL under load: every request a client received an answer for is in the audit trail (fail-closed).

Durable means committed: the route sends its answer only after the writer thread's transaction holding the
record has committed (SQLite WAL, synchronous=NORMAL by default; PostgreSQL COMMIT), so a SIGKILL at any instant can
lose only records whose answers were never sent. Records of requests that were in flight when the process
died may exist without an answer (committed, killed before sending): at most one per client connection.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import httpx
import pytest

from service.audit import AuditQuery, AuditStore
from tests.reliability.harness import ServerProcess, small_pngs
from tests.service.live import wait_until

pytestmark = pytest.mark.slow  # starts a server process

CLIENTS = 6


def test_sigkill_under_load_loses_no_answered_request(
    tiny_service_checkpoint: Path, audit_url: str, tmp_path: Path
) -> None:
    images = [*small_pngs(4), b"<html>hostile: not an image</html>", b"\x89PNG\r\n\x1a\ntruncated"]
    answered: dict[str, int] = {}
    attempted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    counter = itertools.count()
    # SQLite with synchronous=NORMAL, the weaker setting (no fsync per commit): a SIGKILL must still lose nothing
    # that was answered (NORMAL is the default; FULL only adds an fsync per commit).
    env = {
        "CXR_AUDIT_URL": audit_url,
        "CXR_AUDIT_POLICY": "fail-closed",
        "CXR_AUDIT_SQLITE_SYNCHRONOUS": "NORMAL",
        "CXR_MAX_WAIT_MS": "2",
    }

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                n = next(counter)
                request_id = f"kill-{n}"
                with lock:
                    attempted.add(request_id)
                try:
                    response = http.post(
                        "/v1/predict",
                        params={"cams": "none"},
                        files={"file": ("x", images[n % len(images)])},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.TransportError:
                    return  # the server is gone
                with lock:
                    answered[request_id] = response.status_code

    with ServerProcess(tiny_service_checkpoint, tmp_path, env=env) as server:
        server.start()
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answered) >= 40, timeout_s=120)
        server.kill()  # SIGKILL: no shutdown hook, no drain, no flush
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert {200, 415, 422} <= set(answered.values()), answered  # real work and hostile refusals, all answered
    store = AuditStore.open(audit_url, migrate_schema=False)
    try:
        stored = {r.request_id: r.status for r in store.iter_records(AuditQuery())}
    finally:
        store.close()
    missing = {rid for rid in answered if rid not in stored}
    assert not missing, f"answered but not in the trail: {sorted(missing)}"
    assert all(stored[rid] == status for rid, status in answered.items())
    unanswered = set(stored) - set(answered)
    assert unanswered <= attempted and len(unanswered) <= CLIENTS  # only requests in flight at the kill
