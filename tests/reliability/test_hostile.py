"""Every hostile upload of the corpus against a real server: a 4xx problem (or a 200 with its warning),
never a 5xx, never a hang, and the service still ready afterwards."""

from __future__ import annotations

import asyncio
import gc

import httpx
import numpy as np
import pytest

from bayesnet import DecodedImage, ImageGeometryError, check_radiograph_geometry
from tests.reliability.conftest import MAX_UPLOAD_BYTES
from tests.reliability.hostile_corpus import (
    EXPECT_4XX,
    EXPECT_200,
    EXPECT_200_WARNING,
    HostileCase,
    build_corpus,
    check_response,
    send_case,
)
from tests.service.live import LiveServer

CORPUS = build_corpus(MAX_UPLOAD_BYTES)

# Starlette (1.10) leaves the spooled file of a multipart part that never ends unclosed (it closes
# files only when parsing raises, and python-multipart's finalize() does not); CPython frees it at once
# but warns. Not ours to fix: the answer is still checked, only that warning is tolerated for this case.
_UPSTREAM_WARNS = {
    "multipart-unterminated": pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
}
_PARAMS = [pytest.param(case, id=case.name, marks=_UPSTREAM_WARNS.get(case.name, ())) for case in CORPUS]


async def _send_then_ready(url: str, case: HostileCase) -> tuple[httpx.Response, int]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        response = await send_case(client, case)
        await response.aread()
        ready = await client.get("/readyz")
        return response, ready.status_code


def test_corpus_covers_the_issue() -> None:
    assert len(CORPUS) >= 30
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    assert {case.expect for case in CORPUS} == {EXPECT_4XX, EXPECT_200, EXPECT_200_WARNING}
    assert {413, 415, 422, 400} <= {status for case in CORPUS for status in case.statuses}
    assert any(case.slow_total_bytes > MAX_UPLOAD_BYTES for case in CORPUS)
    assert any(case.raw_body is not None for case in CORPUS)


@pytest.mark.parametrize("case", _PARAMS)
def test_hostile_upload_gets_a_useful_answer_and_the_service_stays_ready(
    hostile_server: LiveServer, case: HostileCase
) -> None:
    response, ready = asyncio.run(_send_then_ready(hostile_server.url, case))
    if case.name in _UPSTREAM_WARNS:
        gc.collect()  # what the request left for the collector is reported in this test, not a later one
    assert check_response(case, response) is None, f"{case.name} ({case.description}): {check_response(case, response)}"
    assert response.headers.get("x-request-id")
    assert ready == 200, f"not ready after {case.name}"


def test_the_slow_oversized_body_is_refused_before_it_ends(hostile_server: LiveServer) -> None:
    """Regression: the 413 used to reach an async client as a connection reset (ReadError), because the
    server closed the socket with the rest of the body unread; it now drains (bounded) before closing."""
    case = next(c for c in CORPUS if c.slow_total_bytes)
    response, ready = asyncio.run(_send_then_ready(hostile_server.url, case))
    assert response.status_code == 413
    assert response.extensions["hostile_bytes_sent"] <= case.slow_total_bytes + 1024
    assert ready == 200


def test_the_checker_rejects_what_the_rule_forbids() -> None:
    """check_response is what the runner trusts: a 5xx, a wrong status, a bare message or a missing warning fail."""
    refused = next(c for c in CORPUS if c.name == "html-as-jpeg")
    warned = next(c for c in CORPUS if c.name == "jpeg-cmyk")
    request = httpx.Request("POST", "http://testserver/v1/predict")
    problem = {"type": "about:blank", "title": "t", "status": 415, "request_id": "r"}
    ctype = {"content-type": "application/problem+json"}

    def answer(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers, request=request)

    good = {**problem, "detail": "The upload looks like an HTML page; send a PNG, JPEG or DICOM."}
    assert check_response(refused, answer(415, good, ctype)) is None
    assert "server error" in str(check_response(refused, answer(500, good, ctype)))
    assert "expected" in str(check_response(refused, answer(422, {**good, "status": 422}, ctype)))
    assert "problem+json" in str(check_response(refused, answer(415, good)))
    assert "terse" in str(check_response(refused, answer(415, {**problem, "detail": "bad html"}, ctype)))
    assert "mention" in str(check_response(refused, answer(415, {**problem, "detail": "x" * 40}, ctype)))
    with_warning = {"image": {"warnings": ["CMYK image converted to RGB"]}}
    assert check_response(warned, answer(200, with_warning)) is None
    assert "warning" in str(check_response(warned, answer(200, {"image": {"warnings": []}})))


def _image(width: int, height: int) -> DecodedImage:
    return DecodedImage(np.zeros((height, width), np.float32), "png", width, height, 8, "L", ())


def test_radiograph_geometry_bounds() -> None:
    check_radiograph_geometry(_image(32, 32))
    check_radiograph_geometry(_image(2000, 500))  # 4:1, the widest accepted
    with pytest.raises(ImageGeometryError, match="at least 32 pixels"):
        check_radiograph_geometry(_image(31, 400))
    with pytest.raises(ImageGeometryError, match=r"aspect ratio of 4\.1:1"):
        check_radiograph_geometry(_image(410, 100))
