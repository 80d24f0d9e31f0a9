"""Admission: how many requests of each group of routes may be in progress, counted once their bodies arrived.

Pure ASGI, like ``service.api.middleware``. A request counts against its group only after its body has arrived,
so a slow upload holds no slot; uploads still arriving are bounded apart (``max_receiving``). Beyond a bound the
answer is 503 with Retry-After, sent before the body is read where it can be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.middleware import expects_continue, send_problem


@dataclass
class AdmissionGroup:
    """Routes admitted against one bound: ``max_in_flight`` requests whose bodies have arrived (parsing,
    decoding, queued or in a batch), ``what`` naming them in the 503."""

    paths: frozenset[str]
    max_in_flight: int
    retry_after_s: Callable[[], float]
    what: str = "predictions"
    in_flight: int = 0


class AdmissionMiddleware:
    """Sheds requests beyond their group's bound with a 503 at arrival, before their upload is parsed.

    The batcher's bounded queue sheds only after an upload has been received, parsed and decoded; when
    requests arrive several times faster than the model serves them, receiving uploads alone saturates
    the event loop and even the refusals come late. So each group's requests are counted inside the app and
    the excess is refused at arrival. A request counts against its group only once its body has arrived:
    uploads still arriving are counted apart (``max_receiving``, all groups together) and cut by the body
    timing (``BodyLimitMiddleware``), so clients trickling their uploads cannot hold the slots that real
    predictions need. Previews form a group of their own (their decoding has its own threads), so a flood of
    previews cannot starve predictions either.
    """

    def __init__(self, app: ASGIApp, *, groups: Sequence[AdmissionGroup], max_receiving: int) -> None:
        self.app = app
        self.groups = {path: group for group in groups for path in group.paths}
        self.max_receiving = max_receiving
        self.receiving = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        group = self.groups.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if group is None:
            await self.app(scope, receive, send)
            return
        if self.receiving >= self.max_receiving:
            # Most likely clients holding connections open with slow uploads: this one is not read to its end
            # (the answer goes first, then at most a short drain) and its connection is closed.
            await self._refuse(
                scope, receive, send, group, f"{self.receiving} uploads are already arriving", read_body=False
            )
            return
        if group.in_flight >= group.max_in_flight:
            await self._refuse(scope, receive, send, group, f"{group.in_flight} {group.what} are already in progress")
            return
        self.receiving += 1
        stage: Literal["receiving", "working", "refused"] = "receiving"
        response_started = False

        async def staged_receive() -> Message:
            nonlocal stage
            if stage == "refused":
                return {"type": "http.disconnect"}
            message = await receive()
            if stage == "receiving" and (message["type"] != "http.request" or not message.get("more_body", False)):
                # The whole body is here (or the client is gone): from now on it counts as work, if there is room.
                self.receiving -= 1
                if group.in_flight >= group.max_in_flight and message["type"] == "http.request":
                    stage = "refused"  # the group filled while it arrived: the app sees a disconnect, then a 503
                    return {"type": "http.disconnect"}
                stage = "working"
                group.in_flight += 1
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if stage == "refused":
                return  # the app's reaction to the fake disconnect is replaced by the 503
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, staged_receive, guarded_send)
        except Exception:
            if stage != "refused":
                raise
        finally:
            if stage == "working":
                group.in_flight -= 1
            elif stage == "receiving":
                self.receiving -= 1
        if stage == "refused" and not response_started:
            await self._busy(scope, send, group, f"{group.in_flight} {group.what} are already in progress")

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, group: AdmissionGroup, why: str, *, read_body: bool = True
    ) -> None:
        """Refuse at arrival: read and discard the body first (``read_body``; BodyLimitMiddleware, outside, still
        bounds its size and time), which is cheap next to parsing and decoding it and keeps the connection usable
        for the retry; or answer first, drain briefly and close."""
        if not read_body:
            await self._busy(scope, send, group, why, drain=None if expects_continue(scope) else receive)
            return
        if not expects_continue(scope):
            while (message := await receive())["type"] == "http.request" and message.get("more_body", False):
                pass
        await self._busy(scope, send, group, why, close=expects_continue(scope))

    @staticmethod
    async def _busy(
        scope: Scope, send: Send, group: AdmissionGroup, why: str, *, drain: Receive | None = None, close: bool = False
    ) -> None:
        scope.setdefault("state", {})["route_template"] = scope["path"]  # the paths are their own templates
        retry = max(1, math.ceil(group.retry_after_s()))
        await send_problem(
            scope,
            send,
            status=503,
            title="Server busy",
            detail=f"{why}; retry after the indicated delay.",
            error_type="QueueFullError",
            drain=drain,
            headers={"Retry-After": str(retry)},
            close=close or drain is not None,
        )
