"""docs/settings.md, generated from the settings models (``python -m service.settings``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from service.settings.loading import env_name, is_secret, setting_fields, without_none
from service.settings.model import REPO_ROOT, GunicornSettings

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
    ("Security and keys", ("api_keys", "admin_api_keys", "outcome_api_keys", "cors_origins")),
    (
        "Radiologists' verdicts and the guarantee in operation",
        (
            "outcome_code_map",
            "guarantee.mode",
            "guarantee.min_coverage",
            "guarantee.min_cleared",
            "guarantee.verdict_delay_h",
            "guarantee.drift_every_s",
            "guarantee.drift_window_h",
            "guarantee.drift_reference_h",
            "guarantee.refresh_s",
        ),
    ),
    ("Out-of-distribution gate", ("ood_action",)),
    (
        "Reading a PACS archive (python -m service.archive --dicomweb)",
        (
            "pacs.token",
            "pacs.username",
            "pacs.password",
            "pacs.concurrency",
            "pacs.rate_per_s",
            "pacs.retries",
            "pacs.retry_initial_s",
            "pacs.retry_max_s",
            "pacs.timeout_s",
        ),
    ),
    (
        "Audit trail",
        (
            "audit.url",
            "audit.policy",
            "audit.sqlite_synchronous",
            "audit.spool_dir",
            "audit.spool_max_records",
            "audit.retention_days",
            "audit.group_commit_ms",
            "audit.rolling_window",
        ),
    ),
    (
        "DICOMweb forwarding",
        (
            "dicomweb.forward_url",
            "dicomweb.outbox_dir",
            "dicomweb.outbox_max_instances",
            "dicomweb.retry_initial_s",
            "dicomweb.retry_max_s",
        ),
    ),
    (
        "DICOM (DIMSE) listener",
        (
            "dimse.port",
            "dimse.host",
            "dimse.ae_title",
            "dimse.allowed_ae",
            "dimse.max_associations",
            "dimse.idle_timeout_s",
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

The audit trail, DICOMweb forwarding and the DIMSE listener are groups of settings (`settings.audit.url` in
code); their variables keep the group's name (`CXR_AUDIT_URL`). Gunicorn's configuration,
`docker/gunicorn.conf.py`, validates a few variables of its own, listed in the last section.
Before torch loads, `python -m service` and Gunicorn's workers also set libgomp's `GOMP_SPINCOUNT` (how long an
idle OpenMP thread spins), unless `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` is already set: the reasons are in
[benchmarks.md](benchmarks.md).

This page is generated from the model's field descriptions: change a description in `service/settings/`, then
run `{REGENERATE_COMMAND}`. Measured figures behind the defaults are in
[benchmarks.md](benchmarks.md), not here.
"""


_GUNICORN_INTRO = """
## Gunicorn (docker/gunicorn.conf.py)

Read by the Gunicorn arbiter (`service.settings.GunicornSettings`), which also validates the settings above
before it forks a worker; `CXR_BIND` takes the place of `CXR_HOST` and `CXR_PORT`.
"""


def settings_reference() -> str:
    """docs/settings.md: every setting's variable, type, default and description, in the sections of
    :data:`REFERENCE_SECTIONS`, then Gunicorn's. Raises ``ValueError`` when a field has no section or no
    description."""
    fields = setting_fields()
    placed = [name for _, names in REFERENCE_SECTIONS for name in names]
    unplaced = [name for name in fields if name not in placed]
    unknown = [name for name in placed if name not in fields]
    repeated = sorted({name for name in placed if placed.count(name) > 1})
    undescribed = [name for name, info in fields.items() if not (info.description or "").strip()]
    if unplaced or unknown or repeated or undescribed:
        raise ValueError(
            f"settings reference: fields without a section {unplaced}, unknown {unknown}, in two sections "
            f"{repeated}, without a description {undescribed} (service/settings/reference.py REFERENCE_SECTIONS, Field)"
        )
    parts = [_REFERENCE_INTRO]
    for title, names in REFERENCE_SECTIONS:
        rows = [_reference_row(name, fields[name]) for name in names]
        parts.append(
            f"\n## {title}\n\n| Variable | Type | Default | Description |\n|---|---|---|---|\n" + "".join(rows)
        )
    rows = [_reference_row(name, info) for name, info in GunicornSettings.model_fields.items()]
    parts.append(_GUNICORN_INTRO + "\n| Variable | Type | Default | Description |\n|---|---|---|---|\n" + "".join(rows))
    return "".join(parts)


def _reference_row(name: str, info: FieldInfo) -> str:
    cells = (f"`{env_name(name)}`", _reference_type(name, info), _reference_default(name, info), info.description)
    return "| " + " | ".join(str(cell).strip().replace("|", "\\|") for cell in cells) + " |\n"


def _reference_type(name: str, info: FieldInfo) -> str:
    """The form a field takes, in a few words: ``int, 1 to 100``, ``one of: flag, reject``, ``list of secrets``."""
    annotation = without_none(info.annotation)
    if get_origin(annotation) is Literal:
        return "one of: " + ", ".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list{' of secrets' if is_secret(name, info) else ''} (JSON or comma-separated)"
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
        return "empty" if get_origin(without_none(info.annotation)) is list else "see description"
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
