"""A PACS archive as the archive scorer's input: an inventory by QIDO-RS first, then each instance by WADO-RS.

``python -m service.archive --dicomweb URL`` does not list storage while it runs (a PACS has no cheap "list
everything"): it asks the PACS once for the instances the query names (modality, body part, study dates,
accession numbers; instance-level QIDO-RS, page by page) and writes the answer as an **inventory** CSV (study,
series and SOP Instance UIDs, and why an instance is skipped; nothing else from the header) before the first film
is fetched. The inventory drives the run: the shards of a sharded run (torchrun ranks, Kubernetes Indexed Job
pods) are slices of it, and a rerun reuses it, so it resumes the same films in the same order.

Skipped instances are counted by reason and never fetched: ``multi_frame`` (Number of Frames above 1), and the
service's intended-population checks on the header values QIDO returns (``bayesnet.imaging.population_flags``:
``lateral_or_oblique_view``, ``non_chest_body_part``, ``paediatric``; Patient's Age is read for that and not kept).

Each instance is fetched when the scorer's decode pool reaches it (``WadoInstance.read_bytes``), through one
:class:`WadoFetcher`: at most ``concurrency`` requests at once and at most ``rate_per_s`` started per second (what a
PACS administrator allows), each retried with exponential backoff on a connection error, a timeout, a 5xx, 408 or
429. A 4xx for one instance is that film's error line (:class:`InstanceUnavailableError`) and the run goes on. When the
retries for one instance are spent the PACS is taken as down: :class:`PacsUnavailableError` stops the run (the
command exits 4), the films already written stay, and a rerun resumes after them.

Authentication (bearer token, or user and password) and the limits come from settings (``CXR_PACS_*``,
``service.settings.PacsSettings``), never from the command line.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from bayesnet.imaging.decoded import population_flags
from service.settings import PacsSettings

__all__ = [
    "INVENTORY_COLUMNS",
    "ArchiveQuery",
    "InstanceUnavailableError",
    "InventoryRow",
    "PacsUnavailableError",
    "WadoFetcher",
    "WadoInstance",
    "build_inventory",
    "open_client",
    "open_fetcher",
    "read_inventory",
    "skipped_by_reason",
    "write_inventory",
]

log = logging.getLogger("service.archive")

INVENTORY_COLUMNS: Final = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "skip_reason")
MULTI_FRAME: Final = "multi_frame"
#: Header values asked of QIDO-RS besides the UIDs: what the skip reasons are decided on.
QIDO_FIELDS: Final = ("Modality", "BodyPartExamined", "ViewPosition", "NumberOfFrames", "PatientAge")
#: HTTP statuses worth another try: the PACS is busy or briefly away, not refusing this instance.
RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})


class PacsUnavailableError(RuntimeError):
    """The PACS did not answer after every retry: the run stops; a rerun resumes after the films written."""


class InstanceUnavailableError(OSError):
    """The PACS refused one instance (a 4xx, or not DICOM): that film's error line; the run goes on."""


@dataclass(frozen=True)
class ArchiveQuery:
    """Which instances to inventory: QIDO-RS matching keys, ANDed; one search per modality and accession number."""

    modalities: tuple[str, ...] = ("CR", "DX")
    #: Body Part Examined to match (QIDO matching: exact, or with * wildcards); None: any.
    body_part: str | None = None
    #: Study Date as a DICOM range ("20260101-20261231", "20260101-", "-20261231") or one date; None: any.
    study_dates: str | None = None
    accession_numbers: tuple[str, ...] = ()

    def searches(self) -> Iterator[dict[str, str]]:
        for modality in self.modalities:
            for accession in self.accession_numbers or (None,):
                filters = {"Modality": modality}
                if self.body_part:
                    filters["BodyPartExamined"] = self.body_part
                if self.study_dates:
                    filters["StudyDate"] = self.study_dates
                if accession:
                    filters["AccessionNumber"] = accession
                yield filters


@dataclass(frozen=True)
class InventoryRow:
    study: str
    series: str
    sop: str
    #: Why the instance is not scored (``multi_frame``, a population flag), or None.
    skip: str | None = None

    @property
    def key(self) -> str:
        """The film's key in the output (its ``path``): the three UIDs, as a WADO-RS path would name them."""
        return f"{self.study}/{self.series}/{self.sop}"


#: DICOM JSON tags (PS3.18 F.2) of the values read from a QIDO-RS answer.
TAGS: Final = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "NumberOfFrames": "00280008",
    "BodyPartExamined": "00180015",
    "ViewPosition": "00185101",
    "PatientAge": "00101010",
}


def _value(answer: dict[str, Any], keyword: str) -> str | None:
    """A QIDO-RS answer's first value of ``keyword`` as text, read from the DICOM JSON as the PACS wrote it (a PACS
    may send values a strict reader refuses, such as an age without its unit; a value that says nothing counts as
    absent)."""
    values = answer.get(TAGS[keyword], {}).get("Value") or []
    if not values or values[0] is None:
        return None
    text = str(values[0]).strip()
    return text or None


def _skip_reason(answer: dict[str, Any]) -> str | None:
    frames = _value(answer, "NumberOfFrames")
    if frames is not None and frames.isdigit() and int(frames) > 1:
        return MULTI_FRAME
    flags = population_flags(
        body_part=_value(answer, "BodyPartExamined"),
        view_position=_value(answer, "ViewPosition"),
        age=_value(answer, "PatientAge"),
    )
    return flags[0] if flags else None


def build_inventory(client: DICOMwebClient, query: ArchiveQuery, *, page: int = 1000) -> list[InventoryRow]:
    """Every instance the query names, once, in the order the PACS returned them, each with its skip reason."""
    rows: dict[str, InventoryRow] = {}
    for filters in query.searches():
        offset = 0
        while True:
            found = client.search_for_instances(
                search_filters=filters, fields=list(QIDO_FIELDS), limit=page, offset=offset
            )
            for answer in found:
                sop = _value(answer, "SOPInstanceUID")
                study, series = _value(answer, "StudyInstanceUID"), _value(answer, "SeriesInstanceUID")
                if sop is None or study is None or series is None or sop in rows:
                    continue
                rows[sop] = InventoryRow(study, series, sop, _skip_reason(answer))
            if len(found) < page:
                break
            offset += len(found)
    return list(rows.values())


def write_inventory(rows: Sequence[InventoryRow], path: Path) -> None:
    """Write the inventory all at once (a temporary file renamed into place): a crash leaves none or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(INVENTORY_COLUMNS)
        writer.writerows((r.study, r.series, r.sop, r.skip or "") for r in rows)
    staging.replace(path)


def read_inventory(path: Path) -> list[InventoryRow]:
    """An inventory written by :func:`write_inventory`; ValueError when the file is not one."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != INVENTORY_COLUMNS:
            raise ValueError(f"{path} is not an inventory (its header must be {','.join(INVENTORY_COLUMNS)})")
        rows = []
        for number, fields in enumerate(reader, start=2):
            if len(fields) != len(INVENTORY_COLUMNS) or not all(fields[:3]):
                raise ValueError(f"{path}, line {number}: expected three UIDs and a skip reason")
            rows.append(InventoryRow(fields[0], fields[1], fields[2], fields[3] or None))
    return rows


def skipped_by_reason(rows: Sequence[InventoryRow]) -> dict[str, int]:
    return dict(sorted(Counter(r.skip for r in rows if r.skip is not None).items()))


class _RateLimit:
    """At most ``per_second`` starts a second, spread evenly (0: no limit); thread-safe."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class WadoFetcher:
    """Instances by WADO-RS as DICOM file bytes, within the PACS's limits (see the module)."""

    def __init__(
        self,
        client: DICOMwebClient,
        *,
        concurrency: int = 4,
        rate_per_s: float = 0.0,
        retries: int = 5,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.slots = threading.BoundedSemaphore(concurrency)
        self.rate = _RateLimit(rate_per_s)
        self.retries, self.retry_initial_s, self.retry_max_s = retries, retry_initial_s, retry_max_s
        self.sleep = sleep
        self.down: PacsUnavailableError | None = None  # once set, every fetch fails at once

    def fetch(self, row: InventoryRow) -> bytes:
        problem: Exception | None = None
        for attempt in range(self.retries + 1):
            if self.down is not None:
                raise self.down
            if attempt:
                self.sleep(min(self.retry_max_s, self.retry_initial_s * 2 ** (attempt - 1)))
            with self.slots:
                self.rate.wait()
                try:
                    dataset = self.client.retrieve_instance(row.study, row.series, row.sop)
                except requests.HTTPError as err:
                    status = err.response.status_code if err.response is not None else None
                    if status not in RETRYABLE_STATUSES:
                        raise InstanceUnavailableError(f"the PACS answered {status} for this instance") from err
                    problem = err
                    continue
                except (requests.ConnectionError, requests.Timeout) as err:
                    problem = err
                    continue
            return _file_bytes(dataset)
        self.down = PacsUnavailableError(
            f"the PACS did not answer after {self.retries + 1} attempts ({type(problem).__name__}: "
            f"{str(problem)[:200]}); rerun the same command to resume"
        )
        raise self.down


def _file_bytes(dataset: pydicom.Dataset) -> bytes:
    """The retrieved instance as a DICOM file (what the decoder reads), with its file meta information."""
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    except (ValueError, AttributeError) as err:
        raise InstanceUnavailableError(f"the PACS sent an instance that cannot be written as DICOM ({err})") from err
    return buffer.getvalue()


@dataclass(frozen=True)
class WadoInstance:
    """What ``ScoreItem.file`` is for a PACS film: its bytes, fetched when the decode pool asks."""

    fetcher: WadoFetcher
    row: InventoryRow

    def read_bytes(self) -> bytes:
        return self.fetcher.fetch(self.row)

    def __str__(self) -> str:
        return self.row.key


def open_client(url: str, pacs: PacsSettings) -> DICOMwebClient:
    """A DICOMweb client of ``url`` authenticated as the settings say (bearer token, or user and password)."""
    session = requests.Session()
    if pacs.username is not None and pacs.password is not None:
        session.auth = (pacs.username, pacs.password.get_secret_value())
    headers = {"Authorization": f"Bearer {pacs.token.get_secret_value()}"} if pacs.token is not None else None
    client = DICOMwebClient(url, session=session, headers=headers, timeout=pacs.timeout_s)
    # dicomweb-client retries every failed request itself (5 attempts, waits from 1 s, on any exception): one retry
    # policy only, the one the settings state (WadoFetcher), or a PACS that is down takes minutes per instance.
    client.set_http_retry_params(retry=False)
    return client


def open_fetcher(client: DICOMwebClient, pacs: PacsSettings) -> WadoFetcher:
    return WadoFetcher(
        client,
        concurrency=pacs.concurrency,
        rate_per_s=pacs.rate_per_s,
        retries=pacs.retries,
        retry_initial_s=pacs.retry_initial_s,
        retry_max_s=pacs.retry_max_s,
    )
