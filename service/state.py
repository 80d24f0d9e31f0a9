"""The per-app state the lifespan fills and the routes read (never a module-level global)."""

from __future__ import annotations

from dataclasses import dataclass

from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.model_loading import LoadedModel
from service.pipeline import Job, JobResult, PredictionPipeline
from service.predictor import Predictor
from service.schemas import ModelRef
from service.settings import Settings


@dataclass
class ServiceState:
    """Everything the routes need, created by the lifespan (nothing at import time)."""

    settings: Settings
    metrics: Metrics
    ready: bool = False
    detail: str = "starting"
    loaded: LoadedModel | None = None
    pipeline: PredictionPipeline | None = None
    predictor: Predictor | None = None
    batcher: MicroBatcher[Job, JobResult] | None = None

    @property
    def model_ref(self) -> ModelRef | None:
        if self.loaded is None:
            return None
        return ModelRef(name=self.loaded.spec.name, version=self.loaded.spec.version, sha256=self.loaded.sha256)
