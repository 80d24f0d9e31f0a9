"""A real Orthanc PACS with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``) on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.service.live import free_port, wait_until

ORTHANC = Path("/usr/sbin/Orthanc")
#: Where Debian's orthanc-dicomweb installs the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@contextmanager
def orthanc(directory: Path, *, keep_storage: bool = False) -> Iterator[str]:
    """Start Orthanc with a generated configuration (free ports, storage under ``directory``); yield its DICOMweb
    root URL; stop it afterwards and delete its storage (``keep_storage``: leave it for the next Orthanc there)."""
    if not ORTHANC.is_file() or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (Debian orthanc orthanc-dicomweb; .ci/run)")
    http_port = free_port()
    config = {
        "Name": "bayesnet-cxr-test",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "storage"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = directory / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (directory / "orthanc.log").open("wb")
    process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def answers() -> bool:
        assert process.poll() is None, (directory / "orthanc.log").read_text(errors="replace")[-2000:]
        try:
            return httpx.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout_s=60)
        yield f"{url}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if not keep_storage:
            shutil.rmtree(directory / "storage", ignore_errors=True)
