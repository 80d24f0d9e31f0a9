"""Gunicorn's worker for the service: uvicorn-worker's, serving through :class:`service.process.server.DrainingServer`.

``docker/gunicorn.conf.py`` names it (``worker_class``). Its own module, so that ``python -m service`` needs
neither Gunicorn nor uvicorn-worker installed.
"""

from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from service.process.server import ConnectionLimits, DrainingServer, guarded_protocol


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type hints
    """``uvicorn_worker.UvicornWorker`` serving through :class:`DrainingServer` and its guarded protocol."""

    async def _serve(self) -> None:  # the parent's body (uvicorn-worker 0.x), with the server class swapped
        self.config.app = self.wsgi
        # The app's settings bound headers and slow connections, as under `python -m service` (service.process.server).
        state = self.wsgi.state.service
        limits = ConnectionLimits.from_settings(state.settings, on_refusal=state.metrics.count_connection_refusal)
        self.config.http = self.config.http_protocol_class = guarded_protocol(limits)
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
