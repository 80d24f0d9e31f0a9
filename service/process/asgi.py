"""Entry point for process managers: ``gunicorn -c docker/gunicorn.conf.py`` calls ``app_from_env(workers=N)``.

Settings come from ``CXR_*`` environment variables; each worker process builds its own app (and so its own
model and batcher) through the app's lifespan. With several workers each one's torch threads are its share of
the cores (:func:`~service.process.threads.cores_per_worker`) unless ``CXR_TORCH_THREADS`` says otherwise.
An invalid setting ends the process with one line on stderr and status 3, which the Gunicorn arbiter reads as
"Worker failed to boot" and stops on, instead of a traceback.
"""

from __future__ import annotations

import sys

from fastapi import FastAPI

from service.process import EXIT_STARTUP_FAILED
from service.process.logs import configure_logging
from service.process.threads import cores_per_worker, limit_openmp_spin
from service.settings import InvalidSettingsError, load_settings


def app_from_env(workers: int = 1) -> FastAPI:
    """The app of one of ``workers`` worker processes on this host."""
    limit_openmp_spin()  # before torch is imported (by service.api.app, below): libgomp reads it once
    try:
        settings = load_settings()
        share = cores_per_worker(workers) if settings.torch_threads is None else None
        if share is not None:
            settings = load_settings({"torch_threads": share})
    except InvalidSettingsError as err:
        print(f"bayesnet-cxr: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STARTUP_FAILED) from None  # Gunicorn re-raises SystemExit without a traceback
    from service.api.app import create_app

    configure_logging(settings.log_level, json_lines=settings.log_json)
    return create_app(settings)
