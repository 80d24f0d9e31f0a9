"""`ModelSpec`: everything needed to rebuild, feed and interpret a set of weights.

The spec is saved beside the weights (``model.json``) and is the only source of preprocessing, label
order, calibration and decision rules. Nothing downstream reads timm's pretrained config: for a
1-channel model timm still reports RGB mean/std, which would silently mis-normalise radiographs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from bayesnet.errors import SpecError
from bayesnet.labels import CHEXPERT_LABELS

SPEC_FORMAT: Final = "bayesnet.ModelSpec/1"

ResizeMode = Literal["squash", "letterbox"]

#: Default file name of an out-of-distribution gate inside a checkpoint directory.
OOD_FILE: Final = "ood.safetensors"

# ImageNet RGB statistics averaged over channels: a grayscale radiograph replicated to RGB and
# normalised per channel is, for a stem whose RGB kernels were summed, the same as this single value.
_GRAY_IMAGENET_MEAN: Final = (0.449,)
_GRAY_IMAGENET_STD: Final = (0.226,)


_Part = TypeVar("_Part")


def _from_fields(cls: type[_Part], data: Mapping[str, Any], what: str) -> _Part:
    """A spec part from its dict: unknown fields (a newer writer) and bad values are a :class:`SpecError`."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise SpecError(f"{what} has unknown fields {sorted(unknown)} (written by a newer version?)")
    try:
        return cls(**data)
    except TypeError as err:
        raise SpecError(f"invalid {what}: {err}") from err


@dataclass(frozen=True)
class OODSpec:
    """The scalar half of an out-of-distribution gate; its arrays live in ``file`` beside the weights.

    The score of an image is a squared distance of its pooled trunk features from the training images'
    features (see :mod:`bayesnet.ood`): ``||precision^(1/2) B^T (f - mean)||^2`` inside a ``dims``-dimensional
    principal subspace ``B``, plus ``residual_weight`` times the squared norm of what lies outside it.
    ``threshold`` is calibrated on held-out radiographs (their ``threshold_quantile`` score quantile);
    a score above it means "does not look like the images this model was trained on".
    """

    threshold: float
    dims: int
    feature_dim: int
    residual_weight: float = 0.0
    threshold_quantile: float = 0.99
    file: str = OOD_FILE
    sha256: str = ""
    method: str = "pca-shrinkage-mahalanobis"
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def in_distribution(self, score: float) -> bool:
        """Whether a score passes the gate (at or below the threshold)."""
        return score <= self.threshold

    def __post_init__(self) -> None:
        if not (self.threshold >= 0.0 and self.threshold < float("inf")):
            raise SpecError(f"OODSpec.threshold must be a finite non-negative score, got {self.threshold}")
        if not 1 <= self.dims <= self.feature_dim:
            raise SpecError(f"OODSpec.dims must be within 1..feature_dim ({self.feature_dim}), got {self.dims}")
        if not self.residual_weight >= 0.0:
            raise SpecError(f"OODSpec.residual_weight must be >= 0, got {self.residual_weight}")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise SpecError(f"OODSpec.threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if not self.file or "/" in self.file or "\\" in self.file or self.file.startswith("."):
            raise SpecError(f"OODSpec.file must be a plain file name inside the checkpoint, got {self.file!r}")
        object.__setattr__(self, "details", dict(self.details))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["details"] = dict(self.details)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OODSpec:
        return _from_fields(cls, data, "OOD spec")


ReferralScore = Literal["mean", "interval"]

#: The findings a study-level rule combines: every trained label except "No Finding" (which is the absence of them).
NO_FINDING: Final = "No Finding"


@dataclass(frozen=True)
class ReferralSpec:
    """A risk-controlled triage rule fitted by ``python -m train calibrate --referral conformal``.

    Per label ``k`` (see :mod:`bayesnet.referral`): the finding is ``negative`` (auto-cleared) when its
    negative-side score is below ``negative_threshold[k]``, ``positive`` when its positive-side score is at least
    ``positive_threshold[k]``, ``uncertain`` otherwise (also when both hold). ``None`` means the calibration films
    could not support that side of the rule at the chosen levels: it never fires. ``score`` says what is
    thresholded: ``"mean"`` the MC mean probability on both sides, ``"interval"`` the 95th percentile of the MC
    samples for clearing and the 5th for calling positive (the whole MC interval must lie on one side).

    Guarantees (Learn-then-Test with fixed-sequence testing, Angelopoulos et al. 2021), each with probability at
    least ``1 - delta`` over the draw of calibration films, for new films exchangeable with them: per label, the
    fraction of positive films decided negative is at most ``alpha``; where ``alpha_positive`` is set, the fraction
    of negative films decided positive is at most ``alpha_positive``; at study level, the fraction of abnormal
    films (any of ``study_labels`` positive) cleared as normal (study score below ``study_threshold``) is at most
    ``study_alpha``. ``calibration`` records the films the rule was fitted on (size, prevalence, how they were
    chosen) and ``expected_*`` what the rule did on them.
    """

    alpha: float
    study_alpha: float
    delta: float
    negative_threshold: tuple[float | None, ...]
    positive_threshold: tuple[float | None, ...]
    study_labels: tuple[str, ...]
    study_threshold: float | None
    score: ReferralScore = "mean"
    alpha_positive: float | None = None
    expected_study_referral_rate: float = 1.0
    expected_normal_clearance_rate: float = 0.0
    method: str = "learn-then-test, fixed-sequence, Hoeffding-Bentkus p-values (MAPIE risk_control)"
    calibration: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("negative_threshold", "positive_threshold", "study_labels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("alpha", "study_alpha", "delta"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise SpecError(f"ReferralSpec.{name} must be in (0, 1), got {value}")
        if self.alpha_positive is not None and not 0.0 < self.alpha_positive < 1.0:
            raise SpecError(f"ReferralSpec.alpha_positive must be in (0, 1) or None, got {self.alpha_positive}")
        if self.score not in ("mean", "interval"):
            raise SpecError(f"ReferralSpec.score must be 'mean' or 'interval', got {self.score!r}")
        for name in ("negative_threshold", "positive_threshold"):
            for value in getattr(self, name):
                if value is not None and not 0.0 <= value <= 1.0:
                    raise SpecError(f"ReferralSpec.{name} values must be in [0, 1] or None, got {value}")
        if self.study_threshold is not None and not 0.0 <= self.study_threshold <= 1.0:
            raise SpecError(f"ReferralSpec.study_threshold must be in [0, 1] or None, got {self.study_threshold}")
        for name in ("expected_study_referral_rate", "expected_normal_clearance_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SpecError(f"ReferralSpec.{name} must be a fraction, got {getattr(self, name)}")
        object.__setattr__(self, "calibration", dict(self.calibration))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("negative_threshold", "positive_threshold", "study_labels"):
            data[name] = list(data[name])
        data["calibration"] = dict(self.calibration)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferralSpec:
        return _from_fields(cls, data, "referral spec")


@dataclass(frozen=True)
class ModelSpec:
    """A frozen description of one model: architecture, labels, preprocessing, MC dropout and calibration.

    Per-label tuples (``temperature``, ``threshold``, ``uncertainty_threshold``) may be left empty, in
    which case they are filled with their neutral value for every label. ``trained_labels`` empty means
    "all labels were trained".

    Stochastic layers: dropout with rate ``dropout`` always sits before the classifier (the "head");
    ``mc_dropout_blocks`` > 0 also places dropout after each of the last that-many blocks of the
    network, which makes the deterministic trunk shorter and MC sampling more expensive.
    """

    arch: str = "efficientnet_b0"
    labels: tuple[str, ...] = CHEXPERT_LABELS
    in_chans: int = 1
    image_size: int = 224
    mean: tuple[float, ...] = _GRAY_IMAGENET_MEAN
    std: tuple[float, ...] = _GRAY_IMAGENET_STD
    resize: ResizeMode = "squash"
    dropout: float = 0.2
    mc_dropout_blocks: int = 0
    mc_samples: int = 20
    temperature: tuple[float, ...] = ()
    threshold: tuple[float, ...] = ()
    uncertainty_threshold: tuple[float, ...] = ()
    trained_labels: tuple[str, ...] = ()
    name: str = "bayesnet-efficientnet"
    version: str = "0.0.0"
    provenance: str = "untrained: random initialisation"
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    ood: OODSpec | None = None
    referral: ReferralSpec | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("labels", "mean", "std", "temperature", "threshold", "uncertainty_threshold", "trained_labels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if n == 0:
            raise SpecError("ModelSpec.labels is empty: a model needs at least one label")
        if len(set(self.labels)) != n:
            raise SpecError(f"ModelSpec.labels has duplicates: {list(self.labels)}")
        for name, neutral in (("temperature", 1.0), ("threshold", 0.5), ("uncertainty_threshold", 0.2)):
            values = getattr(self, name)
            if not values:
                values = (neutral,) * n
            values = tuple(float(v) for v in values)
            if len(values) != n:
                raise SpecError(f"ModelSpec.{name} has {len(values)} values for {n} labels")
            object.__setattr__(self, name, values)
        if not self.trained_labels:
            object.__setattr__(self, "trained_labels", self.labels)
        unknown = set(self.trained_labels) - set(self.labels)
        if unknown:
            raise SpecError(f"ModelSpec.trained_labels names labels the model does not have: {sorted(unknown)}")
        # Keep trained labels in the model's label order: that order is the contract.
        object.__setattr__(self, "trained_labels", tuple(lb for lb in self.labels if lb in self.trained_labels))
        if self.in_chans not in (1, 3):
            raise SpecError(f"ModelSpec.in_chans must be 1 (grayscale) or 3, got {self.in_chans}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise SpecError(
                f"ModelSpec.mean/std need one value per input channel ({self.in_chans}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise SpecError(f"ModelSpec.std must be positive, got {self.std}")
        if not 32 <= self.image_size <= 4096:
            raise SpecError(f"ModelSpec.image_size must be within 32..4096, got {self.image_size}")
        if self.resize not in ("squash", "letterbox"):
            raise SpecError(f"ModelSpec.resize must be 'squash' or 'letterbox', got {self.resize!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"ModelSpec.dropout must be in [0, 1), got {self.dropout}")
        if self.mc_dropout_blocks < 0:
            raise SpecError(f"ModelSpec.mc_dropout_blocks must be >= 0, got {self.mc_dropout_blocks}")
        if self.mc_samples < 1:
            raise SpecError(f"ModelSpec.mc_samples must be >= 1, got {self.mc_samples}")
        if any(t <= 0 for t in self.temperature):
            raise SpecError(f"ModelSpec.temperature must be positive, got {self.temperature}")
        if any(not 0.0 < t < 1.0 for t in self.threshold):
            raise SpecError(f"ModelSpec.threshold must be in (0, 1), got {self.threshold}")
        if any(not 0.0 < u <= 0.5 for u in self.uncertainty_threshold):
            raise SpecError(f"ModelSpec.uncertainty_threshold must be in (0, 0.5], got {self.uncertainty_threshold}")
        object.__setattr__(self, "extra", dict(self.extra))
        if isinstance(self.ood, Mapping):
            object.__setattr__(self, "ood", OODSpec.from_dict(self.ood))
        if self.ood is not None and not isinstance(self.ood, OODSpec):
            raise SpecError(f"ModelSpec.ood must be an OODSpec or None, got {type(self.ood).__name__}")
        if isinstance(self.referral, Mapping):
            object.__setattr__(self, "referral", ReferralSpec.from_dict(self.referral))
        if self.referral is not None:
            self._check_referral(self.referral)

    def _check_referral(self, referral: ReferralSpec) -> None:
        if not isinstance(referral, ReferralSpec):
            raise SpecError(f"ModelSpec.referral must be a ReferralSpec or None, got {type(referral).__name__}")
        n = len(self.labels)
        for name in ("negative_threshold", "positive_threshold"):
            if len(getattr(referral, name)) != n:
                raise SpecError(f"ModelSpec.referral.{name} has {len(getattr(referral, name))} values for {n} labels")
        unknown = set(referral.study_labels) - set(self.trained_labels)
        if unknown:
            raise SpecError(
                f"ModelSpec.referral.study_labels names labels the model was not trained on: {sorted(unknown)}"
            )

    # --- derived views --------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def untrained_labels(self) -> tuple[str, ...]:
        """Labels the model has an output for but never saw annotated: their outputs mean nothing."""
        return tuple(lb for lb in self.labels if lb not in self.trained_labels)

    def label_index(self, label: str | int) -> int:
        """Index of a label given by name or index, with an error listing the valid names."""
        if isinstance(label, int):
            if not 0 <= label < self.num_classes:
                raise SpecError(f"label index {label} out of range 0..{self.num_classes - 1}")
            return label
        try:
            return self.labels.index(label)
        except ValueError as err:
            raise SpecError(f"unknown label {label!r}; this model's labels are {list(self.labels)}") from err

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": SPEC_FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        data["extra"] = dict(self.extra)
        data["ood"] = self.ood.to_dict() if self.ood is not None else None
        data["referral"] = self.referral.to_dict() if self.referral is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        fmt = data.get("format")
        if fmt != SPEC_FORMAT:
            raise SpecError(f"unsupported spec format {fmt!r}; expected {SPEC_FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"format"}
        if unknown:
            raise SpecError(f"spec has unknown fields {sorted(unknown)} (written by a newer version?)")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "format":
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise SpecError(f"invalid spec: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"spec is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise SpecError("spec JSON must be an object")
        return cls.from_dict(data)


def per_label(spec: ModelSpec, values: Mapping[str, float] | Sequence[float], default: float) -> tuple[float, ...]:
    """Per-label values in the spec's label order from a mapping (missing -> default) or a sequence."""
    if isinstance(values, Mapping):
        unknown = set(values) - set(spec.labels)
        if unknown:
            raise SpecError(f"values given for unknown labels {sorted(unknown)}")
        return tuple(float(values.get(lb, default)) for lb in spec.labels)
    out = tuple(float(v) for v in values)
    if len(out) != spec.num_classes:
        raise SpecError(f"{len(out)} values given for {spec.num_classes} labels")
    return out
