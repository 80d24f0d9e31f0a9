"""OHIF, the web DICOM viewer, for the viewer test: fetched from the npm registry, cached, served by nginx.

``python -m tests.viewer.ohif fetch`` (``.ci/run`` and ``make ohif`` call it) downloads ``@ohif/app`` at the pinned
version, checks the tarball against the registry's sha512 integrity recorded here, and keeps only its built web app
(``package/dist``) under the cache directory, without what the test never loads: source maps (``*.map``), the
ONNX runtime for the segmentation tools (``ort/``, 136 MB) and the microscopy viewer (``dicom-microscopy-viewer/``),
about 50 MB instead of 204. Nothing is committed; the test skips when the cache is empty.

:func:`serve_ohif` serves that app with Debian's nginx on loopback, its DICOMweb data source proxied (same origin)
to an Orthanc: what a PACS administrator does to point OHIF at the archive that receives the service's results
(docs/dicom.md, "Reading the result in OHIF").
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.service.live import free_port, wait_until

OHIF_VERSION = "3.13.2"
TARBALL = f"https://registry.npmjs.org/@ohif/app/-/app-{OHIF_VERSION}.tgz"
#: ``dist.integrity`` of the tarball in the npm registry's metadata for this version.
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
#: Parts of ``dist`` the test never loads, left out of the cache.
TRIMMED = ("ort/", "dicom-microscopy-viewer/")
NGINX = Path("/usr/sbin/nginx")

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'The PACS that receives the AI results',
        name: 'pacs',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def cache_dir() -> Path:
    """Where the trimmed app is kept: ``$OHIF_CACHE_DIR``, else ``~/.cache/bayesnet-cxr/ohif-<version>``."""
    configured = os.environ.get("OHIF_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "bayesnet-cxr" / f"ohif-{OHIF_VERSION}"


def installed() -> Path | None:
    """The cached app's ``dist`` directory, or None when it has not been fetched."""
    dist = cache_dir() / "dist"
    return dist if (dist / "index.html").is_file() else None


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def fetch(timeout_s: float = 300.0) -> Path:
    """Download, check and unpack the app into the cache (a no-op when it is there); its ``dist`` directory."""
    done = installed()
    if done is not None:
        return done
    with urllib.request.urlopen(TARBALL, timeout=timeout_s) as answer:
        data = answer.read()
    if _integrity(data) != INTEGRITY:
        raise RuntimeError(f"{TARBALL} does not match the pinned sha512 integrity; not unpacked")
    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="ohif-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive.getmembers():
                name = member.name.removeprefix("package/")
                if not name.startswith("dist/") or name.endswith(".map"):
                    continue
                if any(name.removeprefix("dist/").startswith(prefix) for prefix in TRIMMED):
                    continue
                if not (member.isfile() or member.isdir()):
                    continue
                member.name = name
                archive.extract(member, staging, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "dist"


@contextmanager
def serve_ohif(dist: Path, orthanc_url: str, work: Path) -> Iterator[str]:
    """OHIF on loopback (its URL), served by nginx from ``dist`` with this module's app configuration, and the
    DICOMweb (``/dicom-web/``) and WADO-URI (``/wado``) paths proxied to the Orthanc at ``orthanc_url`` (its REST
    root, without ``/dicom-web``)."""
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    site.mkdir()
    for item in dist.iterdir():
        if item.name != "app-config.js":
            (site / item.name).symlink_to(item)
    (site / "app-config.js").write_text(APP_CONFIG)
    port = free_port()
    conf = work / "nginx.conf"
    # Started as root, nginx's workers would run as another user, who cannot read a private cache or work dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""daemon off;
{user}pid {work}/nginx.pid;
error_log {work}/error.log;
events {{}}
http {{
  include /etc/nginx/mime.types;
  types {{ application/wasm wasm; }}
  access_log {work}/access.log;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {site};
    disable_symlinks off;
    location /dicom-web/ {{ proxy_pass {orthanc_url}/dicom-web/; }}
    location /wado {{ proxy_pass {orthanc_url}/wado; }}
    location / {{ try_files $uri $uri/ /index.html; }}
  }}
}}
"""
    )
    server = subprocess.Popen([str(NGINX), "-c", str(conf)])
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"nginx stopped: {(work / 'error.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/app-config.js", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(serving, timeout_s=20)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m tests.viewer.ohif fetch")
    try:
        print(f"OHIF {OHIF_VERSION} in {fetch()}")
    except Exception as err:  # no registry, a changed tarball: the viewer test will skip and say so
        print(f"OHIF {OHIF_VERSION} not fetched ({type(err).__name__}: {err}); the viewer test will skip")
