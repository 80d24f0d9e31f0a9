"""How the viewer test gets OHIF (``tests.viewer.ohif.fetch``): checked against the pinned integrity, trimmed,
unpacked whole or not at all. A stand-in tarball replaces the registry."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.viewer import ohif


def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, bytes]:
    served: dict[str, bytes] = {}

    class Answer(io.BytesIO):
        def __enter__(self) -> Answer:
            return self

    def urlopen(url: str, timeout: float) -> Answer:
        assert url == ohif.TARBALL
        return Answer(served["tarball"])

    monkeypatch.setattr(ohif.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("OHIF_CACHE_DIR", str(tmp_path / "cache"))
    return served


def test_the_app_is_unpacked_without_source_maps_or_the_unused_bundles(
    registry: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry["tarball"] = _tarball(
        {
            "package/package.json": b"{}",
            "package/dist/index.html": b"<html></html>",
            "package/dist/app.bundle.js": b"app",
            "package/dist/app.bundle.js.map": b"map",
            "package/dist/ort/ort-wasm.wasm": b"onnx",
            "package/dist/dicom-microscopy-viewer/viewer.js": b"slides",
        }
    )
    monkeypatch.setattr(ohif, "INTEGRITY", ohif._integrity(registry["tarball"]))
    assert ohif.installed() is None
    dist = ohif.fetch()
    assert dist == ohif.installed()
    assert sorted(p.relative_to(dist).as_posix() for p in dist.rglob("*") if p.is_file()) == [
        "app.bundle.js",
        "index.html",
    ]


def test_a_tarball_that_does_not_match_the_pinned_integrity_is_not_unpacked(registry: dict[str, bytes]) -> None:
    registry["tarball"] = _tarball({"package/dist/index.html": b"<html>changed</html>"})
    with pytest.raises(RuntimeError, match="integrity"):
        ohif.fetch()
    assert ohif.installed() is None and not ohif.cache_dir().exists()
