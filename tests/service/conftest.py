"""Service test fixtures: a tiny real checkpoint and a live server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bayesnet import ModelSpec, build_model, save_checkpoint
from tests.service.live import LiveServer, live_server, tiny_settings


@pytest.fixture(scope="session")
def tiny_service_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(
        arch="test_efficientnet",
        image_size=64,
        name="tiny-test-model",
        version="1.2.3",
        provenance="trained: test fixture",
        trained_labels=tuple(lb for lb in ModelSpec().labels if lb != "Fracture"),
    )
    return save_checkpoint(build_model(spec), None, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_settings(tiny_service_checkpoint, max_upload_bytes=8 * 1024 * 1024)) as live:
        yield live
