"""Make a real database refuse audit inserts for a while (a trigger that raises), to test the failure policies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text


@contextmanager
def refuse_inserts(engine: Engine) -> Iterator[None]:
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit database refuses writes'); END"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'audit database refuses writes'; END $$"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
                )
            )
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(
                text("DROP TRIGGER refuse_audit" + ("" if connection.dialect.name == "sqlite" else " ON audit_events"))
            )
            if connection.dialect.name != "sqlite":
                connection.execute(text("DROP FUNCTION refuse_audit()"))
