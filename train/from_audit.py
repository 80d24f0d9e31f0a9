"""The calibration films of a site, read from the service's audit trail: each scored film's stored scores and the
radiologists' verdicts on it (``python -m train calibrate --from-audit URL``, docs/guarantee.md).

No image is needed: each audit record keeps, per finding, the MC mean and the 5th and 95th percentiles of the
samples (migration 0004), which are every score the referral rule thresholds (``score="mean"``: the mean on both
sides; ``"interval"``: the 95th percentile to clear, the 5th to call positive, as ``bayesnet.decision.side_scores``
computes them). A finding without a verdict is unknown (NaN), as an unlabelled finding in a CSV is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import and_, select

from bayesnet import ModelSpec
from bayesnet.checkpoint import load_spec, read_checkpoint_document
from bayesnet.spec import ReferralScore
from service.audit.models import AuditEvent, AuditFinding, AuditOutcome
from service.audit.store import AuditStore
from train.calibrate import write_site_rule
from train.conformal import check_enough_positives, fit_referral_on_scores, stored_side_scores

FloatArray = NDArray[np.float64]


class TrailError(ValueError):
    """The trail cannot give the calibration films asked for (nothing there, or records without the scores)."""


@dataclass(frozen=True)
class TrailFilms:
    """Films of one model from the trail: ``(N, K)`` arrays over ``labels`` (NaN where not scored / not judged)."""

    labels: tuple[str, ...]
    mean: FloatArray
    low: FloatArray
    high: FloatArray
    targets: FloatArray

    def side_scores(self, score: str) -> tuple[FloatArray, FloatArray]:
        """``(negative_side, positive_side)`` as the rule thresholds them (``bayesnet.decision.side_scores``)."""
        return stored_side_scores(self.mean, self.low, self.high, score)


def films_from_trail(
    store: AuditStore, labels: Sequence[str], *, model_sha256: str, since: datetime | None = None
) -> TrailFilms:
    """Every answered film of the model (weights ``model_sha256``) since ``since`` that has at least one verdict.

    Raises ``TrailError`` when there is none, or when a film's record lacks the percentiles (older than 0004).
    """
    where = and_(AuditEvent.status == 200, AuditEvent.model_sha256 == model_sha256)
    if since is not None:
        where = and_(where, AuditEvent.occurred_at >= since)
    with store.engine.connect() as connection:
        judged = select(AuditOutcome.event_pk).distinct().subquery()
        findings = connection.execute(
            select(
                AuditFinding.event_pk,
                AuditFinding.label,
                AuditFinding.conf,
                AuditFinding.interval_low,
                AuditFinding.interval_high,
            )
            .join(AuditEvent, AuditEvent.id == AuditFinding.event_pk)
            .join(judged, judged.c.event_pk == AuditFinding.event_pk)
            .where(where)
        ).all()
        verdicts = connection.execute(
            select(AuditOutcome.event_pk, AuditOutcome.label, AuditOutcome.present)
            .join(AuditEvent, AuditEvent.id == AuditOutcome.event_pk)
            .where(where)
        ).all()
    films = sorted({pk for pk, *_ in findings})
    if not films:
        raise TrailError(
            f"the trail has no film of the model with weights sha256 {model_sha256[:16]}... that has a verdict"
            + (f" since {since:%Y-%m-%d}" if since else "")
            + ": send verdicts (POST /v1/outcomes) first"
        )
    row = {pk: i for i, pk in enumerate(films)}
    column = {label: k for k, label in enumerate(labels)}
    shape = (len(films), len(labels))
    mean, low, high, targets = (np.full(shape, np.nan) for _ in range(4))
    for pk, label, conf, interval_low, interval_high in findings:
        if label not in column:
            continue
        if interval_low is None or interval_high is None:
            raise TrailError(
                "a judged film's record has no MC percentiles (recorded before audit revision 0004): use --since "
                "to start after the upgrade"
            )
        i, k = row[pk], column[label]
        mean[i, k], low[i, k], high[i, k] = conf, interval_low, interval_high
    for pk, label, present in verdicts:
        if pk in row and label in column:
            targets[row[pk], column[label]] = 1.0 if present else 0.0
    return TrailFilms(labels=tuple(labels), mean=mean, low=low, high=high, targets=targets)


def calibrate_from_trail(
    checkpoint: Path,
    url: str,
    *,
    since: datetime | None,
    out: Path | None,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None,
    score: ReferralScore,
) -> ModelSpec:
    """Refit the checkpoint's referral rule (its thresholds and study threshold) on the site's scored films with
    verdicts, from the stored scores alone; write the spec as a new version (``+site``), weights untouched, to
    ``out`` (default: the checkpoint itself), all at once (``train.calibrate``'s writer).

    Temperature and the per-label display thresholds stay as they are: the trail stores calibrated probabilities,
    not the logits a temperature is fitted on.

    Raises:
        TrailError: no judged film of this model in the trail.
        ReferralInputError: too few films with a finding (or abnormal films) for the requested levels, named.
    """
    spec = load_spec(checkpoint)
    sha256 = str(read_checkpoint_document(checkpoint)["weights_sha256"])
    store = AuditStore.open(url, migrate_schema=False)
    try:
        films = films_from_trail(store, spec.labels, model_sha256=sha256, since=since)
    finally:
        store.close()
    check_enough_positives(
        films.targets, spec, alpha=alpha, delta=delta, source=f"the trail's {len(films.targets)} judged films"
    )
    negative_side, positive_side = films.side_scores(score)
    notes = {
        "data": "audit trail" + (f" since {since:%Y-%m-%d}" if since else ""),
        "fitted_with": "the site's scored films and the radiologists' verdicts, from the stored scores",
    }
    fitted = fit_referral_on_scores(
        negative_side,
        positive_side,
        films.targets,
        spec,
        alpha=alpha,
        delta=delta,
        study_alpha=study_alpha,
        alpha_positive=alpha_positive,
        score=score,
        calibration_notes=notes,
    )
    return write_site_rule(checkpoint, out, spec, fitted, notes)
