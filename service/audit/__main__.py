"""``python -m service.audit {migrate,purge}``: operate on the audit database (``CXR_AUDIT_URL`` or ``--url``).

    python -m service.audit migrate                      # apply the Alembic migrations (the service does at start)
    python -m service.audit purge --older-than-days 190 [--dry-run]

The purge refuses a period shorter than 183 days (the EU AI Act's six-month minimum, docs/audit.md) and deletes
in short transactions, so a running service keeps writing meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from service.audit.store import AuditStore

MIN_RETENTION_DAYS = 183


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="audit database URL (default: CXR_AUDIT_URL, else the service's default)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="bring the schema to the newest revision")
    purge = commands.add_parser("purge", help="delete records older than a period")
    purge.add_argument("--older-than-days", type=int, required=True)
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    args = parser.parse_args(argv)
    if args.url is None:
        from service.settings import InvalidSettingsError, load_settings

        try:
            args.url = load_settings().audit.url
        except InvalidSettingsError as err:
            parser.error(str(err))  # one line, exit 2
    if args.command == "purge" and args.older_than_days < MIN_RETENTION_DAYS:
        parser.error(f"--older-than-days must be at least {MIN_RETENTION_DAYS} (six months, EU AI Act Art. 19/26)")
    store = AuditStore.open(args.url)  # migrates
    try:
        if args.command == "migrate":
            print(f"audit database at the newest schema; {store.count()} records")
            return 0
        cutoff = datetime.now(timezone.utc) - timedelta(days=args.older_than_days)
        if args.dry_run:
            print(f"would delete {store.count(before=cutoff)} records before {cutoff.isoformat()}")
        else:
            print(f"deleted {store.purge(cutoff)} records before {cutoff.isoformat()}")
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
