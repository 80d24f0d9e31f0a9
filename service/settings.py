"""Service settings: one validated object, read once at start-up and passed to ``create_app(settings)``.

Every field can be set by an environment variable with the ``CXR_`` prefix (``CXR_MC_SAMPLES=30``,
``CXR_API_KEYS='["k1","k2"]'``, ``CXR_CORS_ORIGINS='["https://pacs.example.org"]'``). Tests build their
own ``Settings(...)``; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "demo"

#: Limits shared with nginx and Kubernetes (docker/, k8s/): tests check those files agree with these.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000


class Settings(BaseSettings):
    """Validated configuration of one service process."""

    # hide_input_in_errors: a validation error must not print the API keys it was given (start-up logs).
    model_config = SettingsConfigDict(env_prefix="CXR_", frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    model_path: Path | None = Field(
        default=None,
        description="Checkpoint directory (model.safetensors + model.json). None: models/demo if present, "
        "else an untrained placeholder that says so.",
    )
    allow_untrained: bool = Field(
        default=True, description="Start with an untrained placeholder when no checkpoint is configured or shipped"
    )
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1...")
    mc_samples: int | None = Field(default=None, ge=1, le=100, description="Default T; None: the spec's value")
    max_batch_images: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Most images per model batch. 4 is the fastest per image on a small CPU (bench/serve.py, "
        "docs/benchmarks.md); on a GPU use 16-64 (the k8s GPU overlay sets 16)",
    )
    max_wait_ms: float = Field(default=10.0, ge=0, le=1000)
    max_queue: int = Field(default=64, ge=1)
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, ge=1024)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_files_per_request: int = Field(default=16, ge=1, le=256)
    request_timeout_s: float = Field(default=60.0, gt=0)
    decode_workers: int = Field(default=2, ge=1, le=64, description="Threads decoding/preprocessing uploads")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads; None: torch default (docker/gunicorn.conf.py sets it when workers > 1)",
    )
    busy_torch_threads: int | None = Field(
        default=1,
        ge=1,
        description="CPU: torch threads for a batch of several images (requests are queueing). 1 leaves the other "
        "cores to decoding, heatmaps and HTTP (1.3x the cams=auto throughput on 2 cores, docs/benchmarks.md); a "
        "single-image batch uses torch_threads for the lowest latency. None: torch_threads for every batch",
    )
    cors_origins: list[str] = Field(default_factory=list)
    api_keys: list[SecretStr] = Field(default_factory=list, description="Accepted X-API-Key values; empty: open")
    autocast: Literal["auto", "off", "fp16", "bf16"] = Field(
        default="auto",
        description="Mixed precision on CUDA (auto: fp16, whose answers stay within 0.02 of fp32; bf16 moves them "
        "by up to 0.37: bench/precision.py); off on CPU",
    )
    ood_action: Literal["flag", "reject"] = Field(
        default="flag",
        description="Images the out-of-distribution gate flags: flag (predictions returned, ood.in_distribution "
        "false) or reject (422 problem, no predictions). No effect for a checkpoint without a gate",
    )
    admin_api_keys: list[SecretStr] = Field(
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
        "service (SIGKILL) but not of the operating system, at no measurable cost (bench/audit.py); FULL fsyncs "
        "each commit so a record also survives a power cut, at 1.3x the median latency of one client on the "
        "demo CPU. Deployments that need power-loss durability use PostgreSQL (or FULL)",
    )
    audit_spool_dir: Path | None = Field(
        default=None, description="The buffer policy's spool directory; None: audit-spool beside the state dir"
    )
    audit_spool_max_records: int = Field(default=100_000, ge=1, description="Most records the spool holds")
    audit_retention_days: int | None = Field(
        default=None,
        ge=183,
        description="Delete audit records older than this (hourly, in small transactions); None: keep them. At "
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
        "/dicomweb/studies (STOW-RS, e.g. http://pacs:8042/dicom-web); None: results are not forwarded "
        "(docs/dicom.md)",
    )
    dicomweb_outbox_dir: Path | None = Field(
        default=None, description="Where SRs wait for the PACS (persistent); None: dicomweb-outbox beside the state dir"
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
        "pushes, like POST /dicomweb/studies (docs/dicom.md); None: no listener",
    )
    dimse_host: str = Field(
        default="127.0.0.1",
        description="Address the DIMSE listener binds. The port is unauthenticated DICOM: 0.0.0.0 only with a "
        "calling AE allow-list and a network policy that admits the PACS alone (docs/security.md)",
    )
    dimse_ae_title: str = Field(
        default="BAYESCXR", description="The listener's AE title; an association calling another title is rejected"
    )
    dimse_allowed_ae: list[str] = Field(
        default_factory=list,
        description="Calling AE titles the listener accepts (CXR_DIMSE_ALLOWED_AE='[\"ORTHANC\"]'); empty: any",
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    warmup: bool = True
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
        description="Raise glibc's malloc mmap/trim thresholds at start-up (bayesnet.tune_allocator): about 1.6-2x "
        "faster CPU inference; off leaves the allocator as the environment configured it",
    )

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
            raise ValueError("admin_api_keys and api_keys must not share a key")
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
        raise ValueError(f"{value!r} is not a DICOM AE title (1 to 16 printable ASCII characters, no backslash)")
    return title
