"""Drop the work of a client that hangs up: ``await cancel_on_disconnect(request, pipeline.predict(...))``.

Why: uvicorn does not cancel a request's task when its client disconnects; it only makes the next
``receive()`` return ``http.disconnect``. Without this, an image whose client has gone (a closed browser tab, a
gateway timeout) still takes a place in the queue and a slot in a batch, so under overload abandoned requests
push out live ones. Cancelling the request's work lets the batcher remove its item before inference (see
``MicroBatcher.submit``), and the request ends with a 499 that nobody reads but the logs and metrics count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from service.errors import ServiceError

__all__ = ["ClientDisconnectedError", "cancel_on_disconnect"]

T = TypeVar("T")


class ClientDisconnectedError(ServiceError):
    """The client closed the connection before its answer was ready (nginx's 499: nobody receives it)."""

    status = 499
    title = "Client closed request"


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone; body chunks still arriving are ignored.

    Only called after the route has read the whole body, so each ``receive()`` blocks until the client
    disconnects (or the response completes, by which time this watcher has been cancelled).
    """
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first: then cancel it and raise :class:`ClientDisconnectedError`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancelled this request (e.g. shutdown timeout): cancel both
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        await asyncio.wait({watcher})
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # finished with an error just as the client left: nobody will read it; mark it retrieved
    raise ClientDisconnectedError("The client closed the connection before the result was ready; its work was dropped.")
