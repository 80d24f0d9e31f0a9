"""Service settings: one validated object, read once at start-up and passed to ``create_app(settings)``.

Every field can be set by an environment variable with the ``CXR_`` prefix (``CXR_MC_SAMPLES=30``); the groups'
fields by the group's name too (``settings.audit.url`` is ``CXR_AUDIT_URL``). List settings take a JSON list or
comma-separated values (``CXR_API_KEYS=k1,k2`` or ``CXR_API_KEYS='["k1","k2"]'``). Tests build their own
``Settings(...)`` (a group as a mapping: ``Settings(audit={"url": ...})``); nothing reads the environment at import
time. Entry points call :func:`load_settings`, whose :class:`InvalidSettingsError` says in one line which variable
is wrong, what it was given (only the length of a secret) and what it expects. ``python -m service.settings
--output docs/settings.md`` renders the reference from the field descriptions, which say what a setting does and
why (measured figures belong in docs/benchmarks.md).
"""

from __future__ import annotations

from service.settings.groups import (
    GROUPS,
    AuditSettings,
    DicomwebSettings,
    DimseSettings,
    GuaranteeSettings,
    PacsSettings,
    default_state_dir,
)
from service.settings.loading import (
    InvalidSettingsError,
    env_name,
    load_gunicorn_settings,
    load_settings,
    setting_fields,
    variable_names,
)
from service.settings.model import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MODEL_DIR,
    REPO_ROOT,
    GunicornSettings,
    Settings,
)

__all__ = [
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MODEL_DIR",
    "GROUPS",
    "REPO_ROOT",
    "AuditSettings",
    "DicomwebSettings",
    "DimseSettings",
    "GuaranteeSettings",
    "GunicornSettings",
    "InvalidSettingsError",
    "PacsSettings",
    "Settings",
    "default_state_dir",
    "env_name",
    "load_gunicorn_settings",
    "load_settings",
    "setting_fields",
    "variable_names",
]
