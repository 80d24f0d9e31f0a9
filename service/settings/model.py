"""The settings models: :class:`Settings` (the app), its groups, and :class:`GunicornSettings` (the arbiter)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.settings.groups import (
    AuditSettings,
    DicomwebSettings,
    DimseSettings,
    GuaranteeSettings,
    PacsSettings,
    SettingsGroup,
    list_from_text,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "demo"

#: Limits shared with nginx and Kubernetes (docker/, k8s/): tests check those files agree with these.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
#: Above the bound of every PNG, JPEG and gray DICOM at DEFAULT_MAX_PIXELS (598 MiB, docs/decode-memory.md).
DEFAULT_MAX_DECODE_BYTES = 640 * 1024 * 1024


class _GroupedEnvironment(EnvSettingsSource):
    """The environment, with ``CXR_AUDIT_URL`` read as ``audit.url``. A ``CXR_`` variable that names no setting is
    ignored, as it is at the top level (pydantic-settings' default), instead of failing the group."""

    def explode_env_vars(self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]) -> dict[str, Any]:
        values = super().explode_env_vars(field_name, field, env_vars)
        group = field.annotation
        if isinstance(group, type) and issubclass(group, SettingsGroup):
            return {name: value for name, value in values.items() if name in group.model_fields}
        return values


class Settings(BaseSettings):
    """Validated configuration of one service process; the audit trail, DICOMweb forwarding and the DIMSE listener
    have their settings in groups (``settings.audit.url``), with the same variable names (``CXR_AUDIT_URL``)."""

    # hide_input_in_errors: a validation error must not print the API keys it was given (start-up logs).
    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
    )

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
    # Slow and careless clients (docs/security.md). Enforced by the server itself (service.process.server and the body
    # guard in service.api.middleware), so `python -m service` and Gunicorn are safe without nginx in front.
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
    outcome_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys of POST /v1/outcomes (radiologists' verdicts in), apart from the prediction and admin keys; "
        "empty: the route refuses everyone",
    )
    outcome_code_map: Path | None = Field(
        default=None,
        description="JSON file mapping the site's finding codes to the 14 findings for POST /v1/outcomes "
        '({"mappings": [{"system": ..., "code": ..., "label": ...}]}, docs/guarantee.md); unset: the service\'s '
        "own codes and SNOMED CT only",
    )
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit trail (CXR_AUDIT_*)")
    dicomweb: DicomwebSettings = Field(
        default_factory=DicomwebSettings, description="Forwarding results to a PACS (CXR_DICOMWEB_*)"
    )
    dimse: DimseSettings = Field(default_factory=DimseSettings, description="The DIMSE listener (CXR_DIMSE_*)")
    guarantee: GuaranteeSettings = Field(
        default_factory=GuaranteeSettings, description="The guarantee watched in operation (CXR_GUARANTEE_*)"
    )
    pacs: PacsSettings = Field(
        default_factory=PacsSettings, description="Reading a PACS archive over DICOMweb (CXR_PACS_*)"
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

    @field_validator("cors_origins", "api_keys", "admin_api_keys", "outcome_api_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return list_from_text(value)

    @field_validator("cors_origins")
    @classmethod
    def _no_blank_origins(cls, value: list[str]) -> list[str]:
        return [origin.strip() for origin in value if origin.strip()]

    @field_validator("api_keys", "admin_api_keys", "outcome_api_keys")
    @classmethod
    def _no_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty key would let a request without any key in (b"" == b""), and HTTP strips the spaces
        # around header values, so a key with them could never match: refuse both at start-up.
        for index, key in enumerate(value):
            secret = key.get_secret_value()
            if not secret or secret != secret.strip():
                raise ValueError(f"key [{index}] is empty or has surrounding whitespace")
        return value

    @model_validator(mode="after")
    def _admin_keys_apart(self) -> Settings:
        # An admin key that also predicts would blur who read the trail and who wrote it.
        prediction = {key.get_secret_value() for key in self.api_keys}
        if any(key.get_secret_value() in prediction for key in self.admin_api_keys):
            raise ValueError("CXR_ADMIN_API_KEYS and CXR_API_KEYS must not share a key")
        # Whoever sends verdicts moves the guarantee's live bounds: a role of its own.
        others = prediction | {key.get_secret_value() for key in self.admin_api_keys}
        if any(key.get_secret_value() in others for key in self.outcome_api_keys):
            raise ValueError("CXR_OUTCOME_API_KEYS must not share a key with CXR_API_KEYS or CXR_ADMIN_API_KEYS")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _GroupedEnvironment(settings_cls), dotenv_settings, file_secret_settings


class GunicornSettings(BaseSettings):
    """What ``docker/gunicorn.conf.py`` needs beyond the app's settings, validated the same way (``CXR_BIND``...).

    The arbiter reads these; each worker then builds its app from :class:`Settings`."""

    model_config = SettingsConfigDict(env_prefix="CXR_", frozen=True, extra="ignore", hide_input_in_errors=True)

    bind: str = Field(default="127.0.0.1:8000", min_length=1, description="address:port Gunicorn listens on")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes, each with its own model and batcher; with several, each worker's torch "
        "thread team gets cores // workers threads unless CXR_TORCH_THREADS is set",
    )
    worker_timeout_s: int = Field(
        default=180, ge=1, description="A worker silent this long is killed (it loads and warms the model first)"
    )
    graceful_timeout_s: int = Field(
        default=90,
        ge=1,
        description="On SIGTERM/HUP, how long a worker may finish accepted requests; above CXR_REQUEST_TIMEOUT_S",
    )
    max_requests: int = Field(
        default=0, ge=0, description="Recycle a worker after this many requests (10% jitter); 0: never"
    )
