"""A bounded on-disk spool for audit records the database could not take (``CXR_AUDIT_POLICY=buffer``).

One file per failed write batch, ``<time ns>-<pid>.ndjson`` (several worker processes may share the
directory), written to a temporary name, fsynced and renamed, so a record is durable in the spool once
:meth:`Spool.append` returns and a crash never leaves half a file. Replay reads the files oldest first and
deletes each only after its records are committed to the database; the database skips event ids it already
holds, so a crash between commit and delete, or two processes replaying the same file, duplicates nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from service.schemas import AuditRecord


class SpoolFullError(Exception):
    """The spool holds its maximum number of records: the record cannot be kept anywhere."""


class Spool:
    def __init__(self, directory: Path, *, max_records: int) -> None:
        self.directory = directory
        self.max_records = max_records
        directory.mkdir(parents=True, exist_ok=True)
        self._depth = self.count()

    def count(self) -> int:
        """Records in the spool's files now (all processes sharing the directory)."""
        total = 0
        for path in self.files():
            try:
                with path.open("rb") as handle:
                    total += sum(1 for line in handle if line.strip())
            except FileNotFoundError:  # replayed by another process meanwhile
                continue
        return total

    @property
    def depth(self) -> int:
        """Records waiting in the spool (as of this process's last append, replay or count)."""
        return self._depth

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.ndjson"))

    def append(self, records: Sequence[AuditRecord]) -> None:
        if self._depth + len(records) > self.max_records:
            self._depth = self.count()  # another process may have replayed some
            if self._depth + len(records) > self.max_records:
                raise SpoolFullError(
                    f"the audit spool {self.directory} holds {self._depth} records (limit {self.max_records})"
                )
        final = self.directory / f"{time.time_ns():020d}-{os.getpid()}.ndjson"
        partial = final.with_suffix(".tmp")
        payload = b"".join(record.model_dump_json().encode() + b"\n" for record in records)
        with partial.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        partial.rename(final)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
        self._depth += len(records)

    def read(self, path: Path) -> list[AuditRecord]:
        """The records of one spool file; empty when another process has already replayed and removed it."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return [AuditRecord.model_validate_json(line) for line in data.splitlines() if line.strip()]

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._depth = self.count()
