"""AdmissionMiddleware: prediction requests beyond the bound are refused at arrival, before their body is read."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from service.api.admission import AdmissionGroup, AdmissionMiddleware


def test_excess_predictions_get_503_with_retry_after_before_the_app_sees_them() -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    group = AdmissionGroup(paths=frozenset({"/v1/predict"}), max_in_flight=2, retry_after_s=lambda: 2.4)
    app = AdmissionMiddleware(slow_app, groups=[group], max_receiving=100)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cxr") as client:
            admitted = [asyncio.create_task(client.post("/v1/predict", content=b"x" * 1000)) for _ in range(2)]
            while len(seen) < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/predict", content=b"y" * 100_000)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "3"
            assert refused.headers["content-type"] == "application/problem+json"
            assert "retry" in refused.json()["detail"]
            other = asyncio.create_task(client.post("/v1/model"))  # other routes are never bounded
            release.set()
            assert [r.status_code for r in await asyncio.gather(*admitted, other)] == [200, 200, 200]
            assert (await client.post("/v1/predict", content=b"z")).status_code == 200  # room again
        assert seen == ["/v1/predict", "/v1/predict", "/v1/model", "/v1/predict"]
        assert group.in_flight == 0 and app.receiving == 0

    asyncio.run(scenario())


def test_uploads_still_arriving_do_not_hold_the_slots_of_requests_whose_bodies_are_here() -> None:
    """Stage by stage: a body still arriving counts against max_receiving only; once it is all here it counts
    against its group; previews and predictions have separate groups."""
    release = asyncio.Event()

    async def app_reading_body(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    predictions = AdmissionGroup(paths=frozenset({"/v1/predict"}), max_in_flight=1, retry_after_s=lambda: 1.0)
    previews = AdmissionGroup(
        paths=frozenset({"/v1/preview"}), max_in_flight=1, retry_after_s=lambda: 1.0, what="previews"
    )
    app = AdmissionMiddleware(app_reading_body, groups=[predictions, previews], max_receiving=3)

    async def scenario() -> None:
        trickling: list[asyncio.Queue[dict[str, object]]] = []
        sent: list[dict[str, object]] = []

        async def start(path: str, *, trickle: bool) -> asyncio.Task[None]:
            inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
            if trickle:
                trickling.append(inbox)
                await inbox.put({"type": "http.request", "body": b"x", "more_body": True})
            else:
                await inbox.put({"type": "http.request", "body": b"image", "more_body": False})

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    sent.append({"path": path, "status": message["status"]})

            scope = {"type": "http", "method": "POST", "path": path, "headers": []}
            task = asyncio.create_task(app(scope, inbox.get, send))  # type: ignore[arg-type]
            await asyncio.sleep(0.01)
            return task

        slow = [await start("/v1/predict", trickle=True) for _ in range(2)]
        assert app.receiving == 2 and predictions.in_flight == 0
        real = await start("/v1/predict", trickle=False)  # admitted although two uploads are still arriving
        assert predictions.in_flight == 1 and app.receiving == 2
        preview = await start("/v1/preview", trickle=False)  # a group of its own
        assert previews.in_flight == 1
        busy = await start("/v1/predict", trickle=False)  # the prediction slot is taken: 503 at once
        await busy
        assert sent[-1] == {"path": "/v1/predict", "status": 503}
        release.set()
        await asyncio.gather(real, preview)
        third = await start("/v1/preview", trickle=True)  # receiving: 3 of 3
        assert app.receiving == 3
        full = await start("/v1/predict", trickle=True)  # a fourth upload arriving: 503, its body not awaited
        await asyncio.wait_for(full, 5)  # the answer first, then at most a 2 s drain before the connection closes
        assert sent[-1] == {"path": "/v1/predict", "status": 503}
        for inbox in trickling[:3]:
            await inbox.put({"type": "http.request", "body": b"", "more_body": False})
        await asyncio.gather(*slow, third)
        assert predictions.in_flight == previews.in_flight == app.receiving == 0

    asyncio.run(scenario())


def test_a_body_that_completes_when_its_group_is_full_is_refused_then() -> None:
    """Admitted while its body arrived, refused when it is all here and the group filled meanwhile: the bound
    holds for requests whose uploads overlap (20 previews arriving at once: 4 decoded, 16 refused)."""
    release = asyncio.Event()
    bodies_seen: list[bytes] = []

    async def app_reading_body(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client gone")
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        bodies_seen.append(body)
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    group = AdmissionGroup(
        paths=frozenset({"/v1/preview"}), max_in_flight=1, retry_after_s=lambda: 1.0, what="previews"
    )
    app = AdmissionMiddleware(app_reading_body, groups=[group], max_receiving=10)

    async def scenario() -> list[int]:
        statuses: list[int] = []
        inboxes: list[asyncio.Queue[dict[str, object]]] = [asyncio.Queue(), asyncio.Queue()]

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(int(message["status"]))  # type: ignore[call-overload]

        tasks = []
        for inbox in inboxes:
            await inbox.put({"type": "http.request", "body": b"part", "more_body": True})
            scope = {"type": "http", "method": "POST", "path": "/v1/preview", "headers": []}
            tasks.append(asyncio.create_task(app(scope, inbox.get, send)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert app.receiving == 2 and group.in_flight == 0  # both arriving, neither counted yet
        for inbox in inboxes:
            await inbox.put({"type": "http.request", "body": b"-end", "more_body": False})
        await asyncio.sleep(0.01)
        assert statuses == [503] and group.in_flight == 1
        release.set()
        await asyncio.gather(*tasks)
        return statuses

    assert asyncio.run(scenario()) == [503, 200]
    assert bodies_seen == [b"part-end"] and group.in_flight == 0 and app.receiving == 0
