"""Synthetic audit records for the store and monitor tests (the live tests use real uploads)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import numpy as np

from service.schemas import AuditRecord

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumothorax")
MODEL = {"name": "tiny-test-model", "version": "1.2.3", "sha256": "ab" * 32}


def record(
    when: datetime,
    *,
    confs: dict[str, float] | None = None,
    status: int = 200,
    refer: bool = True,
    ood_score: float = 1.0,
    model: str = "tiny-test-model",
    fmt: str = "png",
    size: int = 512,
    request_id: str | None = None,
    item_index: int | None = None,
) -> AuditRecord:
    confs = confs if confs is not None else dict.fromkeys(LABELS, 0.2)
    answered = status == 200
    return AuditRecord.model_validate(
        {
            "event_id": uuid.uuid4().hex,
            "request_id": request_id or uuid.uuid4().hex,
            "item_index": item_index,
            "occurred_at": when,
            "route": "/v1/predict",
            "client_id": "key-0123456789ab",
            "status": status,
            "error": None if answered else "Unsupported media type",
            "model": {**MODEL, "name": model},
            "input_sha256": "cd" * 32,
            "input_bytes": 1234,
            "input_format": fmt,
            "width": size,
            "height": size,
            "photometric": "L",
            "mc_samples": 20,
            "findings": {
                label: {"conf": conf, "std": 0.01, "decision": "positive" if conf >= 0.5 else "negative"}
                for label, conf in confs.items()
            }
            if answered
            else {},
            "referral": {"refer": refer, "reasons": ["possible_finding"] if refer else [], "population": []}
            if answered
            else None,
            "ood": {"score": ood_score, "threshold": 10.0, "in_distribution": ood_score <= 10.0} if answered else None,
            "latency_ms": 12.5,
        }
    )


def population(
    start: datetime, span_s: float, n: int, *, seed: int, a: float = 2.0, b: float = 5.0, ood_share: float = 0.02
) -> list[AuditRecord]:
    """``n`` answered records spread over ``span_s`` seconds from ``start``: confidences ~ Beta(a, b)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        confs = {label: float(rng.beta(a, b)) for label in LABELS}
        when = start + timedelta(seconds=span_s * i / n)
        out.append(
            record(
                when, confs=confs, refer=max(confs.values()) >= 0.5, ood_score=20.0 if rng.random() < ood_share else 1.0
            )
        )
    return out
