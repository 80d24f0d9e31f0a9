"""Write docs/examples/diagnostic-report.json: the shipped demo model's FHIR R4 report for a real radiograph.

Runs the real application in process (lifespan included) on one NIH radiograph from ``../shared`` with
``cams=none`` (keeps the file small) and ``Accept: application/fhir+json``. Usage, from the repository root:

    .venv/bin/python docs/examples/make_fhir_example.py [RADIOGRAPH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "nih-cxr14-sample" / "images" / "00000075_000.png"
OUT = Path(__file__).resolve().parent / "diagnostic-report.json"


def main() -> None:
    image = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_IMAGE
    settings = Settings(model_path=REPO / "models" / "demo")
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/predict",
            files={"file": (image.name, image.read_bytes(), "application/octet-stream")},
            params={"cams": "none"},
            headers={"Accept": "application/fhir+json", "X-Request-ID": f"example-{image.stem}"},
        )
    response.raise_for_status()
    OUT.write_text(json.dumps(response.json(), indent=1) + "\n")
    print(f"wrote {OUT.relative_to(REPO)} ({response.headers['content-type']})")


if __name__ == "__main__":
    main()
