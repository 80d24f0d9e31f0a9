"""From MC samples to a decision per finding: positive, negative, or uncertain (refer to a radiologist).

Rule (one place, used by the service and by evaluation alike): a finding is ``positive`` when the MC-mean
probability reaches the label's decision threshold, else ``negative``; it is ``uncertain`` instead when the
MC samples disagree about that decision: the fraction of samples falling on the other side of the
threshold from the mean is at least the label's ``uncertainty_threshold``. With one sample, nothing is
ever uncertain. The thresholds live in the spec and are fitted by ``python -m train calibrate``.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from bayesnet.spec import ModelSpec


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
    """Decisions ``[B][K]`` from per-sample probabilities ``(T, B, K)`` (calibrated), per the module rule."""
    threshold = torch.tensor(spec.threshold, dtype=samples.dtype, device=samples.device)
    limit = torch.tensor(spec.uncertainty_threshold, dtype=samples.dtype, device=samples.device)
    positive = samples.mean(dim=0) >= threshold
    unsure = disagreement(samples, threshold) >= limit
    codes = torch.where(unsure, 2, positive.long()).tolist()
    table = (Decision.NEGATIVE, Decision.POSITIVE, Decision.UNCERTAIN)
    return [[table[c] for c in row] for row in codes]
