"""The HTTP contract: every request parameter and response body, as pydantic models in the OpenAPI schema.

Clients of the original project read ``predictions[label].conf`` and ``.uncertainty``: those names stay.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DecisionName = Literal["positive", "negative", "uncertain"]

FindingReason = Literal[
    "cleared",
    "above_positive_threshold",
    "between_thresholds",
    "cannot_be_cleared_by_this_model",
    "both_thresholds_met",
    "no_rule_mc_disagreement",
    "withheld_out_of_distribution",
    "withheld_outside_population",
]

WithheldBecause = Literal["out_of_distribution", "outside_intended_population"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FindingPrediction(_Schema):
    conf: float = Field(description="MC-dropout mean probability after temperature scaling", ge=0, le=1)
    uncertainty: float = Field(description="Variance of the MC sample probabilities (divisor T)", ge=0)
    std: float = Field(description="Standard deviation of the MC sample probabilities", ge=0)
    mc_standard_error: float | None = Field(
        description="Monte-Carlo standard error of conf: sqrt(s^2 / T) with the unbiased sample variance s^2, i.e. "
        "how far conf could move with another draw of the T dropout masks (more mc_samples make it smaller); null "
        "with one sample",
        ge=0,
    )
    interval: tuple[float, float] = Field(description="5th and 95th percentile of the MC sample probabilities")
    mutual_information: float = Field(description="Epistemic uncertainty (nats): H(mean) - mean(H(sample))", ge=0)
    decision: DecisionName = Field(
        description="positive | negative (cleared for this finding) | uncertain (refer). Always follows from "
        "clear_below, positive_at and decided_on in this same object (reason says which case); uncertain with a "
        "withheld_* reason when the film's decisions are withheld (see decisions_withheld)"
    )
    clear_below: float | None = Field(
        description="The deciding rule's clear-below threshold: negative when the decided-on score is below it. "
        "null: this model cannot clear (rule out) this finding at its stated guarantee",
        ge=0,
        le=1,
    )
    positive_at: float | None = Field(
        description="The deciding rule's positive-at threshold: positive when the decided-on score reaches it. "
        "null: this model never calls this finding positive",
        ge=0,
        le=1,
    )
    decided_on: Literal["conf", "interval"] = Field(
        description="Which score the thresholds compare. conf: conf < clear_below clears, conf >= positive_at is "
        "positive. interval: interval[1] (95th percentile) < clear_below clears, interval[0] (5th percentile) >= "
        "positive_at is positive. Both at once, or neither: uncertain"
    )
    reason: FindingReason = Field(
        description="Why this decision: cleared (below clear_below); above_positive_threshold (at or above "
        "positive_at); between_thresholds (neither); cannot_be_cleared_by_this_model (clear_below is null and "
        "positive_at is not reached); both_thresholds_met (below clear_below and at positive_at: refer); "
        "no_rule_mc_disagreement (a model without a referral rule: the MC samples disagree about the threshold); "
        "withheld_out_of_distribution / withheld_outside_population (the film is flagged: no decision is made for "
        "any finding, the numbers are kept for integrators)"
    )
    threshold: float = Field(
        description="Legacy field: the label's point-estimate threshold on conf (Youden's J on the calibration "
        "films). It is NOT the rule that decides when the model has a referral rule (clear_below and positive_at "
        "are); it equals both of them for a model without one",
        gt=0,
        lt=1,
    )


class Heatmap(_Schema):
    png_base64: str = Field(
        description="PNG, base64: 8-bit indexed colour with a transparency table, which browsers and PNG libraries "
        "expand to RGBA (Pillow: .convert('RGBA')); alpha carries the Grad-CAM intensity"
    )
    width: int = Field(description="Heatmap width in pixels (the model's input resolution)")
    height: int = Field(description="Heatmap height in pixels")


class ModelRef(_Schema):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the weights file that produced this result")


class ImageInfo(_Schema):
    format: Literal["png", "jpeg", "dicom"]
    width: int
    height: int
    photometric: str = Field(description="Pillow mode for PNG/JPEG, PhotometricInterpretation for DICOM")
    warnings: list[str] = Field(description="What decoding had to assume or convert")


class Timing(_Schema):
    queue: float = Field(description="Milliseconds waiting for a batch")
    inference: float = Field(description="Milliseconds of the batch's model work")
    total: float = Field(description="Milliseconds from upload received to response built")


class OODResult(_Schema):
    score: float = Field(
        description="Out-of-distribution score: squared distance of the image's pooled trunk features from "
        "those of the training radiographs (see docs/ood.md); larger is further",
        ge=0,
    )
    threshold: float = Field(
        description="The model's threshold: the 99th percentile of adult chest films' cross-fitted scores (docs/ood.md)"
    )
    in_distribution: bool = Field(
        description="score <= threshold. False: this does not look like the frontal chest radiographs the model "
        "was trained on, and its predictions should not be trusted"
    )


ReferralReason = Literal[
    "possible_finding",
    "uncertain_finding",
    "not_cleared_as_normal",
    "out_of_distribution",
    "outside_intended_population",
    "population_unverified",
    "no_referral_rule",
    "shadow_mode",
    "guarantee_suspended",
]


class Referral(_Schema):
    refer: bool = Field(
        description="Send the film to a radiologist. False only for a film the study-level rule cleared as normal, "
        "with no finding positive or uncertain, no gate raised and its population verified (population_verified)"
    )
    reasons: list[ReferralReason] = Field(
        description="Why it is referred: possible_finding (a finding decided positive), uncertain_finding (neither "
        "cleared nor positive under the rule), not_cleared_as_normal (no single finding, but the film as a whole is "
        "not confidently normal), out_of_distribution (the OOD gate), outside_intended_population (DICOM header or "
        "declared patient_age / view: child, lateral or oblique view, not a chest), population_unverified (nothing "
        "establishes an adult frontal chest film: a PNG or JPEG without declared patient_age and view, or a DICOM "
        "header without Patient's Age or View Position; such a film is never cleared), no_referral_rule (the model "
        "has no fitted rule), shadow_mode (the site runs the rule in shadow: every film is read, docs/guarantee.md), "
        "guarantee_suspended (the radiologists' verdicts showed the rule's promise broken, or the watch stopped it: "
        "every film is read until a person re-enables it). A film flagged out_of_distribution or "
        "outside_intended_population gets no finding-based reason: its findings' decisions are withheld"
    )
    mode: Literal["shadow", "supervised", "autonomous"] = Field(
        default="autonomous",
        description="The site's deployment mode for the rule (CXR_GUARANTEE_MODE or the admin API): shadow (every "
        "film referred), supervised (the rule's referral shown, every film still read), autonomous (films the rule "
        "cleared are not sent for reading)",
    )
    review_required: bool = Field(
        default=True,
        description="Whether a radiologist reads this film: refer, or any film outside autonomous mode. Route "
        "worklists by this field",
    )
    population: list[Literal["paediatric", "lateral_or_oblique_view", "non_chest_body_part"]] = Field(
        default_factory=list,
        description="For outside_intended_population: which check fired (header or declared values are never "
        "returned or logged)",
    )
    population_verified: bool = Field(
        default=False,
        description="True when the DICOM header or the declared patient_age and view establish an adult (18 years "
        "or older) frontal (PA or AP) film and nothing puts it outside the population; clearing requires it",
    )
    population_missing: list[Literal["age", "view"]] = Field(
        default_factory=list,
        description="What nobody established (declare it with patient_age / view to make the film clearable)",
    )


class PredictionResponse(_Schema):
    request_id: str
    model: ModelRef
    mc_samples: int
    mc_seed: str = Field(
        description="The seed (16 hex digits) this image's dropout masks were drawn from: a digest of the model "
        "input and the weights' sha256, so the same film gives the same numbers, decisions and heatmaps every time, "
        "whatever else is in its batch, on every replica with the same device type and weights"
    )
    predictions: dict[str, FindingPrediction] = Field(description="One entry per trained label, by label name")
    decisions_withheld: list[WithheldBecause] = Field(
        description="Empty when the findings' decisions apply. Otherwise why no finding is decided: every decision "
        "is uncertain with a withheld_* reason, and conf / interval are kept only for integrators (do not show them "
        "as findings)"
    )
    uncertain: bool = Field(
        description="True when any finding's decision is uncertain (kept for older clients; referral.refer is the "
        "workflow flag: it is also true for positive findings, gates and films not cleared as normal)"
    )
    referral: Referral = Field(description="The triage outcome for the whole film and its reasons")
    ood: OODResult | None = Field(
        default=None,
        description="Out-of-distribution gate: does the image look like a frontal chest radiograph? null when the "
        "model has no gate (e.g. the untrained placeholder): then nothing checks this",
    )
    gradcam: dict[str, Heatmap] = Field(description="Heatmaps for the requested findings, by label name")
    image: ImageInfo
    timing_ms: Timing


class BatchItemError(_Schema):
    status: int
    title: str
    detail: str


class BatchItem(_Schema):
    index: int
    filename: str | None = None
    result: PredictionResponse | None = None
    error: BatchItemError | None = None


class BatchResponse(_Schema):
    request_id: str
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order")


class OODGateInfo(_Schema):
    method: str = Field(description="What the score measures")
    threshold: float
    threshold_quantile: float = Field(description="Quantile of held-out radiographs' scores used as threshold")
    dims: int = Field(description="Dimension of the principal subspace of the features")
    feature_dim: int
    action: Literal["flag", "reject"] = Field(
        description="flag: predictions returned with ood.in_distribution false; reject: 422 without predictions"
    )


class ReferralCalibration(_Schema):
    n_films: int = Field(description="Labelled films the rule was fitted on")
    n_abnormal: int = Field(description="Of them, films with any study finding positive")
    n_normal: int = Field(description="Of them, films with every study finding known and negative")
    prevalence: dict[str, float] = Field(description="Per label: fraction of positive films among those labelled")
    positives: dict[str, int] = Field(description="Per label: number of positive calibration films")
    data: str | None = Field(default=None, description="Name of the calibration file")
    fitted_with: str | None = Field(default=None, description="How the calibration films relate to the others")


class ReferralInfo(_Schema):
    method: str = Field(description="The statistical procedure behind the guarantees")
    score: Literal["mean", "interval"] = Field(
        description="mean: the MC mean is thresholded; interval: a finding is cleared only when the 95th "
        "percentile of its MC samples is below the threshold, called positive only when the 5th reaches it"
    )
    alpha: float = Field(description="Per finding: at most this fraction of positive films is decided negative")
    alpha_positive: float | None = Field(
        description="Per finding: at most this fraction of negative films is decided positive (null: not controlled)"
    )
    study_alpha: float = Field(description="At most this fraction of abnormal films is cleared as normal")
    delta: float = Field(description="Each guarantee holds with probability at least 1 - delta")
    expected_study_referral_rate: float = Field(description="Fraction of calibration films referred by the rule")
    expected_normal_clearance_rate: float = Field(description="Fraction of normal calibration films cleared")
    negative_threshold: dict[str, float | None] = Field(
        description="Per label: negative when the score is below this (null: never cleared at these levels)"
    )
    positive_threshold: dict[str, float | None] = Field(
        description="Per label: positive when the score reaches this (null: never called positive)"
    )
    study_labels: list[str] = Field(description="Findings whose presence makes a film abnormal")
    study_threshold: float | None = Field(
        description="A film is cleared as normal when 1 - prod(1 - score) over the study findings is below this "
        "(null: no film can be cleared at these levels)"
    )
    calibration: ReferralCalibration
    summary: str = Field(description="The guarantee in plain words")


class FindingEvidence(_Schema):
    auroc: float | None = Field(description="ROC AUC of conf for this finding on the films named in source")
    ci_low: float | None = Field(description="Lower end of its bootstrap 95% confidence interval")
    ci_high: float | None = Field(description="Upper end of its bootstrap 95% confidence interval")
    n_films: int | None = Field(description="Films it was measured on")
    source: str = Field(description="Which films, and how they relate to training")
    better_than_chance: bool | None = Field(
        description="False when the interval includes 0.5: the model is not shown to be better than chance at this "
        "finding; null when not measured"
    )


class PromiseStatus(_Schema):
    """One promised miss rate on the site's films with verdicts, and its anytime-valid confidence sequence."""

    limit: float = Field(description="The promised rate: the rule's alpha (study_alpha for the study promise)")
    judged_films: int = Field(description="Films with the finding (study: abnormal films) by the verdicts")
    misses: int = Field(description="Of those, reported negative by the rule (study: cleared as normal)")
    observed: float | None = Field(description="misses / judged_films; null before the first")
    lower: float = Field(description="Lower bound of the confidence sequence")
    upper: float = Field(description="Upper bound of the confidence sequence (valid however often it is read)")
    broken: bool = Field(description="The whole sequence is above the limit: the verdicts show the promise broken")


class GuaranteeStatus(_Schema):
    """The referral rule's guarantee watched on this site's radiologists' verdicts (docs/guarantee.md)."""

    mode: Literal["shadow", "supervised", "autonomous"] = Field(description="The rule's deployment mode")
    state: Literal["active", "suspended"] = Field(
        description="suspended: every film is referred until a person re-enables the rule"
    )
    changed_at: datetime = Field(description="When the mode or state last changed (the audit trail has who and why)")
    change_reason: str = Field(description="Why: first_start, mode_set, miss_rate_exceeded, coverage_below, ...")
    checked_at: datetime = Field(description="When the watch was last computed from the audit trail")
    confidence: float = Field(description="1 - delta of the confidence sequences")
    films: int = Field(description="Films this model scored (answered)")
    referral_rate: float | None = Field(description="Fraction the rule referred")
    expected_referral_rate: float = Field(description="What the rule referred on its calibration films")
    cleared: int = Field(description="Films the rule cleared")
    cleared_with_verdict: int = Field(description="Of those, films with at least one radiologist's verdict")
    coverage: float | None = Field(description="cleared_with_verdict / cleared")
    findings: dict[str, PromiseStatus] = Field(
        description="Per trained finding: of films that have it, reported negative"
    )
    study: PromiseStatus | None = Field(description="Of abnormal films, cleared as normal; null: the rule clears none")
    broken: list[str] = Field(description="Promises the verdicts show broken (finding labels, 'study')")


class ModelCard(_Schema):
    name: str
    version: str
    sha256: str
    arch: str
    labels: list[str]
    trained_labels: list[str]
    untrained_labels: list[str]
    image_size: int
    in_chans: int
    mc_samples: int
    mc_dropout_blocks: int
    dropout: float
    temperature: dict[str, float]
    threshold: dict[str, float]
    uncertainty_threshold: dict[str, float]
    provenance: str
    intended_use: str
    trained: bool = Field(description="False for the placeholder random model: its outputs mean nothing")
    metrics: dict[str, object] = Field(default_factory=dict, description="Measured metrics from the model card")
    card_markdown: str | None = Field(default=None, description="MODEL_CARD.md shipped with the checkpoint")
    ood: OODGateInfo | None = Field(
        default=None, description="The out-of-distribution gate; null: this checkpoint has none (nothing is flagged)"
    )
    referral: ReferralInfo | None = Field(
        default=None,
        description="The risk-controlled referral rule and its guarantees; null: none fitted (every film is referred)",
    )
    can_clear: bool = Field(
        default=False,
        description="False when the rule can rule out no finding (every clear-below threshold null) or clear no "
        "film: then every film goes to a radiologist",
    )
    evidence: dict[str, FindingEvidence] = Field(
        default_factory=dict, description="Per trained finding: how well the model separates it, as measured"
    )
    guarantee: GuaranteeStatus | None = Field(
        default=None,
        description="The rule's promise watched on this site's radiologists' verdicts (POST /v1/outcomes); null: no "
        "rule, or not computed yet",
    )


class Health(_Schema):
    status: Literal["ok"]


class Readiness(_Schema):
    ready: bool
    detail: str
    queue_depth: int
    model: ModelRef | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


class AuditFindingRecord(_Schema):
    conf: float
    std: float
    decision: DecisionName
    interval: tuple[float, float] | None = Field(
        default=None, description="5th and 95th percentile of the MC samples; null in records older than revision 0004"
    )


class AuditRecord(_Schema):
    """One audit-trail entry: one image a prediction route handled, answered or refused (docs/audit.md).

    Never a patient identifier, a DICOM header value or an API key: the input is known by its sha256, the
    client by a key id.
    """

    event_id: str = Field(description="Unique id of this record (uuid4 hex)")
    request_id: str = Field(description="The HTTP request's X-Request-ID")
    item_index: int | None = Field(default=None, description="Position of the file in a batch upload")
    occurred_at: datetime = Field(description="When the request was received (UTC)")
    route: str
    client_id: str | None = Field(description="key-<sha256 prefix> of the API key used; null when keys are off")
    status: int = Field(description="HTTP status answered for this image")
    error: str | None = Field(default=None, description="Problem title of a refusal")
    model: ModelRef
    input_sha256: str
    study_uid_sha256: str | None = Field(
        default=None, description="sha256 of a DICOM upload's Study Instance UID (how verdicts sent by UID find it)"
    )
    sop_uid_sha256: str | None = Field(default=None, description="sha256 of a DICOM upload's SOP Instance UID")
    input_bytes: int
    input_format: Literal["png", "jpeg", "dicom"] | None = None
    width: int | None = None
    height: int | None = None
    photometric: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="What decoding assumed or converted and which invalid DICOM header values the result objects left "
        "out (attribute names, never values)",
    )
    mc_samples: int | None = None
    findings: dict[str, AuditFindingRecord] = Field(default_factory=dict)
    referral: Referral | None = None
    ood: OODResult | None = None
    latency_ms: float


class GuaranteeChange(_Schema):
    """One recorded change of the rule's operating state."""

    at: datetime
    mode: Literal["shadow", "supervised", "autonomous"]
    state: Literal["active", "suspended"]
    previous_state: Literal["active", "suspended"] | None
    reason: str = Field(
        description="first_start, mode_set, miss_rate_exceeded, coverage_below, drift_alert, suspended_by_person, "
        "resumed"
    )
    actor: str = Field(description="settings, service (the automatic stop), or key-<id> of the admin key used")
    detail: str


class GuaranteeOperation(_Schema):
    """``GET /v1/guarantee``: the rule's operating state, its recent changes and its live watch."""

    current: GuaranteeChange
    history: list[GuaranteeChange] = Field(description="The latest changes, newest first (at most 50)")
    watch: GuaranteeStatus | None = Field(description="The live watch; null until first computed")


class GuaranteeAction(_Schema):
    """``POST /v1/guarantee``: a person changes the rule's operating state. Always with a reason, kept in the trail."""

    action: Literal["resume", "suspend", "set_mode"] = Field(
        description="resume (re-enable a suspended rule: after recalibration, or a review of the evidence; its watch "
        "starts afresh), suspend, or set_mode (with mode)"
    )
    mode: Literal["shadow", "supervised", "autonomous"] | None = Field(default=None, description="For set_mode")
    reason: str = Field(min_length=3, max_length=500, description="Why, in words (recorded with the change)")


class OutcomeReceiptBody(_Schema):
    """A submission of radiologists' verdicts, stored whole (``POST /v1/outcomes``)."""

    films: int = Field(description="Films that received at least one verdict or correction")
    verdicts: int = Field(description="Verdicts stored (one per film and finding), corrections included")
    corrected: int = Field(
        default=0,
        description="Of those, corrections that replaced a stored verdict (an amended or corrected report, HL7 "
        "result status C, CSV/NDJSON status corrected); the replaced verdict stays in the trail's correction history",
    )


class AuditPage(_Schema):
    items: list[AuditRecord]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")
