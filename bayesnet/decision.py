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
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Final

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


def decide(samples: Tensor, spec: ModelSpec) -> list[list[Decision]]:
    """Decisions ``[B][K]`` from per-sample probabilities ``(T, B, K)`` (calibrated), per the module rules."""
    if spec.referral is not None:
        return conformal_decisions(samples, spec.referral)
    threshold = torch.tensor(spec.threshold, dtype=samples.dtype, device=samples.device)
    limit = torch.tensor(spec.uncertainty_threshold, dtype=samples.dtype, device=samples.device)
    positive = samples.mean(dim=0) >= threshold
    unsure = disagreement(samples, threshold) >= limit
    codes = torch.where(unsure, 2, positive.long()).tolist()
    table = (Decision.NEGATIVE, Decision.POSITIVE, Decision.UNCERTAIN)
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


def conformal_decisions(samples: Tensor, referral: ReferralSpec) -> list[list[Decision]]:
    """Decisions ``[B][K]`` from calibrated MC probabilities ``(T, B, K)`` under the rule (module docstring)."""
    negative_side, positive_side = side_scores(samples, referral.score)
    # A side that cannot fire gets a threshold no probability crosses: below 0 for clearing, above 1 for positive.
    cleared = negative_side < _thresholds(referral.negative_threshold, -1.0, samples)
    positive = positive_side >= _thresholds(referral.positive_threshold, 2.0, samples)
    codes = torch.where(cleared & ~positive, 0, torch.where(positive & ~cleared, 1, 2)).tolist()
    table = (Decision.NEGATIVE, Decision.POSITIVE, Decision.UNCERTAIN)
    return [[table[c] for c in row] for row in codes]
