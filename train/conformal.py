"""Fitting the risk-controlled referral rule (:class:`bayesnet.spec.ReferralSpec`) on labelled calibration films.

Each side of the rule is a threshold on a score, chosen so that a risk stays below a level with probability at
least ``1 - delta`` over the calibration draw (Learn-then-Test, Angelopoulos, Bates, Candes, Jordan & Lei 2021):
every candidate threshold is a null hypothesis "the risk here exceeds the level", tested with the binary
Hoeffding-Bentkus p-value (for 0/1 losses: the smaller of Hoeffding's bound and the exact binomial tail);
fixed-sequence testing walks from the safest threshold outwards and stops at the first hypothesis it cannot
reject, which controls the family-wise error at ``delta`` without a multiplicity correction.
The three risks, all expressed with MAPIE's ``BinaryClassificationController`` (``mapie.risk_control``):

* **per label, clearing** (negative when ``score < lambda``): miss rate = positives cleared / positives
  = ``1 - recall`` of "not cleared"; controlled at ``alpha``; the largest valid lambda is kept (clears the most).
* **per label, calling positive** (``score >= lambda``), optional: false-positive rate among negative films,
  controlled at ``alpha_positive``; the smallest valid lambda is kept (calls the most positives).
* **per film, clearing as normal** (study score ``< lambda``, see :mod:`bayesnet.referral`): the fraction of
  abnormal films (any study label positive) cleared, controlled at ``study_alpha``.

When no threshold passes (too few positive films for the level, or a model too weak to separate them) that side
is ``None``: it never fires and those films are referred. Nothing is loosened silently; the fit records why.
The guarantee holds for films exchangeable with the calibration films: a new site, scanner or population breaks
it until the rule is refitted on that site's films (``python -m train calibrate --data site.csv``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import torch
from mapie.risk_control import BinaryClassificationController
from numpy.typing import ArrayLike, NDArray

from bayesnet.decision import Decision, decide, side_scores
from bayesnet.referral import finding_labels, referred, study_cleared
from bayesnet.spec import ModelSpec, ReferralScore, ReferralSpec
from train.metrics import FloatArray, as_targets

__all__ = [
    "GRID",
    "ReferralFit",
    "ReferralInputError",
    "check_enough_positives",
    "check_markdown",
    "check_referral",
    "clopper_pearson",
    "fit_negative_threshold",
    "fit_positive_threshold",
    "fit_referral",
    "positives_needed",
    "stored_side_scores",
    "study_score_array",
    "tradeoff",
]

#: Candidate thresholds: a 0.001 grid on [0, 1]; fixed-sequence testing pays nothing for a fine grid.
GRID: Final[NDArray[np.float64]] = np.round(np.linspace(0.0, 1.0, 1001), 6)


class ReferralInputError(ValueError):
    """The calibration data or levels cannot support a referral rule; the message says what to change."""


def _predict_proba(scores: ArrayLike) -> NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.column_stack([1.0 - s, s])


def _controller(risk: str, target_level: float, delta: float, best: str) -> BinaryClassificationController:
    return BinaryClassificationController(
        predict_function=_predict_proba,
        risk=risk,
        target_level=target_level,
        confidence_level=1.0 - delta,
        best_predict_param_choice=best,
        list_predict_params=GRID,
        fwer_method="fixed_sequence",
    )


def _valid_thresholds(
    controller: BinaryClassificationController, scores: FloatArray, y: NDArray[np.int64]
) -> FloatArray:
    """The thresholds whose risk null the fixed-sequence test rejected (empty: none controls the risk)."""
    with warnings.catch_warnings():
        # MAPIE warns when no threshold controls the risk (returned as None and recorded) and when every one does
        # (a well-separated finding: the most permissive is chosen); both are outcomes, not faults.
        warnings.filterwarnings("ignore", message="No predict parameters were found to control the risk")
        warnings.filterwarnings("ignore", message="All provided predict_params control the risk")
        controller.calibrate(scores, y)
    valid: FloatArray = np.asarray(controller.valid_predict_params, dtype=np.float64).reshape(-1)
    return valid[~np.isnan(valid)]


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ReferralInputError(f"{name} must be strictly between 0 and 1, got {value}")


def fit_negative_threshold(scores: ArrayLike, y: ArrayLike, *, alpha: float, delta: float) -> float | None:
    """Largest lambda with P(miss rate of ``score < lambda`` <= alpha) >= 1 - delta; None when none is valid.

    ``scores`` ``(n,)`` negative-side scores in [0, 1], ``y`` ``(n,)`` 0/1 targets (NaN rows must be removed).
    """
    _check_level("alpha", alpha)
    _check_level("delta", delta)
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(np.int64)
    if not t.any():
        raise ReferralInputError("no positive film: a miss rate cannot be bounded without positives")
    # recall of "not cleared" (score >= lambda) >= 1 - alpha. Every valid lambda carries the guarantee; the largest
    # clears the most (MAPIE's own pick breaks ties between equally good lambdas by grid order).
    valid = _valid_thresholds(_controller("recall", 1.0 - alpha, delta, "predicted_positive_fraction"), s, t)
    return float(valid.max()) if valid.size else None


def fit_positive_threshold(scores: ArrayLike, y: ArrayLike, *, alpha: float, delta: float) -> float | None:
    """Smallest lambda with P(false-positive rate of ``score >= lambda`` <= alpha) >= 1 - delta, or None."""
    _check_level("alpha_positive", alpha)
    _check_level("delta", delta)
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(np.int64)
    if t.all():
        raise ReferralInputError("no negative film: a false-positive rate cannot be bounded without negatives")
    valid = _valid_thresholds(_controller("fpr", alpha, delta, "recall"), s, t)
    return float(valid.min()) if valid.size else None


def study_score_array(negative_side: FloatArray, study_index: Sequence[int]) -> FloatArray:
    """``(N,)`` ``1 - prod_k (1 - s_k)`` over ``study_index`` columns of ``(N, K)`` scores, as the service does."""
    chosen = np.clip(negative_side[:, list(study_index)], 0.0, 1.0)
    out: FloatArray = 1.0 - np.prod(1.0 - chosen, axis=1)
    return out


@dataclass(frozen=True)
class ReferralFit:
    """A fitted rule and what it did on its own calibration films."""

    spec: ReferralSpec
    decisions: NDArray[np.int8]  # (N, K): 0 negative, 1 positive, 2 uncertain
    cleared: NDArray[np.bool_]  # (N,) cleared as normal by the study rule
    report: dict[str, Any]


def positives_needed(alpha: float, delta: float) -> int:
    """Films with a finding below which no clearing threshold can carry "miss rate <= alpha with confidence
    1 - delta": even a threshold that misses none of n positives is only certified when (1 - alpha)^n <= delta."""
    return math.ceil(math.log(delta) / math.log(1.0 - alpha))


def check_enough_positives(targets: FloatArray, spec: ModelSpec, *, alpha: float, delta: float, source: str) -> None:
    """Refuse, naming each short finding, when a trained finding has fewer positives than :func:`positives_needed`
    (the rule fitted would clear nothing of it, and say so only in its thresholds)."""
    need = positives_needed(alpha, delta)
    counts = {label: int(np.nansum(targets[:, spec.label_index(label)] == 1.0)) for label in spec.trained_labels}
    short = {label: count for label, count in counts.items() if count < need}
    if short:
        listing = ", ".join(f"{label} ({count})" for label, count in short.items())
        raise ReferralInputError(
            f"too few films with a finding for alpha {alpha} and delta {delta}: at least {need} are needed per "
            f"finding, and among {source} there are {listing}. Collect more verdicts, or ask for looser levels"
        )


def _abnormal_and_normal(
    targets: FloatArray, study_index: Sequence[int]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Abnormal: any study label positive. Normal: every study label known and negative."""
    study = targets[:, list(study_index)]
    abnormal = np.nan_to_num(study, nan=0.0).max(axis=1) == 1.0
    normal = ~np.isnan(study).any(axis=1) & ~abnormal
    return abnormal, normal


def fit_referral(
    samples: ArrayLike,
    y: ArrayLike,
    spec: ModelSpec,
    *,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None = None,
    score: ReferralScore = "mean",
    calibration_notes: Mapping[str, Any] | None = None,
) -> ReferralFit:
    """Fit the per-label and study-level rule on calibrated MC probabilities ``(T, N, K)`` and targets ``(N, K)``.

    Untrained labels never fire (None on both sides). Study labels: the trained labels except "No Finding".

    Raises:
        ReferralInputError: a level outside (0, 1); shapes that disagree; no films; a trained label with no
            positive (or, with ``alpha_positive``, no negative) calibration film; no abnormal film.
    """
    for name, value in (("alpha", alpha), ("delta", delta), ("study_alpha", study_alpha)):
        _check_level(name, value)
    if alpha_positive is not None:
        _check_level("alpha_positive", alpha_positive)
    targets = as_targets(y)
    probs = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if probs.dim() != 3 or tuple(probs.shape[1:]) != targets.shape or targets.shape[1] != spec.num_classes:
        raise ReferralInputError(
            f"samples must be (T, N, K) with (N, K) = {targets.shape} and K = {spec.num_classes} labels, "
            f"got {tuple(probs.shape)}"
        )
    if targets.shape[0] == 0:
        raise ReferralInputError("no calibration films")
    neg_t, pos_t = side_scores(probs, score)
    neg, pos = neg_t.double().numpy(), pos_t.double().numpy()

    def served(rule_spec: ModelSpec) -> tuple[NDArray[np.int8], NDArray[np.bool_]]:
        # What the rule does on its own films, computed by the code the service runs (bayesnet.decide, study_cleared).
        codes = {Decision.NEGATIVE: 0, Decision.POSITIVE: 1, Decision.UNCERTAIN: 2}
        decisions = np.array([[codes[d] for d in row] for row in decide(probs, rule_spec)], dtype=np.int8)
        return decisions, np.array(study_cleared(probs, rule_spec), dtype=bool)

    return _fit_on_scores(
        neg,
        pos,
        targets,
        spec,
        alpha=alpha,
        delta=delta,
        study_alpha=study_alpha,
        alpha_positive=alpha_positive,
        score=score,
        calibration_notes=calibration_notes,
        served=served,
    )


def stored_side_scores(
    mean: FloatArray, low: FloatArray, high: FloatArray, score: str
) -> tuple[FloatArray, FloatArray]:
    """``(negative_side, positive_side)`` from what a record keeps of a film's samples (the MC mean and the 5th and
    95th percentiles), as :func:`bayesnet.decision.side_scores` computes them from the samples: the mean on both
    sides, or the 95th percentile to clear and the 5th to call positive."""
    if score == "mean":
        return mean, mean
    if score == "interval":
        return high, low
    raise ValueError(f"unknown referral score {score!r}")


def fit_referral_on_scores(
    negative_side: ArrayLike,
    positive_side: ArrayLike,
    y: ArrayLike,
    spec: ModelSpec,
    *,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None = None,
    score: ReferralScore = "mean",
    calibration_notes: Mapping[str, Any] | None = None,
) -> ReferralFit:
    """:func:`fit_referral` from the scores the rule thresholds, ``(N, K)`` each (``bayesnet.decision.side_scores``
    of the MC samples), instead of the samples: what the audit trail keeps of a scored film (``train.from_audit``).
    The same thresholds as :func:`fit_referral` on the samples those scores came from."""
    for name, value in (("alpha", alpha), ("delta", delta), ("study_alpha", study_alpha)):
        _check_level(name, value)
    if alpha_positive is not None:
        _check_level("alpha_positive", alpha_positive)
    targets = as_targets(y)
    neg, pos = np.asarray(negative_side, dtype=np.float64), np.asarray(positive_side, dtype=np.float64)
    if neg.shape != targets.shape or pos.shape != targets.shape or targets.shape[1] != spec.num_classes:
        raise ReferralInputError(
            f"scores must be (N, K) = {targets.shape} with K = {spec.num_classes} labels, got {neg.shape}, {pos.shape}"
        )
    if targets.shape[0] == 0:
        raise ReferralInputError("no calibration films")

    def served(rule_spec: ModelSpec) -> tuple[NDArray[np.int8], NDArray[np.bool_]]:
        # bayesnet.decision.conformal_decisions and bayesnet.referral.study_cleared, on the scores.
        rule = rule_spec.referral
        assert rule is not None
        lower = np.array([-1.0 if t is None else t for t in rule.negative_threshold])
        upper = np.array([2.0 if t is None else t for t in rule.positive_threshold])
        cleared_k, positive_k = neg < lower, pos >= upper
        decisions = np.where(cleared_k & ~positive_k, 0, np.where(positive_k & ~cleared_k, 1, 2)).astype(np.int8)
        if rule.study_threshold is None:
            return decisions, np.zeros(len(neg), dtype=bool)
        study = study_score_array(neg, [rule_spec.label_index(label) for label in rule.study_labels])
        return decisions, study < rule.study_threshold

    return _fit_on_scores(
        neg,
        pos,
        targets,
        spec,
        alpha=alpha,
        delta=delta,
        study_alpha=study_alpha,
        alpha_positive=alpha_positive,
        score=score,
        calibration_notes=calibration_notes,
        served=served,
    )


def _fit_on_scores(
    neg: NDArray[np.float64],
    pos: NDArray[np.float64],
    targets: FloatArray,
    spec: ModelSpec,
    *,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None,
    score: ReferralScore,
    calibration_notes: Mapping[str, Any] | None,
    served: Callable[[ModelSpec], tuple[NDArray[np.int8], NDArray[np.bool_]]],
) -> ReferralFit:
    """The fit itself, on side scores; ``served`` says what a fitted rule decides on these films."""
    lower: list[float | None] = [None] * spec.num_classes
    upper: list[float | None] = [None] * spec.num_classes
    per_label: dict[str, dict[str, Any]] = {}
    for label in spec.trained_labels:
        k = spec.label_index(label)
        valid = ~np.isnan(targets[:, k])
        y_k = targets[valid, k]
        n_pos, n_neg = int(y_k.sum()), int((y_k == 0).sum())
        if n_pos == 0:
            raise ReferralInputError(
                f"label {label!r} has no positive calibration film ({n_neg} negatives): its miss rate cannot be "
                "bounded. Add films with this finding, or calibrate a model that is not trained on it"
            )
        try:
            lower[k] = fit_negative_threshold(neg[valid, k], y_k, alpha=alpha, delta=delta)
            if alpha_positive is not None:
                upper[k] = fit_positive_threshold(pos[valid, k], y_k, alpha=alpha_positive, delta=delta)
        except ReferralInputError as err:
            raise ReferralInputError(f"label {label!r}: {err}") from err
        per_label[label] = {"n": int(valid.sum()), "positives": n_pos, "prevalence": n_pos / max(1, int(valid.sum()))}
    study_labels = finding_labels(spec)
    study_index = [spec.label_index(lb) for lb in study_labels]
    abnormal, normal = _abnormal_and_normal(targets, study_index)
    if not abnormal.any():
        raise ReferralInputError("no abnormal calibration film (no study label positive): nothing to bound")
    study = study_score_array(neg, study_index)
    known = abnormal | normal
    study_threshold = fit_negative_threshold(
        study[known], abnormal[known].astype(np.float64), alpha=study_alpha, delta=delta
    )
    rule = ReferralSpec(
        alpha=alpha,
        study_alpha=study_alpha,
        delta=delta,
        alpha_positive=alpha_positive,
        score=score,
        negative_threshold=tuple(lower),
        positive_threshold=tuple(upper),
        study_labels=study_labels,
        study_threshold=study_threshold,
    )
    decisions, cleared = served(spec.replace(referral=rule))
    for label, row in per_label.items():
        k = spec.label_index(label)
        valid = ~np.isnan(targets[:, k])
        positives = valid & (targets[:, k] == 1.0)
        negatives = valid & (targets[:, k] == 0.0)
        row.update(
            negative_threshold=lower[k],
            positive_threshold=upper[k],
            cleared_fraction=float((decisions[valid, k] == 0).mean()),
            positive_fraction=float((decisions[valid, k] == 1).mean()),
            miss_rate=float((decisions[positives, k] == 0).mean()),
            false_positive_rate=float((decisions[negatives, k] == 1).mean()) if negatives.any() else None,
        )
    n = targets.shape[0]
    sent = referred(decisions == 0, cleared, spec)  # as the service refers: the study rule and the findings' reasons
    referral_rate = float(sent.mean())
    normal_clearance = float((~sent)[normal].mean()) if normal.any() else 0.0
    calibration = {
        "n_films": n,
        "n_abnormal": int(abnormal.sum()),
        "n_normal": int(normal.sum()),
        "prevalence": {label: row["prevalence"] for label, row in per_label.items()},
        "positives": {label: row["positives"] for label, row in per_label.items()},
        **dict(calibration_notes or {}),
    }
    referral = replace(
        rule,
        expected_study_referral_rate=referral_rate,
        expected_normal_clearance_rate=normal_clearance,
        calibration=calibration,
    )
    report = {
        "per_label": per_label,
        "study": {
            "threshold": study_threshold,
            "referral_rate": referral_rate,
            "normal_clearance_rate": normal_clearance,
            "abnormal_cleared_rate": float(cleared[abnormal].mean()),
            "n_abnormal": int(abnormal.sum()),
            "n_normal": int(normal.sum()),
        },
    }
    return ReferralFit(spec=referral, decisions=decisions, cleared=cleared, report=report)


def tradeoff(
    samples: ArrayLike,
    y: ArrayLike,
    spec: ModelSpec,
    *,
    alphas: Sequence[float],
    delta: float,
    score: ReferralScore = "mean",
) -> list[dict[str, float]]:
    """For each level in ``alphas`` (used for both ``alpha`` and ``study_alpha``): what a site would get.

    Rows: ``alpha``, ``study_referral_rate`` (films referred), ``normal_clearance_rate`` (normal films cleared),
    ``finding_cleared_rate`` (mean over trained labels of the fraction of films whose finding is cleared).
    """
    rows = []
    for level in alphas:
        fit = fit_referral(samples, y, spec, alpha=level, delta=delta, study_alpha=level, score=score)
        trained = [spec.label_index(lb) for lb in spec.trained_labels]
        rows.append(
            {
                "alpha": float(level),
                "study_referral_rate": fit.spec.expected_study_referral_rate,
                "normal_clearance_rate": fit.spec.expected_normal_clearance_rate,
                "finding_cleared_rate": float((fit.decisions[:, trained] == 0).mean()),
            }
        )
    return rows


def clopper_pearson(count: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Exact binomial confidence interval of ``count / n`` (None, None when n = 0)."""
    from scipy.stats import beta

    if n == 0:
        return None, None
    tail = (1.0 - level) / 2.0
    lo = 0.0 if count == 0 else float(beta.ppf(tail, count, n - count + 1))
    hi = 1.0 if count == n else float(beta.ppf(1.0 - tail, count + 1, n - count))
    return lo, hi


def _rate(count: int, n: int) -> dict[str, Any]:
    lo, hi = clopper_pearson(count, n)
    return {"rate": count / n if n else None, "count": count, "of": n, "ci95": [lo, hi]}


def check_referral(samples: ArrayLike, y: ArrayLike, spec: ModelSpec) -> dict[str, Any]:
    """What the spec's rule does on labelled films it was not fitted on, with exact 95% intervals.

    ``samples`` are calibrated MC probabilities ``(T, N, K)``. Per trained label: positives cleared (the miss
    rate, to compare with ``alpha``) and negatives called positive (with ``alpha_positive``); per film: abnormal
    films cleared (with ``study_alpha``), films referred and normal films cleared (with what the card expects).
    Decisions come from :func:`bayesnet.decision.decide` and :func:`bayesnet.referral.study_cleared`, the code the
    service runs.
    """
    rule = spec.referral
    if rule is None:
        raise ReferralInputError("the spec has no referral rule to check")
    targets = as_targets(y)
    probs = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    decided = decide(probs, spec)
    decisions = np.array([[d is Decision.NEGATIVE for d in row] for row in decided])
    positives_called = np.array([[d is Decision.POSITIVE for d in row] for row in decided])
    cleared = np.array(study_cleared(probs, spec), dtype=bool)
    sent = referred(decisions, cleared, spec)
    per_label = {}
    for label in spec.trained_labels:
        k = spec.label_index(label)
        positive, negative = targets[:, k] == 1.0, targets[:, k] == 0.0
        per_label[label] = {
            "missed": _rate(int((decisions[:, k] & positive).sum()), int(positive.sum())),
            "false_positive": _rate(int((positives_called[:, k] & negative).sum()), int(negative.sum())),
        }
    study_index = [spec.label_index(lb) for lb in rule.study_labels]
    abnormal, normal = _abnormal_and_normal(targets, study_index)
    return {
        "levels": {
            "alpha": rule.alpha,
            "alpha_positive": rule.alpha_positive,
            "study_alpha": rule.study_alpha,
            "delta": rule.delta,
        },
        "n_films": int(targets.shape[0]),
        "per_label": per_label,
        "abnormal_cleared": _rate(int((~sent & abnormal).sum()), int(abnormal.sum())),
        "referred": _rate(int(sent.sum()), int(sent.size)),
        "normal_cleared": _rate(int((~sent & normal).sum()), int(normal.sum())),
        "expected": {
            "study_referral_rate": rule.expected_study_referral_rate,
            "normal_clearance_rate": rule.expected_normal_clearance_rate,
        },
    }


def check_markdown(check: Mapping[str, Any]) -> str:
    """The held-out check as a report section."""

    def fmt(entry: Mapping[str, Any]) -> str:
        if entry["rate"] is None:
            return "n/a (0 films)"
        lo, hi = entry["ci95"]
        return f"{entry['rate']:.1%} ({entry['count']}/{entry['of']}; 95% CI {lo:.1%}-{hi:.1%})"

    levels = check["levels"]
    rows = "\n".join(
        f"| {label} | {fmt(row['missed'])} | {fmt(row['false_positive'])} |"
        for label, row in check["per_label"].items()
    )
    expected = check["expected"]
    return f"""## The referral rule on these films

The model's risk-controlled rule (alpha {levels["alpha"]}, alpha_positive {levels["alpha_positive"]}, study_alpha
{levels["study_alpha"]}, delta {levels["delta"]}) applied to these {check["n_films"]} films. Only meaningful when
the rule was not fitted on them. The guarantee is on the rate over many films; a finding with few positives here
has a wide interval.

| finding | positives cleared (vs alpha) | negatives called positive (vs alpha_positive) |
|---|---:|---:|
{rows}

- Abnormal films cleared as normal (vs study_alpha): {fmt(check["abnormal_cleared"])}
- Films referred: {fmt(check["referred"])}; the card expects {expected["study_referral_rate"]:.1%}
- Normal films cleared: {fmt(check["normal_cleared"])}; the card expects {expected["normal_clearance_rate"]:.1%}
"""
