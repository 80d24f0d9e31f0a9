"""The HTTP contract: every request parameter and response body, as pydantic models in the OpenAPI schema.

Clients of the original project read ``predictions[label].conf`` and ``.uncertainty``: those names stay.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DecisionName = Literal["positive", "negative", "uncertain"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FindingPrediction(_Schema):
    conf: float = Field(description="MC-dropout mean probability after temperature scaling", ge=0, le=1)
    uncertainty: float = Field(description="Variance of the MC sample probabilities (divisor T)", ge=0)
    std: float = Field(description="Standard deviation of the MC sample probabilities", ge=0)
    interval: tuple[float, float] = Field(description="5th and 95th percentile of the MC sample probabilities")
    mutual_information: float = Field(description="Epistemic uncertainty (nats): H(mean) - mean(H(sample))", ge=0)
    decision: DecisionName = Field(description="positive | negative | uncertain (the MC samples disagree)")
    threshold: float = Field(description="Decision threshold applied to conf", gt=0, lt=1)


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
    threshold: float = Field(description="The model's calibrated threshold (99th percentile of held-out radiographs)")
    in_distribution: bool = Field(
        description="score <= threshold. False: this does not look like the frontal chest radiographs the model "
        "was trained on, and its predictions should not be trusted"
    )


class PredictionResponse(_Schema):
    request_id: str
    model: ModelRef
    mc_samples: int
    predictions: dict[str, FindingPrediction] = Field(description="One entry per trained label, by label name")
    uncertain: bool = Field(description="True when any finding is uncertain: refer to a radiologist")
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
