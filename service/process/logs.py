"""Structured logging: one JSON object per line, for a hospital's log pipeline.

Fields: time (UTC ISO 8601), level, logger, message, and the request context the access log adds
(request_id, route, method, status, latency_ms, batch_size, error_type). Never patient data: nothing
from DICOM headers is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_CONTEXT_FIELDS = ("request_id", "route", "method", "status", "latency_ms", "batch_size", "error_type")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, *, json_lines: bool = True) -> None:
    """Route the service's loggers (and uvicorn's) to stdout, JSON lines unless told otherwise."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    for name in ("service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # The access log is ours (service.access, with the request id); uvicorn's duplicate is muted.
    logging.getLogger("uvicorn.access").disabled = True
