"""From model numbers to the API's response: shared by HTTP and archive scoring.

The HTTP pipeline (``service.runtime.pipeline``) and the offline archive scorer (``service.archive``) both call these
functions, so a radiograph scored from an archive gets exactly the decisions and response
shape it would get over HTTP. Nothing here imports FastAPI: the archive scorer runs where only the core
library, pydantic and torch are installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from bayesnet import ImageFacts, ModelSpec
from bayesnet.decision import Decision, FindingRule, Reason, finding_rules
from bayesnet.population import Population, assess
from bayesnet.referral import OUT_OF_DISTRIBUTION, OUTSIDE_POPULATION, describe, finding_labels, referral_reasons
from service.runtime.operating import Operating
from service.runtime.operating import apply as apply_operating
from service.runtime.predictor import InferenceResult
from service.schemas import (
    FindingEvidence,
    FindingPrediction,
    Heatmap,
    ImageInfo,
    ModelRef,
    OODGateInfo,
    OODResult,
    PredictionResponse,
    Referral,
    ReferralCalibration,
    ReferralInfo,
    Timing,
)


def ood_result(result: InferenceResult, spec: ModelSpec) -> OODResult | None:
    """The out-of-distribution verdict for one image, or None when the model has no gate."""
    if result.ood_score is None or spec.ood is None:
        return None
    return OODResult(
        score=max(0.0, result.ood_score),
        threshold=spec.ood.threshold,
        in_distribution=spec.ood.in_distribution(result.ood_score),
    )


def ood_gate_info(spec: ModelSpec, action: Literal["flag", "reject"]) -> OODGateInfo | None:
    """What ``/v1/model`` says about the model's out-of-distribution gate (None: it has none)."""
    if spec.ood is None:
        return None
    return OODGateInfo(
        method=spec.ood.method,
        threshold=spec.ood.threshold,
        threshold_quantile=spec.ood.threshold_quantile,
        dims=spec.ood.dims,
        feature_dim=spec.ood.feature_dim,
        action=action,
    )


def referral_info(spec: ModelSpec) -> ReferralInfo | None:
    """What ``/v1/model`` says about the referral rule (None: the model has none)."""
    rule = spec.referral
    if rule is None:
        return None
    known = {f for f in ReferralCalibration.model_fields}
    return ReferralInfo(
        method=rule.method,
        score=rule.score,
        alpha=rule.alpha,
        alpha_positive=rule.alpha_positive,
        study_alpha=rule.study_alpha,
        delta=rule.delta,
        expected_study_referral_rate=rule.expected_study_referral_rate,
        expected_normal_clearance_rate=rule.expected_normal_clearance_rate,
        negative_threshold={lb: rule.negative_threshold[spec.label_index(lb)] for lb in spec.trained_labels},
        positive_threshold={lb: rule.positive_threshold[spec.label_index(lb)] for lb in spec.trained_labels},
        study_labels=list(rule.study_labels),
        study_threshold=rule.study_threshold,
        calibration=ReferralCalibration(**{k: v for k, v in rule.calibration.items() if k in known}),
        summary=describe(rule),
    )


def referral(result: InferenceResult, spec: ModelSpec, population: Population) -> Referral:
    """The film's triage outcome: the study rule, the findings' decisions, the gates and the population check."""
    verdict = ood_result(result, spec)
    outcome = referral_reasons(
        [result.decisions[spec.label_index(label)] for label in finding_labels(spec)],
        cleared=result.cleared,
        has_rule=spec.referral is not None,
        out_of_distribution=verdict is not None and not verdict.in_distribution,
        outside_population=bool(population.flags),
        population_verified=population.verified,
    )
    return Referral(
        refer=outcome.refer,
        reasons=list(outcome.reasons),  # type: ignore[arg-type]
        population=list(population.flags),  # type: ignore[arg-type]
        population_verified=population.verified,
        population_missing=list(population.missing),  # type: ignore[arg-type]
    )


_WITHHELD_REASON = {
    OUT_OF_DISTRIBUTION: Reason.WITHHELD_OUT_OF_DISTRIBUTION,
    OUTSIDE_POPULATION: Reason.WITHHELD_OUTSIDE_POPULATION,
}


def withheld_because(triage: Referral) -> list[str]:
    """The gates that withhold every finding's decision (in the referral's order); empty: the decisions apply."""
    return [reason for reason in triage.reasons if reason in _WITHHELD_REASON]


def can_clear(spec: ModelSpec) -> bool:
    """Whether the model can clear any film: a referral rule with a study threshold and some finding it can rule out.
    Without a rule every film is referred (``no_referral_rule``)."""
    rule = spec.referral
    return rule is not None and rule.study_threshold is not None and any(t is not None for t in rule.negative_threshold)


def evidence(spec: ModelSpec, metrics: Mapping[str, Any]) -> dict[str, FindingEvidence]:
    """Per trained finding: its AUROC and bootstrap CI as the model card measured them (``metrics`` of the
    checkpoint: ``auc_mc``, ``auc_mc_ci`` {``lo``, ``hi``}, ``n_images``, ``data``), and whether the CI excludes
    chance. Anything missing or malformed reads as not measured."""

    def per_label(table: object, label: str) -> float | None:
        value = table.get(label) if isinstance(table, Mapping) else None
        return float(value) if isinstance(value, int | float) else None

    ci = metrics.get("auc_mc_ci")
    low, high = (ci.get("lo"), ci.get("hi")) if isinstance(ci, Mapping) else (None, None)
    n_films = metrics.get("n_images") if isinstance(metrics.get("n_images"), int) else None
    data = metrics.get("data")
    source = (
        f"{n_films} held-out films of {data}, the same films that chose the epoch and fitted the calibration "
        "(optimistic; the model card also gives cross-validated figures)"
        if data
        else "not measured"
    )
    out = {}
    for label in spec.trained_labels:
        lo, hi = per_label(low, label), per_label(high, label)
        out[label] = FindingEvidence(
            auroc=per_label(metrics.get("auc_mc"), label),
            ci_low=lo,
            ci_high=hi,
            n_films=n_films,
            source=source,
            better_than_chance=None if lo is None or hi is None else not lo <= 0.5 <= hi,
        )
    return out


def finding(
    result: InferenceResult, spec: ModelSpec, k: int, rule: FindingRule, withheld: Reason | None
) -> FindingPrediction:
    """One finding's numbers and the rule that decided it; with ``withheld`` (a gate fired) no decision is made."""
    se = float(result.standard_error[k])
    return FindingPrediction(
        conf=float(result.mean[k]),
        uncertainty=float(result.variance[k]),
        std=float(result.std[k]),
        mc_standard_error=None if math.isnan(se) else se,  # undefined with one sample
        interval=(float(result.interval[k, 0]), float(result.interval[k, 1])),
        mutual_information=float(result.mutual_information[k]),
        decision=(Decision.UNCERTAIN if withheld else result.decisions[k]).value,
        clear_below=rule.clear_below,
        positive_at=rule.positive_at,
        decided_on=rule.decided_on,
        reason=(withheld or result.reasons[k]).value,  # type: ignore[arg-type]
        threshold=spec.threshold[k],
    )


def build_response(
    *,
    request_id: str,
    model_ref: ModelRef,
    spec: ModelSpec,
    n_samples: int,
    image: ImageFacts,
    result: InferenceResult,
    heatmaps: dict[str, Heatmap],
    queue_s: float,
    inference_s: float,
    total_s: float,
    population: Population | None = None,
    operating: Operating | None = None,
) -> PredictionResponse:
    """The API's response for one image: one entry per trained label, the referral flag, image facts.

    Only the decoded image's format, size, photometric interpretation and decoding warnings are
    reported: nothing from DICOM headers (or the client's declared age and view) that could identify a patient.
    ``population``: the film's :func:`bayesnet.population.assess` verdict with what the client declared (default:
    its header alone). ``operating``: the site's deployment mode and guarantee state, applied to the referral after
    the rule (``service.runtime.operating``; default autonomous, not suspended).
    A film the gates flag keeps its numbers, with every decision withheld (uncertain, ``withheld_*`` reason).
    """
    triage = referral(result, spec, population if population is not None else assess(image))
    withheld = withheld_because(triage)
    withheld_reason = _WITHHELD_REASON[withheld[0]] if withheld else None
    triage = apply_operating(triage, operating or Operating())
    rules = finding_rules(spec)
    predictions = {}
    for label in spec.trained_labels:
        k = spec.label_index(label)
        predictions[label] = finding(result, spec, k, rules[k], withheld_reason)
    return PredictionResponse(
        request_id=request_id,
        model=model_ref,
        mc_samples=n_samples,
        mc_seed=f"{result.seed:016x}",
        predictions=predictions,
        decisions_withheld=withheld,  # type: ignore[arg-type]
        uncertain=any(p.decision == "uncertain" for p in predictions.values()),
        referral=triage,
        ood=ood_result(result, spec),
        gradcam=heatmaps,
        image=ImageInfo(
            format=image.format,  # type: ignore[arg-type]
            width=image.width,
            height=image.height,
            photometric=image.photometric,
            warnings=list(image.warnings),
        ),
        timing_ms=Timing(queue=queue_s * 1e3, inference=inference_s * 1e3, total=total_s * 1e3),
    )
