"""GET /v1/model: the model card, with the decision rule, the referral guarantee and the evidence behind it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.routes.deps import (
    Protected,
    service_state,
)
from service.errors import (
    NotReadyError,
)
from service.guarantee.live import guarantee_status
from service.runtime.responses import can_clear, evidence, ood_gate_info, referral_info
from service.schemas import (
    ModelCard,
)

router = APIRouter()


@router.get("/v1/model", response_model=ModelCard, dependencies=Protected, summary="The model card", tags=["model"])
async def model_card(request: Request) -> ModelCard:
    state = service_state(request)
    loaded = state.loaded
    if loaded is None:
        raise NotReadyError("The model is still loading; retry shortly.", headers={"Retry-After": "5"})
    spec = loaded.spec
    metrics = loaded.metadata.get("metrics") or spec.extra.get("metrics") or {}
    return ModelCard(
        name=spec.name,
        version=spec.version,
        sha256=loaded.sha256,
        arch=spec.arch,
        labels=list(spec.labels),
        trained_labels=list(spec.trained_labels),
        untrained_labels=list(spec.untrained_labels),
        image_size=spec.image_size,
        in_chans=spec.in_chans,
        mc_samples=state.settings.mc_samples or spec.mc_samples,
        mc_dropout_blocks=spec.mc_dropout_blocks,
        dropout=spec.dropout,
        temperature=dict(zip(spec.labels, spec.temperature, strict=True)),
        threshold=dict(zip(spec.labels, spec.threshold, strict=True)),
        uncertainty_threshold=dict(zip(spec.labels, spec.uncertainty_threshold, strict=True)),
        provenance=spec.provenance,
        intended_use=loaded.intended_use,
        trained=loaded.trained,
        metrics=dict(metrics),
        card_markdown=loaded.card_markdown,
        ood=ood_gate_info(spec, state.settings.ood_action),
        referral=referral_info(spec),
        can_clear=can_clear(spec),
        evidence=evidence(spec, metrics),
        guarantee=guarantee_status(getattr(request.app.state, "guarantee", None)),
    )
