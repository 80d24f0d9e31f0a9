"""The per-app state the lifespan fills and the routes read (never a module-level global)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from service.api.metrics import Metrics
from service.runtime.batcher import MicroBatcher
from service.runtime.loading import LoadedModel
from service.runtime.pipeline import Job, JobResult, PredictionPipeline
from service.runtime.predictor import Predictor
from service.schemas import ModelRef
from service.settings import Settings


def signal_own_process() -> None:
    """SIGTERM this process: uvicorn (``python -m service``) and a Gunicorn uvicorn worker both take it as
    "stop accepting, finish what was accepted, run the lifespan shutdown, exit"."""
    os.kill(os.getpid(), signal.SIGTERM)


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
    #: Why this process must end non-zero (the model failed to load, the inference worker died); None when healthy.
    fatal_error: BaseException | None = None
    #: Asks the server to shut down gracefully so that its supervisor starts a fresh process (see
    #: docs/operations.md, "Reliability"). Tests running the app in a thread replace it.
    request_exit: Callable[[], None] = signal_own_process

    @property
    def model_ref(self) -> ModelRef | None:
        if self.loaded is None:
            return None
        return self.loaded.ref
