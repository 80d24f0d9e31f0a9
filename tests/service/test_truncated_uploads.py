"""Truncated or damaged uploads get 422 problem details that say what is wrong, never predictions.

Real films are cut in their pixel data (see ``tests/bayesnet/test_truncated.py``, whose builders are reused) and
posted to a real uvicorn server on loopback running the tiny test model; the whole film is scored.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.schemas import PredictionResponse
from tests.bayesnet.test_truncated import (
    DICOM_JPEG_ENDS_EARLY,
    JPEG_ENDS_EARLY,
    NIH_FILM,
    PNG_STREAM_ENDS_EARLY,
    SIIM_DICOM,
    cut_dicom_frame,
    cut_jpeg,
    cut_png_file,
    cut_png_stream,
    damage_png_idat,
    jpeg_of,
)
from tests.service.live import LiveServer


@pytest.fixture(scope="module")
def film(shared_data: Path) -> bytes:
    return (shared_data / NIH_FILM).read_bytes()


@pytest.fixture(scope="module")
def film_jpeg(film: bytes) -> bytes:
    with Image.open(io.BytesIO(film)) as image:
        return jpeg_of(image.convert("L"))


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def post(client: httpx.Client, data: bytes, filename: str) -> httpx.Response:
    return client.post("/v1/predict", files={"file": (filename, data, "application/octet-stream")})


def assert_refused(response: httpx.Response, detail: str) -> None:
    """422 problem+json whose detail starts with ``detail``, and nothing that looks like a prediction."""
    assert response.status_code == 422, response.text[:500]
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert (problem["status"], problem["title"]) == (422, "Unusable image")
    assert problem["detail"].startswith(detail), problem["detail"]
    assert "predictions" not in problem


def test_jpeg_cut_at_ten_percent_with_eoi_appended_is_refused(client: httpx.Client, film_jpeg: bytes) -> None:
    """The reported case: libjpeg would fill 90% of this film with grey, and it used to be scored."""
    assert_refused(post(client, cut_jpeg(film_jpeg, 0.1, eoi=True), "film.jpg"), JPEG_ENDS_EARLY)


def test_progressive_jpeg_cut_without_eoi_is_refused(client: httpx.Client, film: bytes) -> None:
    with Image.open(io.BytesIO(film)) as image:
        progressive = jpeg_of(image.convert("L"), progressive=True)
    assert_refused(post(client, cut_jpeg(progressive, 0.5, eoi=False), "film.jpg"), JPEG_ENDS_EARLY)


@pytest.mark.parametrize(
    ("cut", "detail"),
    [
        (lambda png: cut_png_file(png, 0.5), "The PNG file is truncated: it ends inside its IDAT chunk ("),
        (lambda png: cut_png_stream(png, 0.9), PNG_STREAM_ENDS_EARLY),
        (lambda png: damage_png_idat(png, 0.1), "The PNG's image data is damaged: IDAT chunk 1 (at byte "),
    ],
    ids=["file-cut", "stream-cut", "bad-crc"],
)
def test_cut_or_damaged_png_is_refused(
    client: httpx.Client, film: bytes, cut: Callable[[bytes], bytes], detail: str
) -> None:
    assert_refused(post(client, cut(film), "film.png"), detail)


def test_jpeg_dicom_with_a_cut_frame_is_refused(client: httpx.Client, shared_data: Path) -> None:
    data = cut_dicom_frame(shared_data / SIIM_DICOM, 0.5, end_marker=True)
    assert_refused(post(client, data, "film.dcm"), DICOM_JPEG_ENDS_EARLY)


def test_the_whole_films_are_scored(client: httpx.Client, film: bytes, film_jpeg: bytes) -> None:
    for data, name, fmt in ((film, "film.png", "png"), (film_jpeg, "film.jpg", "jpeg")):
        response = post(client, data, name)
        assert response.status_code == 200, response.text
        body = PredictionResponse.model_validate(response.json())
        assert body.image.format == fmt
        assert body.predictions
