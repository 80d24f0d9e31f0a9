"""Gunicorn's worker for the service: uvicorn-worker's, serving through :class:`service.server.DrainingServer`.

``docker/gunicorn.conf.py`` names it (``worker_class``). Its own module, so that ``python -m service`` needs
neither Gunicorn nor uvicorn-worker installed.
"""

from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from service.server import DrainingServer


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type hints
    """``uvicorn_worker.UvicornWorker`` serving through :class:`DrainingServer`."""

    async def _serve(self) -> None:  # the parent's body (uvicorn-worker 0.x), with the server class swapped
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
