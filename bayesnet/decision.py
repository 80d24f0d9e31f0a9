"""From MC samples to a decision per finding: positive, negative, or uncertain (refer to a radiologist).

One place, used by the service, the archive scorer and evaluation alike. Two rules, chosen by the spec:

* **Risk-controlled** (the spec has a :class:`~bayesnet.spec.ReferralSpec`, fitted by ``python -m train calibrate
  --referral conformal``): ``negative`` (auto-cleared) when the negative-side score is below the label's
  ``negative_threshold``, ``positive`` when the positive-side score reaches its ``positive_threshold``,
  ``uncertain`` otherwise or when both hold; a side whose threshold is ``None`` never fires. Scores
  (:func:`side_scores`): ``"mean"`` thresholds the MC mean on both sides; ``"interval"`` clears only when the
  95th percentile of the samples is below the threshold and calls positive only when the 5th reaches it.
* **Disagreement** (no referral rule; older checkpoints): ``positive`` when the MC-mean probability reaches the
  label's decision threshold, else ``negative``; ``uncertain`` instead when the fraction of samples on the other
  side of the threshold from the mean is at least the label's ``uncertainty_threshold``. With one sample, nothing
  is ever uncertain.

Every decision comes with a :class:`Reason`, and :func:`finding_rules` gives the thresholds that produced it, so a
response can carry the rule that decided and a client can check the decision against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

import torch
from torch import Tensor

from bayesnet.spec import ModelSpec, ReferralSpec


class Decision(str, Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"


def disagreement(samples: Tensor, threshold: Tensor) -> Tensor:
    """Fraction ``(B, K)`` of the samples ``(T, B, K)`` on the other side of ``threshold`` (K,) from their mean."""
    mean_positive = samples.mean(dim=0) >= threshold
    sample_positive = samples >= threshold
    return (sample_positive != mean_positive.unsqueeze(0)).float().mean(dim=0)


class Reason(str, Enum):
    """Why one finding got its decision: the code a client matches and the page explains."""

    CLEARED = "cleared"
    ABOVE_POSITIVE_THRESHOLD = "above_positive_threshold"
    BETWEEN_THRESHOLDS = "between_thresholds"
    CANNOT_BE_CLEARED = "cannot_be_cleared_by_this_model"
    BOTH_THRESHOLDS_MET = "both_thresholds_met"
    NO_RULE_MC_DISAGREEMENT = "no_rule_mc_disagreement"
    WITHHELD_OUT_OF_DISTRIBUTION = "withheld_out_of_distribution"
    WITHHELD_OUTSIDE_POPULATION = "withheld_outside_population"


#: Each reason in a clinician's words, at most 64 characters (a DICOM code meaning): the FHIR report and the SR.
REASON_TEXT: Final[dict[Reason, str]] = {
    Reason.CLEARED: "ruled out by the rule",
    Reason.ABOVE_POSITIVE_THRESHOLD: "at or above the rule's positive threshold",
    Reason.BETWEEN_THRESHOLDS: "neither ruled out nor called positive by the rule",
    Reason.CANNOT_BE_CLEARED: "cannot be ruled out by this model",
    Reason.BOTH_THRESHOLDS_MET: "the rule's thresholds conflict for this score",
    Reason.NO_RULE_MC_DISAGREEMENT: "the Monte-Carlo samples disagree about the threshold",
    Reason.WITHHELD_OUT_OF_DISTRIBUTION: "not decided: unlike a frontal chest radiograph",
    Reason.WITHHELD_OUTSIDE_POPULATION: "not decided: outside the intended population",
}

#: Which number a finding's thresholds compare: ``conf`` (the MC mean) on both sides, or ``interval``: cleared
#: when the 95th percentile of the samples is below clear-below, positive when the 5th reaches positive-at.
DecidedOn = Literal["conf", "interval"]


@dataclass(frozen=True)
class FindingRule:
    """The thresholds that decide one finding, as shown to a client (None: that side never fires)."""

    clear_below: float | None
    positive_at: float | None
    decided_on: DecidedOn


def finding_rules(spec: ModelSpec) -> list[FindingRule]:
    """The deciding thresholds of every label, in the spec's label order.

    With a referral rule, its per-label thresholds on its score. Without one, the label's point threshold on
    both sides (negative below it, positive at it), with MC disagreement as the third outcome.
    """
    referral = spec.referral
    if referral is None:
        return [FindingRule(t, t, "conf") for t in spec.threshold]
    decided_on: DecidedOn = "conf" if referral.score == "mean" else "interval"
    return [
        FindingRule(neg, pos, decided_on)
        for neg, pos in zip(referral.negative_threshold, referral.positive_threshold, strict=True)
    ]


def decide(samples: Tensor, spec: ModelSpec) -> list[list[Decision]]:
    """Decisions ``[B][K]`` from per-sample probabilities ``(T, B, K)`` (calibrated), per the module rules."""
    return [[decision for decision, _ in row] for row in decide_with_reasons(samples, spec)]


def decide_with_reasons(samples: Tensor, spec: ModelSpec) -> list[list[tuple[Decision, Reason]]]:
    """``(decision, reason)`` ``[B][K]`` from calibrated MC probabilities ``(T, B, K)``, per the module rules."""
    if spec.referral is not None:
        return conformal_decisions(samples, spec.referral)
    threshold = torch.tensor(spec.threshold, dtype=samples.dtype, device=samples.device)
    limit = torch.tensor(spec.uncertainty_threshold, dtype=samples.dtype, device=samples.device)
    positive = samples.mean(dim=0) >= threshold
    unsure = disagreement(samples, threshold) >= limit
    codes = torch.where(unsure, 2, positive.long()).tolist()
    table = (
        (Decision.NEGATIVE, Reason.CLEARED),
        (Decision.POSITIVE, Reason.ABOVE_POSITIVE_THRESHOLD),
        (Decision.UNCERTAIN, Reason.NO_RULE_MC_DISAGREEMENT),
    )
    return [[table[c] for c in row] for row in codes]


_UPPER: Final = 0.95
_LOWER: Final = 0.05


def side_scores(samples: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """``(negative_side, positive_side)`` scores ``(B, K)`` from calibrated MC probabilities ``(T, B, K)``."""
    if score == "mean":
        mean = samples.mean(dim=0)
        return mean, mean
    if score == "interval":
        q = torch.tensor([_LOWER, _UPPER], dtype=samples.dtype, device=samples.device)
        lower, upper = torch.quantile(samples, q, dim=0)
        return upper, lower
    raise ValueError(f"unknown referral score {score!r}; expected 'mean' or 'interval'")


def _thresholds(values: Sequence[float | None], never: float, like: Tensor) -> Tensor:
    return torch.tensor([never if v is None else v for v in values], dtype=like.dtype, device=like.device)


def conformal_decisions(samples: Tensor, referral: ReferralSpec) -> list[list[tuple[Decision, Reason]]]:
    """``(decision, reason)`` ``[B][K]`` from calibrated MC probabilities ``(T, B, K)`` under the rule (module
    docstring)."""
    negative_side, positive_side = side_scores(samples, referral.score)
    # A side that cannot fire gets a threshold no probability crosses: below 0 for clearing, above 1 for positive.
    cleared = negative_side < _thresholds(referral.negative_threshold, -1.0, samples)
    positive = positive_side >= _thresholds(referral.positive_threshold, 2.0, samples)
    can_clear = torch.tensor([t is not None for t in referral.negative_threshold], device=samples.device)
    neither = torch.where(can_clear, 2, 3).expand_as(cleared)
    codes = torch.where(cleared & positive, 4, torch.where(cleared, 0, torch.where(positive, 1, neither))).tolist()
    table = (
        (Decision.NEGATIVE, Reason.CLEARED),
        (Decision.POSITIVE, Reason.ABOVE_POSITIVE_THRESHOLD),
        (Decision.UNCERTAIN, Reason.BETWEEN_THRESHOLDS),
        (Decision.UNCERTAIN, Reason.CANNOT_BE_CLEARED),
        (Decision.UNCERTAIN, Reason.BOTH_THRESHOLDS_MET),
    )
    return [[table[c] for c in row] for row in codes]
