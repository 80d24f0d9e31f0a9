"""uvicorn's server, and its Gunicorn worker, with a shutdown that serves what was already accepted.

On shutdown uvicorn closes its listening sockets and, in the same step, closes every connection that has no
request in progress. A connection the process accepted a moment earlier, whose request bytes sit unread in
the socket buffer, counts as idle and is closed: nginx sees "upstream prematurely closed connection" and
answers 502 for a POST it may not retry (tests/deploy/test_nginx.py caught it during a Gunicorn worker
restart). :class:`DrainingServer` stops accepting first, then gives accepted connections ``read_grace_s``
to deliver their request before the stock shutdown runs: a request that arrives in that window is served,
then its connection is closed, and the drain waits for it like any request in progress.

``python -m service`` runs :class:`DrainingServer`; Gunicorn runs its worker,
``service.gunicorn_worker.DrainingUvicornWorker`` (``docker/gunicorn.conf.py``), kept in its own module so
that the plain server needs neither Gunicorn nor uvicorn-worker (Gunicorn does not even import on Windows).
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

#: Seconds between "stop accepting" and "close idle connections": loopback peers (nginx) write their request
#: right after connecting, so this is generous; it only delays the exit of a process that is stopping.
READ_GRACE_S = 0.5


class DrainingServer(uvicorn.Server):
    read_grace_s = READ_GRACE_S

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if self.server_state.connections and not self.force_exit:
            await asyncio.sleep(self.read_grace_s)
        await super().shutdown()  # closes what is still idle, waits for requests in progress, lifespan
