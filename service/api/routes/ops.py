"""Operations: /healthz (liveness), /readyz (readiness) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.problems import problem_response
from service.api.routes.deps import (
    service_state,
)
from service.api.state import ServiceState
from service.schemas import (
    Health,
    Problem,
    Readiness,
)

router = APIRouter()


def _stalled(state: ServiceState) -> str | None:
    """Why the inference worker counts as hung, or None: a batch has run for longer than a request may wait."""
    if state.batcher is None:
        return None
    busy_s = state.batcher.busy_for_s
    if busy_s <= state.settings.request_timeout_s:
        return None
    return (
        f"inference worker stalled: one batch has run for {busy_s:.0f} s, longer than the request timeout "
        f"({state.settings.request_timeout_s:g} s); restart the process"
    )


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {
            "model": Problem,
            "content": {"application/problem+json": {}},
            "description": "The inference worker is hung: restart the process",
        }
    },
    summary="Liveness: the process answers and its inference worker is not hung",
    tags=["ops"],
)
async def healthz(request: Request) -> Health | JSONResponse:
    # A hung worker (a batch running past the request timeout: a deadlocked kernel, a device that stopped
    # answering) does not recover by itself; failing liveness lets the supervisor restart the process.
    stalled = _stalled(service_state(request))
    if stalled is not None:
        return problem_response(request, 503, "Inference worker stalled", stalled)
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready"}},
    summary="Readiness: model loaded, warmed up, inference worker alive",
    tags=["ops"],
)
async def readyz(request: Request) -> JSONResponse:
    state = service_state(request)
    alive = state.batcher is not None and state.batcher.alive and state.batcher.accepting
    stalled = _stalled(state)
    ready = state.ready and alive and stalled is None
    detail = "inference worker is not running" if state.ready and not alive else stalled or state.detail
    body = Readiness(
        ready=ready,
        detail=detail,
        queue_depth=state.batcher.queue_depth if state.batcher is not None else 0,
        model=state.model_ref,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = service_state(request)
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.queue_depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
