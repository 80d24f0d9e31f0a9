"""The archive scorer's output: one JSON line per input file, appended, and resumable after a crash.

A line is ``{"path": ..., "ok": true, "result": <PredictionResponse>}`` or
``{"path": ..., "ok": false, "error": {"type": ..., "detail": ...}}``; a bad file never stops the run.

Resume: a rerun truncates a torn last line (``repair_torn_tail``: the process died mid-write), skips every
path already present (``done_paths``: results and errors alike) and appends. Lines are flushed once per
batch, so a kill loses at most one batch. A damaged line before the last one is not a crash's doing, so the
run stops (``ResultsFileError``) rather than guess.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from service.schemas import PredictionResponse

__all__ = ["ResultsFileError", "complete_lines", "done_paths", "error_line", "repair_torn_tail", "result_line"]

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line


class ResultsFileError(ValueError):
    """An existing output file has a damaged line before its last one (not a crash's torn tail)."""


def _line(record: dict[str, object]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def result_line(key: str, response: PredictionResponse) -> str:
    """The line of a scored file."""
    return _line({"path": key, "ok": True, "result": response.model_dump(mode="json")})


def error_line(key: str, err: BaseException, detail: str | None = None) -> str:
    """The line of a file that was not scored: the exception's class name and ``detail`` (default its message)."""
    return _line({"path": key, "ok": False, "error": {"type": type(err).__name__, "detail": detail or str(err)}})


def complete_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every newline-terminated line; a torn last line is left out."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n"):
                yield number, raw.decode()


def repair_torn_tail(path: Path, chunk_bytes: int = 1 << 16) -> None:
    """Truncate a last line without its newline (the process died mid-write) so appends start clean.

    Scans backwards in chunks: an output with heatmaps can be gigabytes, and only its tail matters.
    """
    if not path.is_file():
        return
    size = path.stat().st_size
    with path.open("rb+") as handle:
        end = size
        while end > 0:
            start = max(0, end - chunk_bytes)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return
        handle.truncate(end)
    log.warning("%s ended in a torn line (an interrupted run); truncated %d bytes", path, size - end)


def done_paths(path: Path) -> set[str]:
    """The ``path`` of every complete line of an output file (empty when the file does not exist).

    Raises:
        ResultsFileError: a complete line is not a result line; the file is not ours or was damaged.
    """
    if not path.is_file():
        return set()
    done = set()
    for number, text in complete_lines(path):
        try:
            done.add(str(json.loads(text)["path"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ResultsFileError(
                f"{path}:{number} is not a batch result line; move the file away or fix that line"
            ) from err
    return done
