"""The groups of settings nested in :class:`~service.settings.Settings`: the audit trail, DICOMweb forwarding and
the DIMSE listener, each read from the variables that carry the group's name (``CXR_AUDIT_URL`` is ``audit.url``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode


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


def list_from_text(value: object) -> object:
    """A list given as text (an environment variable): a JSON list, or comma-separated values whose surrounding
    spaces are dropped; empty text is the empty list."""
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


class SettingsGroup(BaseModel):
    """Settings of one part of the service, nested in :class:`Settings` under the part's name; each variable is
    ``CXR_`` + the part + the field (``audit.url`` is ``CXR_AUDIT_URL``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class AuditSettings(SettingsGroup):
    """The audit trail (docs/audit.md): ``CXR_AUDIT_*``."""

    url: str = Field(
        default_factory=lambda: f"sqlite:///{default_state_dir() / 'audit.sqlite3'}",
        description="SQLAlchemy URL of the audit trail (docs/audit.md): a SQLite file in WAL mode by default "
        "(~/.local/state/bayesnet-cxr/audit.sqlite3, or under $XDG_STATE_HOME); postgresql+psycopg://user@host/db "
        "in deployment. Migrated to the newest schema at start-up",
    )
    policy: Literal["fail-closed", "buffer"] = Field(
        default="fail-closed",
        description="When the trail cannot be written: fail-closed (predictions answer 503) or buffer (records "
        "go to a bounded on-disk spool, replayed when the database returns; a full spool answers 503)",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="NORMAL",
        description="SQLite audit file only: NORMAL (default) keeps every committed record through a crash of the "
        "service (SIGKILL) but not of the operating system, at no measurable cost; FULL fsyncs each commit so a "
        "record also survives a power cut, at a cost in latency that each answer waits for (bench/audit.py, "
        "docs/audit.md). Deployments that need power-loss durability use PostgreSQL (or FULL)",
    )
    spool_dir: Path | None = Field(
        default=None, description="The buffer policy's spool directory; unset: audit-spool in the state directory"
    )
    spool_max_records: int = Field(default=100_000, ge=1, description="Most records the spool holds")
    retention_days: int | None = Field(
        default=None,
        ge=183,
        description="Delete audit records older than this (hourly, in small transactions); unset: keep them. At "
        "least 183 days: the EU AI Act (Art. 19, 26) asks for at least six months",
    )
    group_commit_ms: float = Field(
        default=3.0,
        ge=0,
        le=100,
        description="Under load, the audit writer holds a transaction open up to this long while answers are "
        "being finished, so that the answers of one inference batch share one commit (the answers wait for it); "
        "a lone request never waits. 0: commit whatever is queued at once (docs/benchmarks.md)",
    )
    rolling_window: int = Field(
        default=1000, ge=10, description="Predictions behind the rolling referral/OOD/label rates in /metrics"
    )

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or default_state_dir() / "audit-spool"


class DicomwebSettings(SettingsGroup):
    """Forwarding results to a PACS over DICOMweb (docs/dicom.md): ``CXR_DICOMWEB_*``."""

    forward_url: str | None = Field(
        default=None,
        description="DICOMweb base URL of the PACS that receives the SR of every instance sent to POST "
        "/dicomweb/studies (STOW-RS, e.g. http://pacs:8042/dicom-web); unset: results are not forwarded "
        "(docs/dicom.md)",
    )
    outbox_dir: Path | None = Field(
        default=None,
        description="Where SRs wait for the PACS (persistent); unset: dicomweb-outbox in the state directory",
    )
    outbox_max_instances: int = Field(
        default=10_000, ge=1, description="Most SRs the outbox holds; beyond, STOW-RS instances fail (Out of Resources)"
    )
    retry_initial_s: float = Field(
        default=1.0, gt=0, description="First wait after a failed store to the PACS; doubles on each failure"
    )
    retry_max_s: float = Field(default=60.0, gt=0, description="Longest wait between two store attempts")

    @property
    def outbox_path(self) -> Path:
        return self.outbox_dir or default_state_dir() / "dicomweb-outbox"


class DimseSettings(SettingsGroup):
    """The DICOM (DIMSE) C-STORE listener (docs/dicom.md): ``CXR_DIMSE_*``."""

    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="TCP port of the DICOM (DIMSE) C-STORE/C-ECHO listener that scores what a PACS or modality "
        "pushes, like POST /dicomweb/studies (docs/dicom.md); unset: no listener",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the DIMSE listener binds. The port is unauthenticated DICOM: 0.0.0.0 only with a "
        "calling AE allow-list and a network policy that admits the PACS alone (docs/security.md)",
    )
    ae_title: str = Field(
        default="BAYESCXR", description="The listener's AE title; an association calling another title is rejected"
    )
    allowed_ae: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles the listener accepts (CXR_DIMSE_ALLOWED_AE=ORTHANC,PACS2); empty: any",
    )
    max_associations: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most simultaneous DIMSE associations; each holds at most one instance (max_upload_bytes) in "
        "memory while it is scored",
    )
    idle_timeout_s: float = Field(
        default=60.0, gt=0, description="An association that sends nothing for this long is aborted"
    )

    @field_validator("allowed_ae", mode="before")
    @classmethod
    def _allowed_from_text(cls, value: object) -> object:
        return list_from_text(value)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _valid_ae_title(value)

    @field_validator("allowed_ae")
    @classmethod
    def _ae_titles(cls, value: list[str]) -> list[str]:
        return [_valid_ae_title(title) for title in value]


class PacsSettings(SettingsGroup):
    """Reading a PACS archive over DICOMweb (``python -m service.archive --dicomweb URL``, docs/operations.md):
    ``CXR_PACS_*``. What the PACS administrator allows, and the credentials, never on the command line."""

    token: SecretStr | None = Field(
        default=None, description="Bearer token sent with every QIDO-RS and WADO-RS request; unset: none"
    )
    username: str | None = Field(default=None, description="HTTP basic authentication user (with password)")
    password: SecretStr | None = Field(default=None, description="HTTP basic authentication password")
    concurrency: int = Field(default=4, ge=1, le=64, description="Most WADO-RS requests in flight at once")
    rate_per_s: float = Field(
        default=0.0, ge=0.0, description="Most WADO-RS requests started per second, spread evenly; 0: no limit"
    )
    retries: int = Field(
        default=5,
        ge=0,
        le=20,
        description="Further attempts at an instance after a connection error, a timeout, 408, 429 or a 5xx; when "
        "they are spent the PACS is taken as down and the run stops (exit 4; a rerun resumes)",
    )
    retry_initial_s: float = Field(default=1.0, gt=0, description="First wait before a retry; it doubles each time")
    retry_max_s: float = Field(default=30.0, gt=0, description="Longest wait between two attempts")
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one DICOMweb request")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> PacsSettings:
        if self.token is not None and (self.username or self.password):
            raise ValueError("give a bearer token or a user and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("a user needs a password, and a password a user")
        return self


#: The groups of :class:`Settings`: attribute name -> model.
class GuaranteeSettings(SettingsGroup):
    """The referral rule's guarantee in operation (docs/guarantee.md): ``CXR_GUARANTEE_*``."""

    mode: Literal["shadow", "supervised", "autonomous"] = Field(
        default="autonomous",
        description="Deployment mode of the referral rule (docs/guarantee.md): shadow (every film referred; what the "
        "rule would clear is recorded and checked against verdicts), supervised (cleared films marked cleared but "
        "still read; verdicts expected for them), autonomous (cleared films not sent for reading). A new site "
        "starts in shadow. Applied at start-up and recorded in the audit trail; a suspension survives it",
    )
    min_coverage: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="In supervised mode, the rule is suspended when fewer than this fraction of the films it "
        "cleared (and that are older than verdict_delay_h) have a radiologist's verdict",
    )
    min_cleared: int = Field(
        default=50,
        ge=1,
        description="The coverage check waits until the rule has cleared this many films older than verdict_delay_h",
    )
    verdict_delay_h: float = Field(
        default=72.0,
        ge=0.0,
        description="How long a verdict may take to arrive: younger cleared films do not count against coverage",
    )
    drift_every_s: float = Field(
        default=3600.0,
        ge=0.0,
        description="How often the service runs the input drift check (python -m service.monitor's, on its own "
        "trail: the last drift_window_h against the drift_reference_h before) and suspends the rule on an alert; "
        "0: never (run the monitor from cron instead)",
    )
    drift_window_h: float = Field(default=168.0, gt=0, description="The drift check's current window (7 days)")
    drift_reference_h: float = Field(
        default=720.0, gt=0, description="The drift check's reference window, just before the current one (30 days)"
    )
    refresh_s: float = Field(
        default=60.0,
        gt=0,
        description="How often the service recomputes the guarantee watch from the audit trail (also at once after "
        "verdicts arrive); GET /v1/model and /metrics show the latest",
    )


GROUPS: dict[str, type[SettingsGroup]] = {
    "audit": AuditSettings,
    "dicomweb": DicomwebSettings,
    "dimse": DimseSettings,
    "guarantee": GuaranteeSettings,
    "pacs": PacsSettings,
}
