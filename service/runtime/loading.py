"""Which model the service runs: the configured checkpoint, the shipped demo, or a labelled placeholder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bayesnet import BayesianEfficientNet, CheckpointError, ModelSpec, build_model, load_checkpoint
from bayesnet.checkpoint import SPEC_FILE
from bayesnet.ood import OODGate, load_ood_gate
from service.runtime.predictor import Predictor
from service.schemas import ModelRef
from service.settings import DEFAULT_MODEL_DIR, Settings

log = logging.getLogger("service.model")

DEFAULT_INTENDED_USE = (
    "Research and demonstration only. Not a medical device and not for clinical use: outputs must not "
    "inform diagnosis or treatment."
)
UNTRAINED_NAME = "untrained-placeholder"


@dataclass(frozen=True)
class LoadedModel:
    model: BayesianEfficientNet
    spec: ModelSpec
    sha256: str
    trained: bool
    source: str
    card_markdown: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    ood: OODGate | None = None  # the out-of-distribution gate; None: the checkpoint has none

    @property
    def intended_use(self) -> str:
        value = self.spec.extra.get("intended_use") or self.metadata.get("intended_use")
        return str(value) if value else DEFAULT_INTENDED_USE

    @property
    def ref(self) -> ModelRef:
        """How responses and audit records name the model: name, version and the weights' sha256."""
        return ModelRef(name=self.spec.name, version=self.spec.version, sha256=self.sha256)


def untrained_placeholder() -> LoadedModel:
    """A randomly initialised model that says so everywhere, so the service can start without weights."""
    torch.manual_seed(0)
    spec = ModelSpec(
        name=UNTRAINED_NAME,
        version="0.0.0",
        provenance="untrained: random initialisation, no data seen; outputs are meaningless",
    )
    card = (
        "# Untrained placeholder\n\nNo checkpoint was configured (CXR_MODEL_PATH) and none is shipped in "
        "models/demo/. This model has random weights: its outputs are meaningless and exist only so the "
        "service, its API and its web page can be exercised.\n"
    )
    return LoadedModel(build_model(spec), spec, "untrained", trained=False, source="placeholder", card_markdown=card)


def load_model(settings: Settings) -> LoadedModel:
    """Load what the settings ask for; raises :class:`CheckpointError` naming the file and the problem."""
    path = settings.model_path
    if path is None:
        if (DEFAULT_MODEL_DIR / SPEC_FILE).is_file():
            path = DEFAULT_MODEL_DIR
        elif settings.allow_untrained:
            log.warning("no checkpoint configured or shipped: serving an UNTRAINED placeholder model")
            return untrained_placeholder()
        else:
            raise CheckpointError(f"no checkpoint configured (CXR_MODEL_PATH) and none at {DEFAULT_MODEL_DIR}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint directory (CXR_MODEL_PATH / --model); "
            "a checkpoint is a directory holding model.json and model.safetensors"
        )
    model, spec = load_checkpoint(path)
    ood = load_ood_gate(path, spec)
    if ood is None:
        log.warning("checkpoint %s has no out-of-distribution gate: no image will be flagged as off-target", path)
    document = json.loads((path / SPEC_FILE).read_text())
    card_path = path / "MODEL_CARD.md"
    card = card_path.read_text() if card_path.is_file() else None
    metadata = document.get("metadata") or {}
    log.info("loaded model %s %s from %s", spec.name, spec.version, path)
    return LoadedModel(
        model,
        spec,
        str(document["weights_sha256"]),
        trained=not spec.provenance.lower().startswith("untrained"),
        source=str(path),
        card_markdown=card,
        metadata=dict(metadata),
        ood=ood,
    )


def build_predictor(loaded: LoadedModel, settings: Settings, *, device: torch.device, max_batch: int) -> Predictor:
    """The predictor of ``loaded`` on ``device`` as ``settings`` configure it; ``max_batch``: most images per run."""
    return Predictor(
        loaded.model,
        loaded.spec,
        device=device,
        autocast=settings.autocast,
        ood=loaded.ood,
        freeze_trunk=settings.freeze_trunk,
        max_batch=max_batch,
        cuda_graphs=settings.cuda_graphs,
        weights_sha256=loaded.sha256,
    )
