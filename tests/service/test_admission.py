"""AdmissionMiddleware: prediction requests beyond the bound are refused at arrival, before their body is read."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from service.middleware import AdmissionMiddleware


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

    app = AdmissionMiddleware(slow_app, paths=frozenset({"/v1/predict"}), max_in_flight=2, retry_after_s=lambda: 2.4)

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
        assert app.in_flight == 0

    asyncio.run(scenario())
