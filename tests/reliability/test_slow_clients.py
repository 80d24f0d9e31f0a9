"""Slow and careless clients against a live server without nginx: slow bodies and headers are cut with 408,
huge headers refused with 431, hang-ups counted as 499, and real predictions keep being answered meanwhile.

The attacks of issue #28 (tests/reliability/attacks.py), rerun on loopback with the tiny model: 70 connections
trickling a PNG at 2 bytes/s (more than the 68 prediction slots of the default settings), connections dripping
their headers, an 8 MB header, and clients hanging up in the middle of a raw-body upload. ``make reliability``
reruns them against ``python -m service`` with the demo model, with worst-case previews.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bayesnet import decode_memory_bytes
from service.settings import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS
from tests.reliability.attacks import (
    SLOW_CLIENTS,
    Timings,
    drip_headers,
    hang_up_mid_body,
    heavy_dicom,
    metric,
    predict_every,
    server_errors,
    silent_connection,
    trickle_upload,
    unfinished_huge_header,
)
from tests.reliability.conftest import MAX_UPLOAD_BYTES
from tests.reliability.hostile_corpus import gray_png
from tests.service.live import LiveServer, live_server, tiny_settings

_NIH_FILM = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih-cxr14-sample" / "images" / "00000075_000.png"
)
#: A real radiograph (NIH's, from ../shared) where the clone has it; else a synthetic gray film of its size (512 px):
#: these tests are about the server, and any decodable film will do.
FILM_BYTES = _NIH_FILM.read_bytes() if _NIH_FILM.is_file() else gray_png(512)


@pytest.fixture(scope="module")
def guarded_server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:
    """The default slow-client limits, except a 2 s header timeout (10 s by default) to keep the test short."""
    settings = tiny_settings(tiny_service_checkpoint, max_upload_bytes=MAX_UPLOAD_BYTES, header_timeout_s=2.0)
    with live_server(settings) as live:
        yield live


def _port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def test_uploads_trickling_at_2_bytes_per_second_are_cut_while_real_predictions_are_answered(
    guarded_server: LiveServer,
) -> None:
    film = FILM_BYTES
    errors_before = server_errors(guarded_server.url)

    async def scenario() -> tuple[list[tuple[int | None, float]], Timings]:
        slow = [asyncio.create_task(trickle_upload(_port(guarded_server), film)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)  # every slow upload has started
        real = await predict_every(guarded_server.url, film, until=time.monotonic() + 9.0)
        return list(await asyncio.gather(*slow)), real

    slow, real = asyncio.run(scenario())
    # Real predictions were answered all along, not only after the slow clients were cut (at about 5 s).
    assert len(real.results) >= 8 and set(real.statuses) == {200}, real.results
    assert real.slowest_s < 2.0, real.results
    # Every slow upload was cut with a 408 a few seconds in (the 5 s grace, then below 1 KiB/s).
    assert [status for status, _ in slow] == [408] * SLOW_CLIENTS, slow
    assert all(4.0 < seconds < 10.0 for _, seconds in slow), sorted(seconds for _, seconds in slow)
    url = guarded_server.url
    assert metric(url, r'cxr_http_requests_total\{[^}]*route="/v1/predict"[^}]*status="408"\}') >= SLOW_CLIENTS
    assert metric(url, r'cxr_errors_total\{type="RequestBodyTimeout"\}') >= SLOW_CLIENTS
    assert server_errors(url) == errors_before
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_headers_dripping_in_are_cut_with_408_and_silent_connections_closed(guarded_server: LiveServer) -> None:
    port, url = _port(guarded_server), guarded_server.url
    refusals = r'cxr_http_connection_refusals_total\{reason="header_timeout"\}'
    before = metric(url, refusals)

    async def scenario() -> tuple[list[tuple[int | None, float]], tuple[bytes, float], Timings]:
        drips = [asyncio.create_task(drip_headers(port)) for _ in range(SLOW_CLIENTS)]
        quiet = asyncio.create_task(silent_connection(port))
        real = await predict_every(url, FILM_BYTES, until=time.monotonic() + 3.0)
        return list(await asyncio.gather(*drips)), await quiet, real

    drips, (data, quiet_s), real = asyncio.run(scenario())
    assert set(real.statuses) == {200}, real.results
    assert [status for status, _ in drips] == [408] * SLOW_CLIENTS
    assert all(1.5 < seconds < 5.0 for _, seconds in drips), drips
    assert data == b"" and 1.5 < quiet_s < 5.0  # never sent a byte: closed without an answer, as nginx does
    assert metric(url, refusals) - before == SLOW_CLIENTS + 1


def test_an_8_mb_header_gets_431_and_unfinished_huge_headers_are_cut_early(guarded_server: LiveServer) -> None:
    url = guarded_server.url
    response = httpx.get(f"{url}/readyz", headers={"X-Big": "a" * (8 * 1024 * 1024)}, timeout=30)
    assert response.status_code == 431
    assert response.headers["content-type"] == "application/problem+json"
    assert "CXR_MAX_HEADER_BYTES" in response.json()["detail"]
    assert httpx.get(f"{url}/readyz", headers={f"X-H{i}": "1" for i in range(150)}).status_code == 431
    assert httpx.get(f"{url}/readyz", headers={"X-Fine": "a" * 8000}).status_code == 200

    async def scenario() -> list[int | None]:
        return list(await asyncio.gather(*(unfinished_huge_header(_port(guarded_server)) for _ in range(20))))

    assert asyncio.run(scenario()) == [431] * 20  # answered after 32 KiB of the 16 MB each
    assert metric(url, r'cxr_http_connection_refusals_total\{reason="headers_too_large"\}') >= 22
    assert httpx.get(f"{url}/readyz").status_code == 200


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/predict", "image/png"),
        ("/v1/preview", "image/png"),
        ("/dicomweb/studies", 'multipart/related; type="application/dicom"; boundary=x'),
    ],
)
def test_a_client_hanging_up_mid_upload_is_a_499_not_a_server_error(
    guarded_server: LiveServer, path: str, content_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = guarded_server.url
    errors_before = server_errors(url)
    gone = rf'cxr_http_requests_total\{{[^}}]*route="{re.escape(path)}"[^}}]*status="499"\}}'
    gone_before = metric(url, gone)
    with caplog.at_level("INFO"):
        asyncio.run(hang_up_mid_body(_port(guarded_server), path, content_type))
        deadline = time.monotonic() + 10
        while metric(url, gone) <= gone_before:
            assert time.monotonic() < deadline, "the hang-up was never counted"
            time.sleep(0.05)
    assert server_errors(url) == errors_before
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"
    assert httpx.get(f"{url}/readyz").status_code == 200


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_heavy_previews_is_bounded_and_does_not_starve_predictions(guarded_server: LiveServer) -> None:
    """20 parallel previews of a large RLE DICOM (3000 x 3000 here; `make reliability` sends 7000 x 7000): at most
    CXR_MAX_PREVIEWS_IN_FLIGHT (4) are admitted, the rest get 503 at once; they decode in the preview thread, so the
    server's memory rises by at most one preview's bound and predictions meanwhile stay fast."""
    film = heavy_dicom(3000)
    bound = decode_memory_bytes(film, max_pixels=guarded_server.state.settings.max_pixels)
    url = guarded_server.url
    png = FILM_BYTES
    baseline = asyncio.run(predict_every(url, png, until=time.monotonic() + 1.5, every_s=0.1))
    rss_before = _rss_bytes()

    async def scenario() -> tuple[list[int], Timings, int]:
        peak = rss_before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                await asyncio.sleep(0.01)

        async def preview(client: httpx.AsyncClient) -> int:
            headers = {"Content-Type": "application/dicom"}
            return (await client.post("/v1/preview", content=film, headers=headers)).status_code

        sampler = asyncio.create_task(sample())
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            previews = asyncio.gather(*(preview(client) for _ in range(20)))
            await asyncio.sleep(0.05)
            meanwhile = await predict_every(url, png, until=time.monotonic() + 3.0, every_s=0.1)
            statuses = list(await previews)
        done.set()
        await sampler
        return statuses, meanwhile, peak

    statuses, meanwhile, peak = asyncio.run(scenario())
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(meanwhile.statuses) == {200}
    # Not starved: no prediction waited more than a second beyond the slowest one before the flood.
    assert meanwhile.slowest_s < baseline.slowest_s + 1.0, (meanwhile.results, baseline.results)
    # One preview decodes at a time: the rise stays within one bound (plus 20 uploads held and the clients).
    assert peak - rss_before < bound + 20 * len(film) + 64 * 2**20, (peak - rss_before, bound)
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_per_image_decode_memory_limit_refuses_what_would_take_more(tiny_service_checkpoint: Path) -> None:
    settings = tiny_settings(tiny_service_checkpoint, max_decode_bytes=64 * 2**20)
    colour = Image.new("RGB", (4000, 4000), (40, 80, 120))  # about 64 MB as Pillow holds it, 64 MB as float32
    buffer = io.BytesIO()
    colour.save(buffer, format="PNG")
    with live_server(settings) as live, live.client() as client:
        refused = client.post("/v1/predict", files={"file": ("big.png", buffer.getvalue(), "image/png")})
        assert refused.status_code == 413
        assert "CXR_MAX_DECODE_BYTES" in refused.json()["detail"]
        assert client.post("/v1/predict", files={"file": ("film.png", FILM_BYTES, "image/png")}).status_code == 200


def _png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (the bound reads nothing else)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    iend = b"IEND"
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + iend
        + struct.pack(">I", zlib.crc32(iend))
    )


def _jpeg_declaring(mode: str, side: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to declare ``side`` x ``side``."""
    buffer = io.BytesIO()
    Image.new(mode, (16, 16)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def test_the_default_decode_limit_admits_every_png_jpeg_and_gray_dicom_at_the_pixel_limit() -> None:
    """CXR_MAX_DECODE_BYTES' default (640 MiB) refuses no radiograph the pixel limit admits (docs/decode-memory.md):
    PNG in every colour type and depth, JPEG gray, colour and CMYK, and a 16-bit RLE DICOM, at 50 megapixels."""
    side = int(DEFAULT_MAX_PIXELS**0.5)
    uploads = {
        f"png type {colour} depth {depth}": _png_header_only(side, side, depth, colour)
        for colour, depth in ((0, 8), (0, 16), (2, 8), (2, 16), (4, 8), (4, 16), (6, 8), (6, 16), (3, 8))
    }
    uploads |= {f"jpeg {mode}": _jpeg_declaring(mode, side) for mode in ("L", "RGB", "CMYK")}
    uploads["dicom rle 16-bit 7000 px"] = heavy_dicom(7000)
    bounds = {name: decode_memory_bytes(data, max_pixels=DEFAULT_MAX_PIXELS) for name, data in uploads.items()}
    assert all(200 * 2**20 < bound <= DEFAULT_MAX_DECODE_BYTES for bound in bounds.values()), bounds
