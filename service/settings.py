"""Service settings: one validated object, read once at start-up and passed to ``create_app(settings)``.

Every field can be set by an environment variable with the ``CXR_`` prefix (``CXR_MC_SAMPLES=30``,
``CXR_API_KEYS='["k1","k2"]'``, ``CXR_CORS_ORIGINS='["https://pacs.example.org"]'``). Tests build their
own ``Settings(...)``; nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads; None: torch default")
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

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty key would let a request without any key in (b"" == b""), and HTTP strips the spaces
        # around header values, so a key with them could never match: refuse both at start-up.
        for index, key in enumerate(value):
            secret = key.get_secret_value()
            if not secret or secret != secret.strip():
                raise ValueError(f"api_keys[{index}] is empty or has surrounding whitespace")
        return value
