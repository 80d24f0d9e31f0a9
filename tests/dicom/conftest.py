"""DICOM test fixtures: a tiny real checkpoint and a live server with an admin key (to read the audit trail)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bayesnet import ModelSpec, build_model, save_checkpoint
from tests.service.live import LiveServer, live_server, tiny_settings

ADMIN_KEY = "admin-key-for-tests"


@pytest.fixture(scope="session")
def dicom_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(
        arch="test_efficientnet",
        image_size=64,
        name="tiny-dicom-model",
        version="2.0.1",
        provenance="trained: test fixture",
        trained_labels=tuple(lb for lb in ModelSpec().labels if lb != "Fracture"),
    )
    return save_checkpoint(build_model(spec), None, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def dicom_server(dicom_checkpoint: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(dicom_checkpoint, max_upload_bytes=8 * 1024 * 1024, admin_api_keys=[ADMIN_KEY])
    with live_server(settings) as live:
        yield live
