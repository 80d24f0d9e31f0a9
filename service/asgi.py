"""Entry point for process managers: ``gunicorn -c docker/gunicorn.conf.py`` calls ``app_from_env()``.

Settings come from ``CXR_*`` environment variables; each worker process builds its own app (and so its own
model and batcher) through the app's lifespan. An invalid setting ends the process with one line on stderr and
status 3, which the Gunicorn arbiter reads as "Worker failed to boot" and stops on, instead of a traceback.
"""

from __future__ import annotations

import sys

from fastapi import FastAPI

from service.__main__ import EXIT_STARTUP_FAILED
from service.logs import configure_logging
from service.openmp import limit_openmp_spin
from service.settings import InvalidSettingsError, load_settings


def app_from_env() -> FastAPI:
    limit_openmp_spin()  # before torch is imported (by service.app, below): libgomp reads it once
    try:
        settings = load_settings()
    except InvalidSettingsError as err:
        print(f"bayesnet-cxr: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STARTUP_FAILED) from None  # Gunicorn re-raises SystemExit without a traceback
    from service.app import create_app

    configure_logging(settings.log_level, json_lines=settings.log_json)
    return create_app(settings)
