"""Risk-controlled triage: per-finding decisions, study-level clearance and the reasons a film is referred.

The rule's numbers live in :class:`bayesnet.spec.ReferralSpec` and are fitted by ``python -m train calibrate
--referral conformal`` (:mod:`train.conformal`); this module only applies them, the same way in the service, the
archive scorer and evaluation.

* **Per finding**: :func:`bayesnet.decision.decide` applies the rule's per-label thresholds (see there).
* **Per film** (:func:`study_scores`): the probability that any of ``study_labels`` is present if they were
  independent, ``1 - prod_k (1 - s_k)`` over the negative-side scores. The film is cleared as normal when that is
  below ``study_threshold``.
* **Reasons** (:func:`referral_reasons`): why a film goes to a radiologist, as stable codes a client can match.
  A film is cleared only when the study rule clears it and none of its findings (:func:`finding_labels`) is
  decided positive or uncertain; calibration's expected referral rate counts the same way (:func:`referred`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from bayesnet.decision import Decision, side_scores
from bayesnet.spec import NO_FINDING, ModelSpec, ReferralSpec

__all__ = [
    "NOT_CLEARED",
    "NO_RULE",
    "OUTSIDE_POPULATION",
    "OUT_OF_DISTRIBUTION",
    "POPULATION_UNVERIFIED",
    "POSSIBLE_FINDING",
    "REASONS",
    "UNCERTAIN_FINDING",
    "Referral",
    "describe",
    "finding_labels",
    "referral_reasons",
    "referred",
    "study_cleared",
    "study_scores",
]

POSSIBLE_FINDING: Final = "possible_finding"
UNCERTAIN_FINDING: Final = "uncertain_finding"
NOT_CLEARED: Final = "not_cleared_as_normal"
OUT_OF_DISTRIBUTION: Final = "out_of_distribution"
OUTSIDE_POPULATION: Final = "outside_intended_population"
NO_RULE: Final = "no_referral_rule"
POPULATION_UNVERIFIED: Final = "population_unverified"

#: Every reason code, with what it means (the API documents these).
REASONS: Final[dict[str, str]] = {
    POSSIBLE_FINDING: "a finding was decided positive",
    UNCERTAIN_FINDING: "a finding could be neither cleared nor called positive under the rule",
    NOT_CLEARED: "no finding is positive or uncertain, but the film as a whole is not confidently normal",
    OUT_OF_DISTRIBUTION: "the image does not look like the radiographs the model was trained on",
    OUTSIDE_POPULATION: "the DICOM header or the declared patient age / view says the film is outside the intended "
    "population (child, lateral view, not chest)",
    POPULATION_UNVERIFIED: "nothing verifies that the film is an adult frontal chest radiograph (no DICOM header or "
    "declared patient age and view says so), so it cannot be cleared",
    NO_RULE: "the model has no risk-controlled referral rule: every film is referred",
}


@dataclass(frozen=True)
class Referral:
    """Whether one film goes to a radiologist, and why (codes from :data:`REASONS`, in a fixed order)."""

    refer: bool
    reasons: tuple[str, ...]


def finding_labels(spec: ModelSpec) -> tuple[str, ...]:
    """The trained labels that are findings: those whose positive or uncertain decision refers a film, and the
    study rule's labels. Not "No Finding": it is positive on a normal film, and whether a film is normal is the
    study rule's to say."""
    return tuple(label for label in spec.trained_labels if label != NO_FINDING)


def referred(negative: ArrayLike, cleared: ArrayLike, spec: ModelSpec) -> NDArray[np.bool_]:
    """Per film, whether the rule refers it: not cleared by the study rule, or a finding (:func:`finding_labels`)
    not decided negative (the finding-based reasons of :func:`referral_reasons`). ``negative`` ``(N, K)``: each
    label decided negative, over ``spec.labels``; ``cleared`` ``(N,)``: the study rule's clearance. The service's
    referral before the gates, for calibration's expected rates."""
    index = [spec.label_index(label) for label in finding_labels(spec)]
    decided_negative = np.asarray(negative, dtype=bool)[:, index]
    result: NDArray[np.bool_] = ~np.asarray(cleared, dtype=bool) | ~decided_negative.all(axis=1)
    return result


def study_scores(samples: Tensor, spec: ModelSpec) -> Tensor:
    """``(B,)`` study score: ``1 - prod_k (1 - s_k)`` over the referral's ``study_labels`` (negative-side scores)."""
    if spec.referral is None:
        raise ValueError("the spec has no referral rule")
    negative_side, _ = side_scores(samples, spec.referral.score)
    index = [spec.label_index(label) for label in spec.referral.study_labels]
    chosen = negative_side[:, index].double().clamp(0.0, 1.0)
    return 1.0 - torch.prod(1.0 - chosen, dim=1)


def study_cleared(samples: Tensor, spec: ModelSpec) -> list[bool]:
    """Per film: does the study-level rule clear it as normal? All False without a rule or a feasible threshold."""
    referral = spec.referral
    if referral is None or referral.study_threshold is None:
        return [False] * int(samples.shape[1])
    cleared: list[bool] = (study_scores(samples, spec) < referral.study_threshold).tolist()
    return cleared


def referral_reasons(
    decisions: Sequence[Decision],
    *,
    cleared: bool,
    has_rule: bool,
    out_of_distribution: bool,
    outside_population: bool,
    population_verified: bool = True,
) -> Referral:
    """The referral of one film from its findings' decisions (:func:`finding_labels`) and what the gates said.

    ``refer`` is False only when the study rule cleared the film, its population is verified (adult frontal chest)
    and nothing else asks for a radiologist. A film the gates flag (out of distribution, outside the intended
    population) is referred for that alone: its findings' decisions are withheld, so no finding-based reason is
    given for it.
    """
    reasons = []
    if out_of_distribution:
        reasons.append(OUT_OF_DISTRIBUTION)
    if outside_population:
        reasons.append(OUTSIDE_POPULATION)
    withheld = bool(reasons)
    if not has_rule:
        reasons.append(NO_RULE)
    if not withheld and not population_verified:
        reasons.append(POPULATION_UNVERIFIED)
    if not withheld:
        if Decision.POSITIVE in decisions:
            reasons.append(POSSIBLE_FINDING)
        if Decision.UNCERTAIN in decisions:
            reasons.append(UNCERTAIN_FINDING)
        if has_rule and not cleared and not reasons:
            reasons.append(NOT_CLEARED)
    return Referral(refer=bool(reasons) or not cleared, reasons=tuple(reasons))


def describe(referral: ReferralSpec) -> str:
    """The rule's guarantees and its cost on the calibration films, in plain words (card, API, web page)."""
    n = referral.calibration.get("n_films", "the")
    confidence = f"{1.0 - referral.delta:.0%}"
    parts = [
        f"Of films that have a finding, at most {referral.alpha:.0%} are reported negative for it",
        f"of abnormal films, at most {referral.study_alpha:.0%} are cleared as normal",
    ]
    if referral.alpha_positive is not None:
        parts.append(f"of films without a finding, at most {referral.alpha_positive:.0%} are reported positive for it")
    text = (
        "; ".join(parts) + f"; each with {confidence} confidence, while films resemble the {n} calibration films. "
        f"On those films the rule referred {referral.expected_study_referral_rate:.0%} of films to a radiologist and "
        f"cleared {referral.expected_normal_clearance_rate:.0%} of normal films."
    )
    if referral.study_threshold is None:
        text += " At these levels the calibration films support clearing no film: every film is referred."
    return text
