"""What the archive scorer scores: the files ``--input`` names, each under the key its output line carries.

``--input`` is one of
  * a directory, walked recursively (hidden entries skipped). A file is scored when its name ends in
    .png/.jpg/.jpeg/.dcm/.dicom (any case), has no suffix (DICOM archives often have none), or its first
    bytes are a PNG, JPEG or DICOM signature. The decoder then judges the content, never the name: a
    ``.png`` holding text becomes an error line. Other files (``README.txt``, ``labels.csv``) are skipped
    and counted. The key is the file's path relative to the directory.
  * a ``.csv`` with a ``Path`` column (CheXpert layout): paths relative to the parent of the CSV's folder,
    as ``train.data.load_chexpert`` reads them; the key is the value as written. Its ``Age`` (years) and
    ``Frontal/Lateral`` + ``AP/PA`` columns, where present, are the film's declared patient age and view, as a
    client declares them with ``patient_age`` and ``view`` over HTTP: a PNG carries no header, so without them a
    film's population cannot be verified and the film is referred. A cell that is not an age or a view declares
    nothing (counted in one warning).
  * any other file: a list of paths, one per line (blank lines and ``#`` comments ignored), relative to
    the list's folder unless absolute; the key is the line as written.

The key also names the film's ``request_id`` (``request_id_for``), so a rerun names a film the same way.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bayesnet import sniff_format
from bayesnet.population import DECLARED_VIEWS, Declared

__all__ = ["IMAGE_SUFFIXES", "BatchInputError", "ScoreItem", "list_inputs", "request_id_for"]

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line

#: File names scored when walking a directory (besides suffix-less files and content-sniffed images).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
#: Enough leading bytes for every signature ``sniff_format`` knows (DICOM's ``DICM`` sits at byte 128).
SNIFF_BYTES = 132
PATH_COLUMN = "Path"
#: CheXpert's columns for what a client would declare about a film.
AGE_COLUMN, FRONTAL_COLUMN, VIEW_COLUMN = "Age", "Frontal/Lateral", "AP/PA"


class BatchInputError(ValueError):
    """The command cannot start on what it was given.

    ``--input`` is neither a directory, a CSV with a Path column, nor a list of paths; or ``--batch-size``,
    ``--cams`` or torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` is invalid. The command exits with 2.
    """


class Readable(Protocol):
    """Where a film's bytes come from: a ``Path``, or a PACS instance (``service.archive.dicomweb.WadoInstance``)."""

    def read_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class ScoreItem:
    """One film to score: ``key`` is what the output's ``path`` says, ``file`` where the bytes are."""

    key: str
    file: Readable
    #: The patient age and view the input declares for the film (a CSV's columns), None when it declares nothing.
    declared: Declared | None = None


def _is_candidate(file: Path) -> bool:
    if file.suffix.lower() in IMAGE_SUFFIXES or file.suffix == "":
        return True
    try:
        with file.open("rb") as handle:
            return sniff_format(handle.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def _scan_directory(root: Path) -> list[ScoreItem]:
    items, skipped = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            file = Path(folder) / name
            if name.startswith(".") or not file.is_file():
                continue
            if _is_candidate(file):
                items.append(ScoreItem(file.relative_to(root).as_posix(), file))
            else:
                skipped += 1
    if skipped:
        log.info("skipped %d files in %s that are neither named nor sniffed as PNG, JPEG or DICOM", skipped, root)
    return items


def _read_csv(csv_path: Path) -> list[ScoreItem]:
    root = csv_path.resolve().parent.parent
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or PATH_COLUMN not in reader.fieldnames:
            raise BatchInputError(f"{csv_path} has no {PATH_COLUMN!r} column (columns: {reader.fieldnames})")
        rows = [row for row in reader if (row.get(PATH_COLUMN) or "").strip()]
    items, unreadable = [], 0
    for row in rows:
        key = row[PATH_COLUMN].strip()
        declared, bad = _declared(row)
        unreadable += bad
        items.append(ScoreItem(key, root / key, declared))
    if unreadable:
        log.warning("%d rows of %s give an age or view that is not one; they declare none", unreadable, csv_path)
    return items


def _declared(row: dict[str, str | None]) -> tuple[Declared | None, bool]:
    """What a CSV row declares (age in years; view: AP/PA for a frontal film, LATERAL for a lateral one) and
    whether a cell was unreadable."""
    age_text = (row.get(AGE_COLUMN) or "").strip()
    frontal = (row.get(FRONTAL_COLUMN) or "").strip().lower()
    view_text = (row.get(VIEW_COLUMN) or "").strip().upper()
    bad = False
    age: float | None = None
    if age_text:
        try:
            age = float(age_text)
        except ValueError:
            bad = True
        else:
            if not 0.0 <= age <= 150.0:
                age, bad = None, True
    view: str | None = None
    if frontal == "lateral":
        view = "LATERAL"
    elif view_text:
        view, bad = (view_text, bad) if view_text in DECLARED_VIEWS else (None, True)
    return (None if age is None and view is None else Declared(age_years=age, view=view)), bad


def _read_list(list_path: Path) -> list[ScoreItem]:
    base = list_path.resolve().parent
    try:
        lines = list_path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise BatchInputError(
            f"{list_path} is not a text list of paths; pass a directory, a .csv with a Path column or a text list"
        ) from err
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [ScoreItem(key, base / key) for key in keys]


def list_inputs(source: Path) -> list[ScoreItem]:
    """Every file ``source`` names, sorted by key, one per key (see the module docstring for the rules).

    Raises:
        BatchInputError: ``source`` does not exist, is a CSV without a Path column, or a list that is not text.
    """
    if source.is_dir():
        items = _scan_directory(source)
    elif source.is_file():
        items = _read_csv(source) if source.suffix.lower() == ".csv" else _read_list(source)
    else:
        raise BatchInputError(f"--input {source} does not exist")
    unique = {item.key: item for item in reversed(items)}  # the first mention of a key wins
    if len(unique) < len(items):
        log.warning("%d paths are listed more than once in %s; each is scored once", len(items) - len(unique), source)
    return sorted(unique.values(), key=lambda item: item.key)


def request_id_for(key: str) -> str:
    """A deterministic request id per input path (a rerun gives the same film the same id)."""
    return "batch-" + hashlib.sha256(key.encode()).hexdigest()[:24]
