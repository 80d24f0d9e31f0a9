"""Alembic environment for the audit trail: always run programmatically by ``service.audit.store.migrate``,
which hands over an open connection (no alembic.ini, no URL here)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from service.audit.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run the audit migrations through service.audit.store.migrate (python -m service.audit)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things: copy-and-move
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
