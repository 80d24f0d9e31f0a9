"""The rule's operating state as the audit trail records it: every change, with who and why (``guarantee_transitions``).

The current state of a model (by its weights' sha256) is its latest transition. States are ``active`` and
``suspended``; the mode is ``shadow``, ``supervised`` or ``autonomous`` (``service.runtime.operating``). Reasons
are short codes: ``first_start``, ``mode_set`` (by a setting or a person), ``miss_rate_exceeded``,
``coverage_below``, ``drift_alert``, ``suspended_by_person``, ``resumed``. The guarantee watch restarts at each
``resumed``: a person who re-enables the rule (after recalibrating, or after deciding the evidence was wrong)
starts a new watch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import desc, insert, select
from sqlalchemy.orm import Session

from service.audit.models import GuaranteeTransition
from service.audit.store import AuditStore, as_utc
from service.runtime.operating import Mode

ACTIVE, SUSPENDED = "active", "suspended"


@dataclass(frozen=True)
class Transition:
    at: datetime
    model_sha256: str
    mode: Mode
    state: str
    previous_state: str | None
    reason: str
    actor: str
    detail: str

    @property
    def suspended(self) -> bool:
        return self.state == SUSPENDED


def _transition(row: GuaranteeTransition) -> Transition:
    return Transition(
        at=as_utc(row.at),
        model_sha256=row.model_sha256,
        mode=row.mode,  # type: ignore[arg-type]
        state=row.state,
        previous_state=row.previous_state,
        reason=row.reason,
        actor=row.actor,
        detail=row.detail,
    )


def history(store: AuditStore, model_sha256: str, *, limit: int = 50) -> list[Transition]:
    """The model's transitions, newest first."""
    with Session(store.engine) as session:
        rows = session.scalars(
            select(GuaranteeTransition)
            .where(GuaranteeTransition.model_sha256 == model_sha256)
            .order_by(desc(GuaranteeTransition.id))
            .limit(limit)
        ).all()
        return [_transition(row) for row in rows]


def latest(store: AuditStore, model_sha256: str) -> Transition | None:
    found = history(store, model_sha256, limit=1)
    return found[0] if found else None


def record(
    store: AuditStore,
    *,
    at: datetime,
    model_sha256: str,
    mode: Mode,
    state: str,
    previous_state: str | None,
    reason: str,
    actor: str,
    detail: str,
) -> Transition:
    """Append a transition (durable when this returns)."""
    values = {
        "at": at,
        "model_sha256": model_sha256,
        "mode": mode,
        "state": state,
        "previous_state": previous_state,
        "reason": reason,
        "actor": actor[:64],
        "detail": detail[:1000],
    }
    with store.engine.begin() as connection:
        connection.execute(insert(GuaranteeTransition), [values])
    return Transition(**values)  # type: ignore[arg-type]


def watch_start(store: AuditStore, model_sha256: str) -> datetime | None:
    """When the current watch began: the latest ``resumed`` transition (None: since the model's first film)."""
    with store.engine.connect() as connection:
        at = connection.scalar(
            select(GuaranteeTransition.at)
            .where(GuaranteeTransition.model_sha256 == model_sha256, GuaranteeTransition.reason == "resumed")
            .order_by(desc(GuaranteeTransition.id))
            .limit(1)
        )
    return as_utc(at) if at is not None else None
