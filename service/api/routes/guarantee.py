"""The rule's operating state for people: ``GET /v1/guarantee`` (state, changes, live watch) and
``POST /v1/guarantee`` (resume, suspend, change mode; always with a reason). Admin keys only
(``CXR_ADMIN_API_KEYS``); every change is recorded in the audit trail with the key's id (docs/guarantee.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from service.api.keys import offered_api_key
from service.api.routes.audit import require_admin_key
from service.audit import client_id_for
from service.errors import BadRequestParameterError, NoGuaranteeError
from service.guarantee import state
from service.guarantee.live import GuaranteeMonitor, guarantee_status
from service.schemas import GuaranteeAction, GuaranteeChange, GuaranteeOperation, Problem

router = APIRouter(tags=["guarantee"])


def _monitor(request: Request) -> GuaranteeMonitor:
    monitor = getattr(request.app.state, "guarantee", None)
    if not isinstance(monitor, GuaranteeMonitor) or monitor.current is None:
        raise NoGuaranteeError(
            "This model has no referral rule (or the service is still starting): every film is referred, and there "
            "is no guarantee to operate."
        )
    return monitor


def _change(transition: state.Transition) -> GuaranteeChange:
    return GuaranteeChange.model_validate(
        {
            "at": transition.at,
            "mode": transition.mode,
            "state": transition.state,
            "previous_state": transition.previous_state,
            "reason": transition.reason,
            "actor": transition.actor,
            "detail": transition.detail,
        }
    )


async def _operation(monitor: GuaranteeMonitor) -> GuaranteeOperation:
    assert monitor.current is not None
    changes = await asyncio.to_thread(state.history, monitor.store, monitor.model_sha256)
    return GuaranteeOperation(
        current=_change(monitor.current),
        history=[_change(t) for t in changes],
        watch=guarantee_status(monitor),
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {
        400: "The body is not JSON",
        401: "No or unknown key",
        403: "A prediction key: operating the guarantee needs an admin key",
        409: "The model has no referral rule",
    }.items()
}


@router.get(
    "/v1/guarantee",
    response_model=GuaranteeOperation,
    responses=_ERRORS,
    dependencies=[Depends(require_admin_key)],
    summary="The referral rule's operating state, its changes and its live watch",
)
async def get_guarantee(request: Request) -> GuaranteeOperation:
    return await _operation(_monitor(request))


@router.post(
    "/v1/guarantee",
    response_model=GuaranteeOperation,
    responses=_ERRORS,
    dependencies=[Depends(require_admin_key)],
    summary="Resume, suspend or change the mode of the referral rule (recorded with who and why)",
)
async def change_guarantee(request: Request, action: GuaranteeAction) -> GuaranteeOperation:
    """A person's decision. ``resume`` re-enables a suspended rule and starts its watch afresh: do it after
    recalibrating (a new model has its own watch) or after reviewing the evidence, and say which in ``reason``."""
    monitor = _monitor(request)
    actor = client_id_for(offered_api_key(request))
    if action.action == "resume":
        await asyncio.to_thread(monitor.resume, actor=actor, detail=action.reason)
    elif action.action == "suspend":
        await asyncio.to_thread(monitor.suspend, reason="suspended_by_person", actor=actor, detail=action.reason)
    else:
        if action.mode is None:
            raise BadRequestParameterError("set_mode needs a mode: shadow, supervised or autonomous.")
        await asyncio.to_thread(monitor.set_mode, action.mode, actor=actor, detail=action.reason)
    monitor.poke()
    return await _operation(monitor)
