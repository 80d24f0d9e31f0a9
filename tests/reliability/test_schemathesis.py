"""Schemathesis against the live ``/openapi.json``, with every check it has, keys configured and real films.

The run is Schemathesis' own engine, as ``st run --checks all`` drives it: the coverage phase (boundary values,
missing and malformed parts, undeclared methods and media types), the fuzzing phase (positive and negative
data) and the stateful phase, which follows the schema's links from a prediction's ``X-Request-ID`` to its
audit records. Every response goes through every built-in check: no 5xx; statuses, content types, headers and
bodies as documented; schema-valid data accepted and invalid data rejected; authentication enforced
(``ignored_auth`` also sends each keyed operation without its key and with a wrong one); undeclared methods
refused with 405 and ``Allow``; created resources available. The server has prediction and admin keys, and
Schemathesis gives each operation the right one through the security schemes the schema declares.

Schemathesis' generators never produce a decodable image, so file fields and image bodies are drawn from real
radiographs instead (NIH PNGs, a JPEG made from one, DICOM chest CRs): the decoding and scoring path is fuzzed,
not only its refusals (undecodable bytes are the hostile corpus' job, tests/reliability/test_hostile.py and
test_fuzz_decode.py). Derandomized (a fixed seed), no shrinking, a bounded number of cases per operation.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.config import SchemathesisConfig
from schemathesis.core.media_types import MEDIA_TYPE_STRATEGIES
from schemathesis.engine import events, from_schema
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi import unregister_string_format
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.conftest import SHARED_DATA
from tests.dicom.dicom_files import pydicom_data, to_bytes
from tests.reliability.conftest import MAX_UPLOAD_BYTES
from tests.service.live import LiveServer, live_server, tiny_settings

PREDICTION_KEY = "schemathesis-prediction-key"
ADMIN_KEY = "schemathesis-admin-key"
SEED = 20260131
#: Cases per operation in the fuzzing phase (the coverage phase adds its own boundary cases).
EXAMPLES_PER_OPERATION = 25
STATEFUL_STEPS = 6
#: Every check Schemathesis 4.32 registers (``schemathesis.checks``, ``schemathesis.specs.openapi.checks``),
#: all enabled. ``max_response_time`` is a budget, not a check of behaviour: tests here never assert wall time.
ALL_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "use_after_free",
    "ensure_resource_availability",
    "missing_required_header",
    "ignored_auth",
    "object_level_authorization",
    "unsupported_method",
    "allow_header_conformance",
)
#: Schemathesis' default rejections (5xx among them: not_a_server_error reports those) plus 413, how the service
#: refuses more files than a request may carry (``files`` over ``maxItems``): a rejection as much as a 422.
REJECTED = ("400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx")
#: Per-operation exclusions (schemathesis.toml's ``[[operations]]``), each with its reason. None: every check
#: runs on every operation.
EXCLUSIONS: list[dict[str, Any]] = []
#: Operations whose 2xx answers prove that real films were decoded and scored (or previewed).
SCORED = ("POST /v1/predict", "POST /predict", "POST /v1/predict/batch", "POST /dicomweb/studies", "POST /v1/preview")
STOW_BOUNDARY = "schemathesis-stow-boundary"


@dataclass(frozen=True)
class Films:
    """Real radiographs in each format the service reads."""

    png: list[bytes]
    jpeg: list[bytes]
    dicom: list[bytes]

    @property
    def all(self) -> list[bytes]:
        return self.png + self.jpeg + self.dicom


def _small_chest_cr() -> bytes:
    """pydicom-data's adult PA chest CR (RG1_UNCR, 1841x1955, 15 bits), every 4th pixel: the real film at a size
    the fuzzer can send hundreds of times."""
    ds = pydicom.dcmread(pydicom_data("RG1_UNCR.dcm"))
    pixels = np.ascontiguousarray(ds.pixel_array[::4, ::4])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return to_bytes(ds)


def _encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def films() -> Films:
    """NIH ChestX-ray14 PNGs from ../shared/data when present (else the DICOM film rendered as a PNG), a JPEG made
    from one, and DICOM chest CRs (pydicom-data's, reduced; the SIIM JPEG-baseline CR when shared)."""
    dicoms = [_small_chest_cr()]
    siim = SHARED_DATA / "originals" / "siim-chest-cr-jpeg-baseline.dcm"
    if siim.is_file():
        dicoms.append(siim.read_bytes())
    sample = SHARED_DATA / "nih-cxr14-sample" / "images"
    pngs = [path.read_bytes() for path in sorted(sample.glob("*.png"))[:3]] if sample.is_dir() else []
    if not pngs:
        pixels = pydicom.dcmread(io.BytesIO(dicoms[0])).pixel_array.astype(np.float64)
        scaled = (pixels - pixels.min()) / max(1.0, float(np.ptp(pixels))) * 255.0
        pngs = [_encode(Image.fromarray((255.0 - scaled).astype(np.uint8)), "PNG")]  # MONOCHROME1: inverted
    jpeg = _encode(Image.open(io.BytesIO(pngs[0])).convert("L"), "JPEG")
    films = Films(png=pngs, jpeg=[jpeg], dicom=dicoms)
    assert all(len(film) < MAX_UPLOAD_BYTES for film in films.all)
    return films


def _stow_body(instances: list[bytes]) -> bytes:
    """A STOW-RS multipart/related body, one DICOM instance per part."""
    opening = f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(opening + data + b"\r\n" for data in instances) + f"--{STOW_BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def film_strategies(films: Films) -> Iterator[None]:
    """Real films as what Schemathesis generates for binary strings and image bodies (its registries restored
    afterwards)."""
    any_film = st.sampled_from(films.all)
    media = {
        "image/png": st.sampled_from(films.png),
        "image/jpeg": st.sampled_from(films.jpeg),
        "application/dicom": st.sampled_from(films.dicom),
        "application/octet-stream": any_film,
        "multipart/related": st.lists(st.sampled_from(films.dicom), min_size=1, max_size=3).map(_stow_body),
    }
    saved = dict(MEDIA_TYPE_STRATEGIES)
    schemathesis.openapi.format("binary", any_film)  # the form's file fields
    for media_type, strategy in media.items():
        schemathesis.openapi.media_type(media_type, strategy)
    try:
        yield
    finally:
        unregister_string_format("binary")
        MEDIA_TYPE_STRATEGIES.clear()
        MEDIA_TYPE_STRATEGIES.update(saved)


@pytest.fixture(scope="module")
def keyed_server(tiny_service_checkpoint: Path) -> Iterator[LiveServer]:
    """A live server with prediction and admin keys and the reliability servers' upload limit."""
    settings = tiny_settings(
        tiny_service_checkpoint,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        api_keys=[PREDICTION_KEY],
        admin_api_keys=[ADMIN_KEY],
    )
    with live_server(settings) as live:
        yield live


def _config() -> SchemathesisConfig:
    """What a ``schemathesis.toml`` would say: every check, every phase, the keys per security scheme."""
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "continue-on-failure": True,
            "request-timeout": 60,
            "workers": 1,
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES_PER_OPERATION,
                "no-shrink": True,
                "deterministic": True,
                "database": "none",
            },
            "checks": {
                **{name: {"enabled": True} for name in ALL_CHECKS},
                "negative_data_rejection": {"expected-statuses": list(REJECTED)},
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS},
            },
            "auth": {
                "openapi": {
                    "ApiKey": {"api_key": PREDICTION_KEY},
                    "BearerKey": {"bearer": PREDICTION_KEY},
                    "AdminApiKey": {"api_key": ADMIN_KEY},
                    "AdminBearerKey": {"bearer": ADMIN_KEY},
                }
            },
            "operations": EXCLUSIONS,
        }
    )


@dataclass
class Run:
    """What one engine run did: its cases, the statuses each operation answered, and what went wrong."""

    cases: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    phases: dict[str, str] = field(default_factory=dict)
    answered: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)  # (phase, operation) -> statuses
    checks: Counter[str] = field(default_factory=Counter)  # check name -> times it ran
    wall_s: float = 0.0


def _exchange(recorder: Any, case_id: str) -> str:
    """The failing request and its answer, short: the bodies of films would fill screens."""
    interaction = recorder.interactions.get(case_id)
    if interaction is None:
        return "(no request recorded)"
    request, response = interaction.request, interaction.response
    body = request.body or b""
    headers = {name: values[0] for name, values in request.headers.items() if name.lower() != "user-agent"}
    lines = [f"> {request.method} {request.uri}", f"> {headers}", f"> body: {len(body)} bytes {body[:160]!r}"]
    if response is not None:
        text = (response.content or b"")[:400].decode("utf-8", "replace")
        lines.append(f"< {response.status_code} {response.headers.get('content-type')} {text}")
    return "\n".join(lines)


def _record(run: Run, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    run.cases += len(recorder.cases)
    for case_id, node in recorder.cases.items():
        interaction = recorder.interactions.get(case_id)
        if interaction is not None and interaction.response is not None:
            key = (event.phase.value, node.value.operation.label)
            run.answered.setdefault(key, Counter())[interaction.response.status_code] += 1
    for case_id, checks in recorder.checks.items():
        for check in checks:
            run.checks[check.name] += 1
            if check.failure_info is not None:
                failure = check.failure_info.failure
                run.failures.append(
                    f"[{event.phase.value}] {recorder.label} {check.name}: {failure.title}\n{failure.message}\n"
                    f"{_exchange(recorder, case_id)}"
                )


def _run(url: str) -> Run:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config())

    @schema.hook
    def map_case(ctx: Any, case: schemathesis.Case) -> schemathesis.Case:
        # A STOW-RS Content-Type names the body's boundary; the films' bodies use a fixed one.
        body = getattr(case.body, "data", case.body)
        if (case.media_type or "").startswith("multipart/related") and isinstance(body, bytes):
            content_type = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'
            case.headers = {**(case.headers or {}), "Content-Type": content_type}
        return case

    run = Run()
    started = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(run, event)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            run.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.PhaseFinished):
            run.phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.EngineFinished):
            run.failures.extend(f"(after the run) {failure.title}: {failure.message}" for failure in event.failures)
    run.wall_s = time.monotonic() - started
    return run


def test_every_check_with_keys_and_real_films(keyed_server: LiveServer, film_strategies: None) -> None:
    run = _run(keyed_server.url)
    print(f"\nschemathesis: {run.cases} cases in {run.wall_s:.1f} s, phases {run.phases}, checks {dict(run.checks)}")
    assert not run.errors, "\n\n".join(run.errors)
    assert not run.failures, "\n\n".join(dict.fromkeys(run.failures))
    assert all(run.phases.get(phase) == "success" for phase in ("coverage", "fuzzing", "stateful")), run.phases
    assert set(run.checks) == set(ALL_CHECKS), run.checks
    answered: dict[str, Counter[int]] = {}
    for (_, operation), statuses in run.answered.items():
        answered.setdefault(operation, Counter()).update(statuses)
    for operation in SCORED:  # real films were decoded and scored, not only refused
        assert sum(count for status, count in answered.get(operation, {}).items() if status < 300), operation
    followed = run.answered.get(("stateful", "GET /v1/audit/{request_id}"), Counter())
    assert followed[200], "the stateful phase never followed a prediction's link to its audit records"
    keyed = [operation for operation in answered if operation not in ("GET /healthz", "GET /readyz")]
    assert all(answered[operation][401] for operation in keyed), "ignored_auth never sent a request without a key"


def test_the_checks_catch_an_undocumented_status(hostile_server: LiveServer) -> None:
    """The checks are live: a response whose status the operation does not document fails them."""
    schema = schemathesis.openapi.from_url(f"{hostile_server.url}/openapi.json")
    operation = schema["/healthz"]["GET"]
    case = operation.Case()
    response = case.call(base_url=hostile_server.url)
    response.status_code = 418  # the schema documents 200 and the problems any request can meet, never 418
    with pytest.raises(FailureGroup):
        case.validate_response(response, checks=[status_code_conformance])


def test_upload_routes_document_the_malformed_multipart_400(hostile_server: LiveServer) -> None:
    """Regression (found by Schemathesis): the framework's 400 for a broken multipart body was undocumented."""
    paths = httpx.get(f"{hostile_server.url}/openapi.json").json()["paths"]
    uploads = [path for path, item in paths.items() if "multipart/form-data" in json.dumps(item.get("post", {}))]
    assert {"/v1/predict", "/predict", "/v1/predict/batch", "/v1/preview"} <= set(uploads)
    for path in uploads:
        assert "400" in paths[path]["post"]["responses"], path
