"""Reliability fixtures: the service tests' tiny real checkpoint, and a live server sized for hostile input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import tiny_service_checkpoint  # noqa: F401  (the fixture, shared)
from tests.service.live import LiveServer, live_server, tiny_settings

#: The upload limit of the reliability servers: small, so over-the-limit cases stay cheap to send.
MAX_UPLOAD_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def hostile_server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:  # noqa: F811
    """A real uvicorn server on loopback with the tiny model and a 4 MiB upload limit."""
    with live_server(tiny_settings(tiny_service_checkpoint, max_upload_bytes=MAX_UPLOAD_BYTES)) as live:
        yield live
