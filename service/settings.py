"""Service settings: one validated object, read once at start-up and passed to ``create_app(settings)``.

Every field can be set by an environment variable with the ``CXR_`` prefix (``CXR_MC_SAMPLES=30``). List
settings take a JSON list or comma-separated values (``CXR_API_KEYS=k1,k2`` or ``CXR_API_KEYS='["k1","k2"]'``).
Tests build their own ``Settings(...)``; nothing reads the environment at import time. Entry points call
:func:`load_settings`, whose :class:`InvalidSettingsError` says in one line which variable is wrong, what it was
given (only the length of a secret) and what it expects. ``python -m service.settings --output docs/settings.md``
renders the settings reference from the field descriptions, which say what a setting does and why (measured
figures belong in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "demo"

#: Limits shared with nginx and Kubernetes (docker/, k8s/): tests check those files agree with these.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
#: Above the bound of every PNG, JPEG and gray DICOM at DEFAULT_MAX_PIXELS (598 MiB, docs/decode-memory.md).
DEFAULT_MAX_DECODE_BYTES = 640 * 1024 * 1024


class Settings(BaseSettings):
    """Validated configuration of one service process."""

    # hide_input_in_errors: a validation error must not print the API keys it was given (start-up logs).
    model_config = SettingsConfigDict(env_prefix="CXR_", frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = Field(
        default="127.0.0.1",
        description="Address `python -m service` binds (flag --host; 0.0.0.0: every interface). Gunicorn binds "
        "CXR_BIND instead",
    )
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        description="TCP port `python -m service` listens on (flag --port). Gunicorn binds CXR_BIND instead",
    )
    model_path: Path | None = Field(
        default=None,
        description="Checkpoint directory (model.safetensors + model.json; flag --model). Unset: models/demo if "
        "present, else an untrained placeholder that says so (see allow_untrained)",
    )
    allow_untrained: bool = Field(
        default=True, description="Start with an untrained placeholder when no checkpoint is configured or shipped"
    )
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1... (flag --device)")
    mc_samples: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Monte-Carlo dropout samples T per image when a request does not ask for a number "
        "(mc_samples query parameter); unset: the checkpoint spec's value",
    )
    max_batch_images: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Most images per model batch. The default is the batch at which a small CPU runs fastest per image "
        "(bench/serve.py, docs/benchmarks.md); a GPU wants larger batches (the k8s GPU overlay sets 16)",
    )
    max_wait_ms: float = Field(
        default=10.0,
        ge=0,
        le=1000,
        description="Longest a batch waits to fill after its oldest image arrived; images already queued are "
        "taken at once, and a partial batch is not held when no other upload is on its way",
    )
    max_queue: int = Field(
        default=64,
        ge=1,
        description="Most images waiting for a batch or being decoded for one (the running batch not counted); "
        "beyond, 503 with Retry-After. Prediction requests admitted at once: "
        "max_queue + max_batch_images",
    )
    max_upload_bytes: int = Field(
        default=DEFAULT_MAX_UPLOAD_BYTES,
        ge=1024,
        description="Largest image file: one upload, one file of a batch, one DICOM instance (STOW-RS or DIMSE); "
        "beyond, 413. nginx and Kubernetes carry the same limit (a test checks that they agree)",
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="Most pixels an image may declare (width x height, times frames for DICOM), checked from its "
        "header before decoding; beyond, 413",
    )
    max_files_per_request: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Most files in one batch request (POST /v1/predict/batch) or instances in one STOW-RS "
        "request; beyond, 413. Their body may be up to this many times max_upload_bytes",
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a prediction waits for the model (else 504); also bounds an audit write, a store "
        "to the PACS and a graceful shutdown's drain. A batch running longer marks the inference worker stalled "
        "(/healthz and /readyz answer 503)",
    )
    # Slow and careless clients (docs/security.md). Enforced by the server itself (service.server and the body
    # guard in service.middleware), so `python -m service` and Gunicorn are safe without nginx in front.
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A connection must deliver a request's complete headers within this many seconds of its "
        "first byte (or of connecting); else 408 and the connection is closed",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Most bytes of request line plus headers; beyond, 431 and the connection is closed",
    )
    max_header_count: int = Field(default=100, ge=8, le=1000, description="Most header fields in a request; 431")
    body_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="A request body must arrive completely within this many seconds of its headers; else 408",
    )
    body_min_rate_bytes_s: float = Field(
        default=1024.0,
        ge=0,
        description="After body_grace_s, a body must keep arriving at this average rate (bytes/s since its "
        "headers) or the request is answered 408; 0: only body_timeout_s applies",
    )
    body_grace_s: float = Field(
        default=5.0, ge=0, description="Seconds a body may arrive at any rate before body_min_rate_bytes_s applies"
    )
    max_receiving: int = Field(
        default=256,
        ge=1,
        description="Most prediction and preview uploads whose bodies are still arriving; beyond, 503 at arrival. "
        "Uploads still arriving do not count against the prediction bound (max_queue + max_batch_images)",
    )
    preview_workers: int = Field(
        default=1, ge=1, le=16, description="Threads decoding previews (/v1/preview), apart from decode_workers"
    )
    max_decode_bytes: int | None = Field(
        default=DEFAULT_MAX_DECODE_BYTES,
        ge=64 * 1024 * 1024,
        description="Most memory one upload's decode and preprocessing may take, bounded from its header before "
        "decoding (bayesnet.decode_memory_bytes); beyond, 413. The default admits every PNG, JPEG and gray DICOM "
        "up to max_pixels and refuses only large colour or 32-bit DICOM (docs/decode-memory.md). None (from code only; "
        "no environment value gives it): no limit beyond max_pixels",
    )
    max_previews_in_flight: int = Field(
        default=4, ge=1, le=256, description="Most /v1/preview requests being decoded or waiting to be; beyond, 503"
    )
    decode_workers: int = Field(default=2, ge=1, le=64, description="Threads decoding/preprocessing uploads")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads for the model; unset: torch's default (under Gunicorn with several "
        "workers, cores // workers: docker/gunicorn.conf.py)",
    )
    busy_torch_threads: int | None = Field(
        default=1,
        ge=1,
        description="CPU: torch threads for a batch of several images (requests are queueing). 1 leaves the other "
        "cores to decoding, heatmaps and HTTP, which raises throughput under load (docs/benchmarks.md); a "
        "single-image batch uses torch_threads for the lowest latency. None (from code only; no environment "
        "value gives it): torch_threads for every batch",
    )
    # NoDecode: pydantic-settings would demand JSON of a list variable; _list_from_text also takes "a,b".
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins whose browser pages may call the API (CORS, e.g. https://viewer.example.org); "
        "empty: no CORS headers, so only pages served by the service itself",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Prediction keys, sent as X-API-Key or Authorization: Bearer; empty: the API is open to anyone "
        "who can reach it (docs/security.md)",
    )
    autocast: Literal["auto", "off", "fp16", "bf16"] = Field(
        default="auto",
        description="Mixed precision on CUDA (auto: fp16, whose answers stay close to fp32's; bf16 moves them "
        "enough to change decisions: bench/precision.py, docs/benchmarks.md); off on CPU",
    )
    ood_action: Literal["flag", "reject"] = Field(
        default="flag",
        description="Images the out-of-distribution gate flags: flag (predictions returned, ood.in_distribution "
        "false) or reject (422 problem, no predictions). No effect for a checkpoint without a gate",
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys of the audit read API (GET /v1/audit), separate from api_keys; empty: the audit API "
        "refuses everyone",
    )
    audit_url: str = Field(
        default_factory=lambda: f"sqlite:///{default_state_dir() / 'audit.sqlite3'}",
        description="SQLAlchemy URL of the audit trail (docs/audit.md): a SQLite file in WAL mode by default "
        "(~/.local/state/bayesnet-cxr/audit.sqlite3, or under $XDG_STATE_HOME); postgresql+psycopg://user@host/db "
        "in deployment. Migrated to the newest schema at start-up",
    )
    audit_policy: Literal["fail-closed", "buffer"] = Field(
        default="fail-closed",
        description="When the trail cannot be written: fail-closed (predictions answer 503) or buffer (records "
        "go to a bounded on-disk spool, replayed when the database returns; a full spool answers 503)",
    )
    audit_sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="NORMAL",
        description="SQLite audit file only: NORMAL (default) keeps every committed record through a crash of the "
        "service (SIGKILL) but not of the operating system, at no measurable cost; FULL fsyncs each commit so a "
        "record also survives a power cut, at a cost in latency that each answer waits for (bench/audit.py, "
        "docs/audit.md). Deployments that need power-loss durability use PostgreSQL (or FULL)",
    )
    audit_spool_dir: Path | None = Field(
        default=None, description="The buffer policy's spool directory; unset: audit-spool in the state directory"
    )
    audit_spool_max_records: int = Field(default=100_000, ge=1, description="Most records the spool holds")
    audit_retention_days: int | None = Field(
        default=None,
        ge=183,
        description="Delete audit records older than this (hourly, in small transactions); unset: keep them. At "
        "least 183 days: the EU AI Act (Art. 19, 26) asks for at least six months",
    )
    audit_group_commit_ms: float = Field(
        default=3.0,
        ge=0,
        le=100,
        description="Under load, the audit writer holds a transaction open up to this long while answers are "
        "being finished, so that the answers of one inference batch share one commit (the answers wait for it); "
        "a lone request never waits. 0: commit whatever is queued at once (docs/benchmarks.md)",
    )
    audit_rolling_window: int = Field(
        default=1000, ge=10, description="Predictions behind the rolling referral/OOD/label rates in /metrics"
    )
    dicomweb_forward_url: str | None = Field(
        default=None,
        description="DICOMweb base URL of the PACS that receives the SR of every instance sent to POST "
        "/dicomweb/studies (STOW-RS, e.g. http://pacs:8042/dicom-web); unset: results are not forwarded "
        "(docs/dicom.md)",
    )
    dicomweb_outbox_dir: Path | None = Field(
        default=None,
        description="Where SRs wait for the PACS (persistent); unset: dicomweb-outbox in the state directory",
    )
    dicomweb_outbox_max_instances: int = Field(
        default=10_000, ge=1, description="Most SRs the outbox holds; beyond, STOW-RS instances fail (Out of Resources)"
    )
    dicomweb_retry_initial_s: float = Field(
        default=1.0, gt=0, description="First wait after a failed store to the PACS; doubles on each failure"
    )
    dicomweb_retry_max_s: float = Field(default=60.0, gt=0, description="Longest wait between two store attempts")
    dimse_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="TCP port of the DICOM (DIMSE) C-STORE/C-ECHO listener that scores what a PACS or modality "
        "pushes, like POST /dicomweb/studies (docs/dicom.md); unset: no listener",
    )
    dimse_host: str = Field(
        default="127.0.0.1",
        description="Address the DIMSE listener binds. The port is unauthenticated DICOM: 0.0.0.0 only with a "
        "calling AE allow-list and a network policy that admits the PACS alone (docs/security.md)",
    )
    dimse_ae_title: str = Field(
        default="BAYESCXR", description="The listener's AE title; an association calling another title is rejected"
    )
    dimse_allowed_ae: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles the listener accepts (CXR_DIMSE_ALLOWED_AE=ORTHANC,PACS2); empty: any",
    )
    dimse_max_associations: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most simultaneous DIMSE associations; each holds at most one instance (max_upload_bytes) in "
        "memory while it is scored",
    )
    dimse_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="An association that sends nothing for this long is aborted"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the service's and uvicorn's loggers (and of Gunicorn's own log)"
    )
    log_json: bool = Field(
        default=True, description="Log one JSON object per line on stdout; false: plain text lines, for a terminal"
    )
    warmup: bool = Field(
        default=True,
        description="Run the model on the inference thread before the service reports ready, so that the first "
        "request does not pay for lazy initialisation (threads, kernels, CUDA graph capture)",
    )
    freeze_trunk: bool = Field(
        default=True,
        description="On CPU, run the deterministic trunk as a frozen TorchScript graph with BatchNorm folded "
        "(bayesnet.frozen; checked against eager at start-up, eager if tracing fails)",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="On CUDA, replay the trunk of each padded batch size from a CUDA graph captured at warm-up "
        "(bayesnet.cudagraph; checked against eager, eager if capture fails). Needs warmup",
    )
    tune_allocator: bool = Field(
        default=True,
        description="Raise glibc's malloc mmap/trim thresholds at start-up (bayesnet.tune_allocator), so that CPU "
        "inference stops returning its activation memory to the kernel and faulting it in again on every call "
        "(docs/benchmarks.md); off leaves the allocator as the environment configured it",
    )

    @field_validator("cors_origins", "api_keys", "admin_api_keys", "dimse_allowed_ae", mode="before")
    @classmethod
    def _list_from_text(cls, value: object) -> object:
        """A list given as text (an environment variable): a JSON list, or comma-separated values whose
        surrounding spaces are dropped; empty text is the empty list."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"expected a JSON list or comma-separated values; it is not valid JSON ({err.msg})"
                ) from err
        return [item.strip() for item in text.split(",")] if text else []

    @field_validator("cors_origins")
    @classmethod
    def _no_blank_origins(cls, value: list[str]) -> list[str]:
        return [origin.strip() for origin in value if origin.strip()]

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _no_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty key would let a request without any key in (b"" == b""), and HTTP strips the spaces
        # around header values, so a key with them could never match: refuse both at start-up.
        for index, key in enumerate(value):
            secret = key.get_secret_value()
            if not secret or secret != secret.strip():
                raise ValueError(f"key [{index}] is empty or has surrounding whitespace")
        return value

    @field_validator("dimse_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _valid_ae_title(value)

    @field_validator("dimse_allowed_ae")
    @classmethod
    def _ae_titles(cls, value: list[str]) -> list[str]:
        return [_valid_ae_title(title) for title in value]

    @model_validator(mode="after")
    def _admin_keys_apart(self) -> Settings:
        # An admin key that also predicts would blur who read the trail and who wrote it.
        prediction = {key.get_secret_value() for key in self.api_keys}
        if any(key.get_secret_value() in prediction for key in self.admin_api_keys):
            raise ValueError("CXR_ADMIN_API_KEYS and CXR_API_KEYS must not share a key")
        return self

    @property
    def audit_spool_path(self) -> Path:
        return self.audit_spool_dir or default_state_dir() / "audit-spool"

    @property
    def dicomweb_outbox_path(self) -> Path:
        return self.dicomweb_outbox_dir or default_state_dir() / "dicomweb-outbox"


def default_state_dir() -> Path:
    """Where the service keeps state by default: $XDG_STATE_HOME/bayesnet-cxr (~/.local/state/bayesnet-cxr)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bayesnet-cxr"


def _valid_ae_title(value: str) -> str:
    """A DICOM AE title (PS3.5 6.2 VR AE): 1 to 16 ASCII characters, no backslash or control character; the
    surrounding spaces, which are not significant, removed."""
    title = value.strip()
    if not 1 <= len(title) <= 16 or not title.isascii() or "\\" in title or not title.isprintable():
        raise ValueError(
            f"expected DICOM AE titles (1 to 16 printable ASCII characters, no backslash); {value[:40]!r} is not"
        )
    return title


class InvalidSettingsError(ValueError):
    """Settings that cannot be used. ``str()`` is one line: each bad variable, what it was given (for a secret only
    its length) and the form it expects."""


def load_settings(overrides: Mapping[str, object] | None = None, *, flags: Mapping[str, str] | None = None) -> Settings:
    """:class:`Settings` from the environment and ``overrides`` (command-line values), or
    :class:`InvalidSettingsError` with a one-line explanation instead of pydantic's multi-line report.

    ``flags`` names the command-line option behind an override (``{"port": "--port"}``) for the message.
    """
    given = dict(overrides or {})
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as err:
        raise InvalidSettingsError(_describe(err, given, flags or {})) from err
    except SettingsError as err:  # a value pydantic-settings decodes itself (a field without NoDecode) was malformed
        match = re.search(r'field "(\w+)"', str(err))
        name = _env_name(match.group(1)) if match else "(unknown)"
        raise InvalidSettingsError(f"invalid setting {name}: it cannot be decoded") from err


def _env_name(field: str) -> str:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def _describe(err: ValidationError, overrides: Mapping[str, object], flags: Mapping[str, str]) -> str:
    environ = {name.lower(): value for name, value in os.environ.items()}  # pydantic-settings ignores the case
    problems: dict[str, str] = {}
    for error in err.errors(include_url=False):
        loc = error.get("loc", ())
        field = str(loc[0]) if loc else ""
        if field in problems:
            continue  # one line per variable: its first problem (a list's items may each fail)
        info = Settings.model_fields.get(field)
        if info is None:  # a rule across settings (no field), or a keyword from code that is no setting
            problems[field] = f"invalid settings: {_reason(error)}" if not field else f"unknown setting {field}"
            continue
        if field in overrides:
            name, raw = flags.get(field, field), overrides[field]
        else:
            name = _env_name(field)
            raw = environ.get(name.lower(), error.get("input"))
        expected = _reason(error) if error.get("type") in ("value_error", "assertion_error") else _expected(info)
        problems[field] = f"invalid setting {name}: {expected}, got {_given(field, info, raw)}"
    return "; ".join(problems.values()) or "invalid settings"


def _reason(error: Any) -> str:
    """A validator's own message, without pydantic's "Value error, " prefix."""
    message = str(error.get("msg", "invalid"))
    return message.split(", ", 1)[1] if message.startswith(("Value error, ", "Assertion failed, ")) else message


def _is_secret(field: str, info: FieldInfo) -> bool:
    return "key" in field or "SecretStr" in repr(info.annotation)


def _given(field: str, info: FieldInfo, raw: object) -> str:
    """What the variable held, for the message: never a secret's value, only its length."""
    if _is_secret(field, info):
        if isinstance(raw, str):
            return f"a value of {len(raw)} characters"
        return f"a {type(raw).__name__} value"
    text = repr(raw)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _expected(info: FieldInfo) -> str:
    """The form a field takes, in words: ``an integer from 1 to 100``, ``one of flag, reject``."""
    annotation = _without_none(info.annotation)
    origin = get_origin(annotation)
    if origin is Literal:
        return "expected one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if origin is list:
        return "expected a JSON list or comma-separated values"
    if annotation is bool:
        return "expected true or false"
    if annotation is Path:
        return "expected a path"
    if annotation in (int, float):
        noun = "an integer" if annotation is int else "a number"
        return f"expected {noun}{_bounds(info)}"
    return "expected a string"


def _bounds(info: FieldInfo) -> str:
    low: tuple[str, object] | None = None
    high: tuple[str, object] | None = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = ("ge", item.ge)
        elif isinstance(item, annotated_types.Gt):
            low = ("gt", item.gt)
        elif isinstance(item, annotated_types.Le):
            high = ("le", item.le)
        elif isinstance(item, annotated_types.Lt):
            high = ("lt", item.lt)
    if low and high and low[0] == "ge" and high[0] == "le":
        return f" from {low[1]} to {high[1]}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    parts = [f"{words[bound[0]]} {bound[1]}" for bound in (low, high) if bound is not None]
    text = " and ".join(parts)
    return f" of {text}" if text.startswith("at ") else f" {text}" if text else ""


#: The sections of docs/settings.md, in order, and the settings each holds: every field in exactly one.
REFERENCE_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Server and request limits",
        (
            "host",
            "port",
            "request_timeout_s",
            "max_upload_bytes",
            "max_files_per_request",
            "max_pixels",
            "max_decode_bytes",
            "max_receiving",
            "max_previews_in_flight",
            "preview_workers",
        ),
    ),
    (
        "Slow clients",
        (
            "header_timeout_s",
            "max_header_bytes",
            "max_header_count",
            "body_timeout_s",
            "body_min_rate_bytes_s",
            "body_grace_s",
        ),
    ),
    (
        "Batching and inference",
        ("max_batch_images", "max_wait_ms", "max_queue", "decode_workers", "torch_threads", "busy_torch_threads"),
    ),
    ("Model", ("model_path", "allow_untrained", "device", "mc_samples", "autocast")),
    ("Security and keys", ("api_keys", "admin_api_keys", "cors_origins")),
    ("Out-of-distribution gate", ("ood_action",)),
    (
        "Audit trail",
        (
            "audit_url",
            "audit_policy",
            "audit_sqlite_synchronous",
            "audit_spool_dir",
            "audit_spool_max_records",
            "audit_retention_days",
            "audit_group_commit_ms",
            "audit_rolling_window",
        ),
    ),
    (
        "DICOMweb forwarding",
        (
            "dicomweb_forward_url",
            "dicomweb_outbox_dir",
            "dicomweb_outbox_max_instances",
            "dicomweb_retry_initial_s",
            "dicomweb_retry_max_s",
        ),
    ),
    (
        "DICOM (DIMSE) listener",
        (
            "dimse_port",
            "dimse_host",
            "dimse_ae_title",
            "dimse_allowed_ae",
            "dimse_max_associations",
            "dimse_idle_timeout_s",
        ),
    ),
    ("Logging", ("log_level", "log_json")),
    ("Performance switches", ("warmup", "freeze_trunk", "cuda_graphs", "tune_allocator")),
)

REFERENCE_PATH = REPO_ROOT / "docs" / "settings.md"
REGENERATE_COMMAND = "python -m service.settings --output docs/settings.md"

_REFERENCE_INTRO = f"""\
# Settings reference

<!-- Generated from service.settings.Settings by `{REGENERATE_COMMAND}`; do not edit by hand.
     tests/service/test_settings_reference.py fails when this file and the model disagree. -->

The service reads its settings once, at start-up, into one validated object (`service.settings.Settings`).
Each is an environment variable: `CXR_` and the setting's name in capitals (`mc_samples` is `CXR_MC_SAMPLES`;
the case of the name does not matter). `python -m service` also takes `--host`, `--port`, `--model` and
`--device`, which win over the variables. A list is a JSON list or comma-separated values, whose surrounding
spaces are dropped: `CXR_API_KEYS=key-1,key-2` or `CXR_API_KEYS='["key-1","key-2"]'`; an empty value is the
empty list. A setting whose default is *unset* takes its meaning from its description when the variable is
absent.

An invalid value stops `python -m service` (and a Gunicorn worker, which stops the arbiter) before anything is
loaded, with exit status 3 and one line on stderr naming the variable or flag, what it was given (for a key only
its length) and what it expects:
`bayesnet-cxr: invalid setting CXR_MC_SAMPLES: expected an integer from 1 to 100, got '0'`.

Gunicorn's configuration, `docker/gunicorn.conf.py`, reads a few variables of its own that are not settings of
the app: `CXR_BIND` (address:port, in place of `CXR_HOST` and `CXR_PORT`), `CXR_WORKERS`, `CXR_WORKER_TIMEOUT_S`,
`CXR_GRACEFUL_TIMEOUT_S` and `CXR_MAX_REQUESTS`; that file gives their defaults and purpose.
Before torch loads, `python -m service` and Gunicorn's workers also set libgomp's `GOMP_SPINCOUNT` (how long an
idle OpenMP thread spins), unless `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` is already set: the reasons are in
[benchmarks.md](benchmarks.md).

This page is generated from the model's field descriptions: change a description in `service/settings.py`, then
run `{REGENERATE_COMMAND}`. Measured figures behind the defaults are in
[benchmarks.md](benchmarks.md), not here.
"""


def settings_reference() -> str:
    """docs/settings.md: every setting's variable, type, default and description, in the sections of
    :data:`REFERENCE_SECTIONS`. Raises ``ValueError`` when a field has no section or no description."""
    fields = Settings.model_fields
    placed = [name for _, names in REFERENCE_SECTIONS for name in names]
    unplaced = [name for name in fields if name not in placed]
    unknown = [name for name in placed if name not in fields]
    repeated = sorted({name for name in placed if placed.count(name) > 1})
    undescribed = [name for name, info in fields.items() if not (info.description or "").strip()]
    if unplaced or unknown or repeated or undescribed:
        raise ValueError(
            f"settings reference: fields without a section {unplaced}, unknown {unknown}, in two sections "
            f"{repeated}, without a description {undescribed} (service/settings.py REFERENCE_SECTIONS, Field)"
        )
    parts = [_REFERENCE_INTRO]
    for title, names in REFERENCE_SECTIONS:
        rows = [_reference_row(name, fields[name]) for name in names]
        parts.append(
            f"\n## {title}\n\n| Variable | Type | Default | Description |\n|---|---|---|---|\n" + "".join(rows)
        )
    return "".join(parts)


def _reference_row(name: str, info: FieldInfo) -> str:
    cells = (f"`{_env_name(name)}`", _reference_type(name, info), _reference_default(name, info), info.description)
    return "| " + " | ".join(str(cell).strip().replace("|", "\\|") for cell in cells) + " |\n"


def _reference_type(name: str, info: FieldInfo) -> str:
    """The form a field takes, in a few words: ``int, 1 to 100``, ``one of: flag, reject``, ``list of secrets``."""
    annotation = _without_none(info.annotation)
    if get_origin(annotation) is Literal:
        return "one of: " + ", ".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list{' of secrets' if _is_secret(name, info) else ''} (JSON or comma-separated)"
    if annotation is bool:
        return "bool"
    if annotation is Path:
        return "path"
    if annotation in (int, float):
        bounds: dict[str, object] = {}
        for item in info.metadata:
            for kind in ("ge", "gt", "le", "lt"):
                if hasattr(item, kind):
                    bounds[kind] = _quantity(name, getattr(item, kind))
        if "ge" in bounds and "le" in bounds:
            return f"{annotation.__name__}, {bounds['ge']} to {bounds['le']}"
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return ", ".join([annotation.__name__, *(f"{symbols[kind]} {value}" for kind, value in bounds.items())])
    return "string"


def _reference_default(name: str, info: FieldInfo) -> str:
    """The default in words; a factory's (which may depend on the machine) only by its kind."""
    if info.default_factory is not None:
        return "empty" if get_origin(_without_none(info.annotation)) is list else "see description"
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value:g}`" if isinstance(value, float) else _quantity(name, value, code=True)


def _quantity(name: str, value: object, *, code: bool = False) -> str:
    """``value`` as written in a variable, with its size in KiB or MiB when ``name`` counts bytes."""
    text = f"`{value}`" if code else f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, int) and name.endswith("_bytes") and value >= 1024 and value % 1024 == 0:
        mib, kib = divmod(value, 1024 * 1024)
        return f"{text} ({mib} MiB)" if kib == 0 else f"{text} ({value // 1024} KiB)"
    return text


def _without_none(annotation: Any) -> Any:
    """``int`` for ``int | None``: the type a set variable takes."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def main(argv: list[str] | None = None) -> int:
    """``python -m service.settings``: print the settings reference, write it (``--output``), or check that a file
    holds it (``--check``: exit status 1 and the command to regenerate when it does not)."""
    parser = argparse.ArgumentParser(prog="python -m service.settings", description=main.__doc__)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", type=Path, help="write the reference to this file (docs/settings.md)")
    target.add_argument("--check", type=Path, help="exit 1 unless this file holds the current reference")
    args = parser.parse_args(argv)
    text = settings_reference()
    if args.check is not None:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
        if current != text:
            sys.stderr.write(f"{args.check} is not the current settings reference; run: {REGENERATE_COMMAND}\n")
            return 1
        return 0
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
