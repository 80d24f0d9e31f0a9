"""The ``cams=auto`` policy (``service.runtime.heatmaps.auto_classes``): which findings get a heatmap."""

from __future__ import annotations

import numpy as np

from bayesnet.decision import Decision
from service.runtime.heatmaps import AUTO_CAM_LIMIT, auto_classes

P, U, N = Decision.POSITIVE, Decision.UNCERTAIN, Decision.NEGATIVE


def test_positive_findings_come_first_then_uncertain_each_most_probable_first_up_to_the_limit() -> None:
    # A finding the rule calls positive at 0.43 is drawn before uncertain ones at 0.75: what was reported matters most.
    mean = np.array([0.43, 0.75, 0.59, 0.54, 0.52, 0.90, 0.60])
    decisions = [P, U, U, U, U, N, P]
    chosen = auto_classes(mean, decisions, range(7), in_distribution=True)
    assert chosen == [6, 0, 1, 2][:AUTO_CAM_LIMIT]
    assert auto_classes(mean, decisions, [1, 2, 5], in_distribution=True) == [1, 2]  # untrained labels never drawn
    assert auto_classes(mean, decisions, range(7), in_distribution=False) == []  # the OOD gate flagged the film
