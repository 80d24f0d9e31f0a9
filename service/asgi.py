"""Entry point for process managers: ``gunicorn -c docker/gunicorn.conf.py`` calls ``app_from_env()``.

Settings come from ``CXR_*`` environment variables; each worker process builds its own app (and so its own
model and batcher) through the app's lifespan.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.logs import configure_logging
from service.openmp import limit_openmp_spin
from service.settings import Settings


def app_from_env() -> FastAPI:
    limit_openmp_spin()  # before torch is imported (by service.app, below): libgomp reads it once
    from service.app import create_app

    settings = Settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    return create_app(settings)
