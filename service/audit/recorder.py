"""The event-loop side of the audit trail: build one record per image a prediction route handles, hand it to
the writer, and (for the answer) wait until it is durable; keep the rolling output rates /metrics shows.

Routes wrap each prediction in :meth:`Auditor.audited`; nothing else in the request path knows about the audit.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from bayesnet import ImageFacts, sniff_format
from service.audit.uids import dicom_uid_digests
from service.audit.writer import AuditWriter
from service.errors import AuditUnavailableError, OutOfDistributionError
from service.problems import problem_for
from service.schemas import AuditFindingRecord, AuditRecord, ModelRef, PredictionResponse

T = TypeVar("T")

_FORMATS = ("png", "jpeg", "dicom")


def client_id_for(api_key: str) -> str:
    """The id the audit trail keeps for an API key: ``key-`` + the first 12 hex digits of its sha256.

    Stable across restarts, different per key, and never the key itself (keys must be long random strings:
    a short prefix of the hash of a guessable key could be brute-forced)."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class RollingRates:
    """Rates over the last ``window`` answered predictions: referral, OOD flag, per-label positive rate and mean
    confidence (the CheXstray idea: watch the outputs, no labels needed). O(labels) per prediction."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._items: deque[tuple[bool, bool, dict[str, tuple[bool, float]]]] = deque()
        self.referred = 0
        self.ood = 0
        self.positives: dict[str, int] = {}
        self.conf_sum: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _apply(self, item: tuple[bool, bool, dict[str, tuple[bool, float]]], sign: int) -> None:
        referred, ood, findings = item
        self.referred += sign * referred
        self.ood += sign * ood
        for label, (positive, conf) in findings.items():
            self.positives[label] = self.positives.get(label, 0) + sign * positive
            self.conf_sum[label] = self.conf_sum.get(label, 0.0) + sign * conf
            self.counts[label] = self.counts.get(label, 0) + sign

    def add(self, record: AuditRecord) -> None:
        item = (
            record.referral is not None and record.referral.refer,
            record.ood is not None and not record.ood.in_distribution,
            {label: (f.decision == "positive", f.conf) for label, f in record.findings.items()},
        )
        self._items.append(item)
        self._apply(item, +1)
        if len(self._items) > self.window:
            self._apply(self._items.popleft(), -1)

    @property
    def size(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class AuditSubject:
    """Who and what a record is about, known before the prediction runs."""

    route: str
    request_id: str
    client_id: str | None
    model: ModelRef
    item_index: int | None = None


class Auditor:
    def __init__(self, writer: AuditWriter, *, rolling_window: int, durable_timeout_s: float = 60.0) -> None:
        self.writer = writer
        self.rolling = RollingRates(rolling_window)
        self.durable_timeout_s = durable_timeout_s

    async def audited(self, subject: AuditSubject, data: bytes, prediction: Awaitable[T]) -> T:
        """Run ``prediction`` (whose result is ``PredictionResponse`` or ``(PredictionResponse, ...)``), record
        its outcome, and return it once the record is durable; raise ``AuditUnavailableError`` (503) if it
        cannot be. A refusal is recorded too, and re-raised once its record is durable.

        The upload's sha256 (and a DICOM upload's UID digests) is taken beside the prediction, in a thread of its
        own, so it costs the answer no latency."""
        occurred_at = datetime.now(timezone.utc)
        started = time.perf_counter()
        digest = asyncio.ensure_future(asyncio.to_thread(_fingerprint, data))
        base: dict[str, Any] = {
            "event_id": uuid.uuid4().hex,
            "request_id": subject.request_id,
            "item_index": subject.item_index,
            "occurred_at": occurred_at,
            "route": subject.route,
            "client_id": subject.client_id,
            "model": subject.model,
            "input_bytes": len(data),
        }
        try:
            outcome = await prediction
        except asyncio.CancelledError:
            # The client hung up: nobody receives an answer, but the work was admitted; record it, do not wait.
            digest.cancel()
            base.update(_fingerprint(data))
            self.writer.submit(_refusal(base, 499, "Client closed the connection", data, None, started))
            raise
        except Exception as err:
            status, title, _, _ = problem_for(err)
            base.update(await digest)
            await self._durable(_refusal(base, status, title, data, err, started))
            raise
        base.update(await digest)
        response = outcome[0] if isinstance(outcome, tuple) else outcome
        assert isinstance(response, PredictionResponse)
        record = _answered(base, response, started)
        await self._durable(record)
        self.rolling.add(record)
        return outcome

    async def _durable(self, record: AuditRecord) -> None:
        """Wait until ``record`` is durable; a database that hangs fails the request (503) after the timeout."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.writer.submit(record)), timeout=self.durable_timeout_s)
        except TimeoutError as err:
            raise AuditUnavailableError(
                f"the audit record was not durable within {self.durable_timeout_s:g} s; the database is not answering"
            ) from err


def _fingerprint(data: bytes) -> dict[str, str | None]:
    """The upload's sha256 and, for DICOM, its UIDs' digests (``service.audit.uids``)."""
    study, sop = dicom_uid_digests(data)
    return {"input_sha256": hashlib.sha256(data).hexdigest(), "study_uid_sha256": study, "sop_uid_sha256": sop}


def _answered(base: dict[str, Any], response: PredictionResponse, started: float) -> AuditRecord:
    return AuditRecord.model_validate(
        {
            **base,
            "status": 200,
            "model": response.model,
            "input_format": response.image.format,
            "width": response.image.width,
            "height": response.image.height,
            "photometric": response.image.photometric,
            "warnings": list(response.image.warnings),
            "mc_samples": response.mc_samples,
            "findings": {
                label: AuditFindingRecord(conf=p.conf, std=p.std, decision=p.decision, interval=p.interval)
                for label, p in response.predictions.items()
            },
            "referral": response.referral,
            "ood": response.ood,
            "latency_ms": (time.perf_counter() - started) * 1e3,
        }
    )


def _refusal(
    base: dict[str, Any], status: int, title: str, data: bytes, err: BaseException | None, started: float
) -> AuditRecord:
    sniffed = sniff_format(data[:1024])
    extra: dict[str, Any] = {"input_format": sniffed if sniffed in _FORMATS else None}
    if isinstance(err, OutOfDistributionError):
        extra["ood"] = err.ood
        extra["mc_samples"] = err.mc_samples
        extra.update(_image_fields(err.image))
    return AuditRecord.model_validate(
        {**base, **extra, "status": status, "error": title, "latency_ms": (time.perf_counter() - started) * 1e3}
    )


def _image_fields(image: ImageFacts | None) -> dict[str, Any]:
    if image is None:
        return {}
    return {
        "input_format": image.format,
        "width": image.width,
        "height": image.height,
        "photometric": image.photometric,
    }
