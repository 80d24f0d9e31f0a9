"""The archive's results as a table a data team can query: Parquet (pyarrow), one row per film, beside the JSON lines.

Written from the (merged) JSON-lines output when a run or ``--merge`` ends, all at once (a temporary file renamed
into place), so a reader never sees half a table; the JSON lines stay the record the run resumes from. Columns:

* ``path``, ``ok``, ``error_type``, ``error_detail``: every film, scored or not;
* ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``: the inventory's UIDs for a PACS film
  (``--dicomweb``), null for files;
* ``request_id``, ``model_name``, ``model_version``, ``model_sha256``, ``mc_samples``;
* ``refer``, ``referral_reasons`` (list), ``population_flags`` (list), ``population_verified``,
  ``decisions_withheld`` (list), ``uncertain``;
* ``ood_score``, ``ood_threshold``, ``ood_in_distribution`` (null without a gate);
* one struct column per CheXpert finding, named by its label: ``conf``, ``std``, ``interval_low``,
  ``interval_high``, ``decision``, ``clear_below``, ``positive_at`` (the rule's thresholds), null for a finding
  the model does not report or a film not scored.

For example with DuckDB: ``SELECT avg("Pleural Effusion".conf) FROM 'results.parquet' WHERE ok``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from bayesnet.labels import CHEXPERT_LABELS
from service.archive.results import complete_lines

__all__ = ["FINDING_FIELDS", "parquet_path", "results_schema", "write_parquet"]

FINDING_FIELDS: Final = (
    ("conf", pa.float64()),
    ("std", pa.float64()),
    ("interval_low", pa.float64()),
    ("interval_high", pa.float64()),
    ("decision", pa.string()),
    ("clear_below", pa.float64()),
    ("positive_at", pa.float64()),
)
_UID_KEY = re.compile(r"^[0-9.]+/[0-9.]+/[0-9.]+$")


def results_schema() -> pa.Schema:
    finding = pa.struct([pa.field(name, kind) for name, kind in FINDING_FIELDS])
    strings = pa.list_(pa.string())
    return pa.schema(
        [
            ("path", pa.string()),
            ("ok", pa.bool_()),
            ("error_type", pa.string()),
            ("error_detail", pa.string()),
            ("study_instance_uid", pa.string()),
            ("series_instance_uid", pa.string()),
            ("sop_instance_uid", pa.string()),
            ("request_id", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("model_sha256", pa.string()),
            ("mc_samples", pa.int32()),
            ("refer", pa.bool_()),
            ("referral_reasons", strings),
            ("population_flags", strings),
            ("population_verified", pa.bool_()),
            ("decisions_withheld", strings),
            ("uncertain", pa.bool_()),
            ("ood_score", pa.float64()),
            ("ood_threshold", pa.float64()),
            ("ood_in_distribution", pa.bool_()),
            *((label, finding) for label in CHEXPERT_LABELS),
        ]
    )


def parquet_path(out: Path) -> Path:
    """Where the table of ``out`` goes: ``results.parquet`` beside ``results.jsonl``."""
    return out.with_suffix(".parquet")


def _row(line: dict[str, Any]) -> dict[str, Any]:
    key = str(line["path"])
    uids = key.split("/") if _UID_KEY.match(key) else [None, None, None]
    row: dict[str, Any] = {
        "path": key,
        "ok": bool(line.get("ok")),
        "study_instance_uid": uids[0],
        "series_instance_uid": uids[1],
        "sop_instance_uid": uids[2],
    }
    error = line.get("error")
    if error is not None:
        row.update(error_type=error.get("type"), error_detail=error.get("detail"))
    result = line.get("result")
    if result is None:
        return row
    model, referral, ood = result["model"], result["referral"], result.get("ood")
    row.update(
        request_id=result["request_id"],
        model_name=model["name"],
        model_version=model["version"],
        model_sha256=model["sha256"],
        mc_samples=result["mc_samples"],
        refer=referral["refer"],
        referral_reasons=referral["reasons"],
        population_flags=referral.get("population", []),
        population_verified=referral.get("population_verified"),
        decisions_withheld=result.get("decisions_withheld", []),
        uncertain=result["uncertain"],
    )
    if ood is not None:
        row.update(ood_score=ood["score"], ood_threshold=ood["threshold"], ood_in_distribution=ood["in_distribution"])
    for label, finding in result["predictions"].items():
        low, high = finding["interval"]
        row[label] = {
            "conf": finding["conf"],
            "std": finding["std"],
            "interval_low": low,
            "interval_high": high,
            "decision": finding["decision"],
            "clear_below": finding.get("clear_below"),
            "positive_at": finding.get("positive_at"),
        }
    return row


def _batches(results: Path, schema: pa.Schema, rows_per_group: int) -> Iterator[pa.RecordBatch]:
    rows: list[dict[str, Any]] = []
    for _, text in complete_lines(results):
        rows.append(_row(json.loads(text)))
        if len(rows) >= rows_per_group:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


def write_parquet(results: Path, target: Path | None = None, *, rows_per_group: int = 10_000) -> tuple[Path, int]:
    """The table of the JSON-lines ``results`` at ``target`` (default :func:`parquet_path`), written all at once,
    streaming ``rows_per_group`` films at a time (heatmaps make lines large); ``(path, rows)``."""
    target = target or parquet_path(results)
    schema = results_schema()
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    rows = 0
    with pq.ParquetWriter(staging, schema, compression="zstd") as writer:
        for batch in _batches(results, schema, rows_per_group) if results.exists() else iter(()):
            writer.write_batch(batch)
            rows += batch.num_rows
    staging.replace(target)
    return target, rows
