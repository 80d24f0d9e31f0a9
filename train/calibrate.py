"""Fitting the spec's per-label calibration on a validation set: temperature, threshold, referral rule.

``python -m train calibrate`` (:func:`calibrate_checkpoint`) fits, in order, three parameters per label, each
stored in :class:`~bayesnet.spec.ModelSpec` and applied at inference:

1. ``temperature`` T: the service reports ``sigmoid(logit / T)`` (per MC sample, see :mod:`bayesnet.mc`).
   Fitted by minimising the validation NLL (:func:`fit_temperature`).
2. ``threshold``: a finding is positive when the MC-mean probability reaches it. Fitted to maximise
   Youden's J (:func:`fit_thresholds`) on the calibrated probabilities.
3. ``uncertainty_threshold`` u: the finding is "uncertain" (referred) when the fraction of MC samples on
   the other side of the threshold from the mean is >= u (:mod:`bayesnet.decision`). Fitted against a
   referral budget (:func:`fit_uncertainty_thresholds`).

Fit them in that order: the threshold depends on calibrated probabilities, u on both. Labels without
usable targets keep neutral values. Array conventions are those of :mod:`train.metrics`. Then, with
``--referral conformal`` (the default), the risk-controlled referral rule of :mod:`train.conformal`, which
replaces u in the decisions (:mod:`bayesnet.decision`); u is still fitted, for older clients and comparison.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import roc_curve

from bayesnet import load_checkpoint
from bayesnet.checkpoint import SPEC_FILE, load_spec, replace_spec
from bayesnet.decision import disagreement
from bayesnet.spec import ModelSpec, ReferralSpec, per_label
from train.metrics import NLL_EPS, FloatArray, as_targets, ece, json_floats
from train.predict import collect_checkpoint, sigmoid

if TYPE_CHECKING:
    from train.conformal import ReferralFit

logger = logging.getLogger(__name__)

#: Search range of the temperature, on log T: wider than any sane miscalibration, and bounded so a label
#: whose logits carry no signal cannot run off to T = infinity.
TEMPERATURE_BOUNDS: Final = (0.05, 20.0)
#: Fitted decision thresholds are clipped to this closed interval, strictly inside (0, 1) as the spec
#: requires, so that a tiny validation set cannot produce a threshold that flags everything or nothing.
THRESHOLD_BOUNDS: Final = (0.01, 0.99)
#: Candidate uncertainty thresholds u: with T MC samples the disagreement fraction moves in steps of 1/T,
#: so a 0.05 grid is as fine as 20 samples can resolve.
UNCERTAINTY_GRID: Final[tuple[float, ...]] = tuple(round(0.05 * i, 2) for i in range(1, 11))
#: Neutral values, the spec's own defaults: what an untrained or unfittable label keeps.
NEUTRAL_TEMPERATURE: Final = 1.0
NEUTRAL_THRESHOLD: Final = 0.5
NEUTRAL_UNCERTAINTY: Final = 0.2


def _both_classes(y_k: FloatArray) -> bool:
    valid = y_k[~np.isnan(y_k)]
    return bool(valid.size) and 0.0 < valid.sum() < valid.size


def _mc_nll(logits: FloatArray, y: FloatArray) -> float:
    """NLL of the targets ``(n,)`` under the MC-mean of ``sigmoid(logits)`` for logits ``(T, n)``.

    With one sample this is the usual binary cross-entropy, computed from logits without clipping.
    """
    if logits.shape[0] == 1:
        z = logits[0]
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    p = np.clip(expit(logits).mean(axis=0), NLL_EPS, 1.0 - NLL_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def fit_temperature(logits: ArrayLike, y: ArrayLike, *, max_iter: int = 200) -> FloatArray:
    """Per-label temperature ``(K,)`` minimising the NLL of ``sigmoid(logits / T)`` on the non-NaN targets.

    ``logits`` is ``(N, K)`` (deterministic forward pass) or ``(T, N, K)`` MC-sample logits; with samples
    the NLL is that of the MC-mean probability, which is exactly what the service reports, since
    :mod:`bayesnet.mc` divides every sample's logits by T before averaging.

    Optimises log T (bounded Brent, :data:`TEMPERATURE_BOUNDS`): the NLL is smooth and unimodal in it, and
    the bound keeps uninformative labels finite. Labels without both classes get 1.0 (a single-class
    label would otherwise push T to a bound for nothing).
    """
    targets = as_targets(y)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3 or z.shape[1:] != targets.shape:
        raise ValueError(f"logits must be (N, K) or (T, N, K) with (N, K) = {targets.shape}, got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    bounds = (math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))
    out = np.full(targets.shape[1], NEUTRAL_TEMPERATURE)
    for k in range(targets.shape[1]):
        if not _both_classes(targets[:, k]):
            continue
        valid = ~np.isnan(targets[:, k])
        z_k, y_k = z[:, valid, k], targets[valid, k]

        def objective(log_t: float, z_k: FloatArray = z_k, y_k: FloatArray = y_k) -> float:
            return _mc_nll(z_k / math.exp(log_t), y_k)

        result = minimize_scalar(
            objective, bounds=bounds, method="bounded", options={"maxiter": max_iter, "xatol": 1e-5}
        )
        out[k] = math.exp(float(result.x))
    return out


def fit_thresholds(y: ArrayLike, p: ArrayLike, *, method: Literal["youden"] = "youden") -> FloatArray:
    """Per-label decision threshold ``(K,)`` maximising Youden's J = TPR - FPR over the ROC curve.

    The decision is ``p >= threshold`` (:mod:`bayesnet.decision`). Any threshold between the score at the
    optimal ROC point and the next lower distinct score classifies the validation set identically; the
    midpoint is returned (the largest margin either way), so on separable data it falls between the classes.
    Fallback 0.5 where J is undefined (fewer than two classes) or never positive (no threshold beats
    chance). Results are clipped to :data:`THRESHOLD_BOUNDS` = [0.01, 0.99].
    """
    if method != "youden":
        raise ValueError(f"unknown threshold method {method!r}; supported: 'youden'")
    targets = as_targets(y)
    probs = np.asarray(p, dtype=np.float64)
    if probs.shape != targets.shape or not np.isfinite(probs).all():
        raise ValueError(f"probabilities must be finite and shaped like the targets {targets.shape}, got {probs.shape}")
    out = np.full(targets.shape[1], NEUTRAL_THRESHOLD)
    for k in range(targets.shape[1]):
        if not _both_classes(targets[:, k]):
            continue
        valid = ~np.isnan(targets[:, k])
        fpr, tpr, cuts = roc_curve(targets[valid, k], probs[valid, k], drop_intermediate=False)
        j = tpr - fpr
        best = int(np.argmax(j))
        if j[best] <= 0.0 or not np.isfinite(cuts[best]):
            continue
        # cuts decrease; cuts[best + 1] is the next lower distinct score (absent when best is the last).
        lower = cuts[best + 1] if best + 1 < cuts.size else cuts[best]
        out[k] = (cuts[best] + lower) / 2.0
    clipped: FloatArray = np.clip(out, *THRESHOLD_BOUNDS)
    return clipped


def _samples_and_thresholds(samples: ArrayLike, thresholds: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(np.asarray(samples))
    if probs.dim() != 3:
        raise ValueError(f"MC samples must be (T, N, K), got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        probs = probs.double()
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float64), dtype=probs.dtype)
    if thr.shape != (probs.shape[2],):
        raise ValueError(f"thresholds must be (K,) = ({probs.shape[2]},), got {tuple(thr.shape)}")
    return probs, thr


def disagreement_fraction(samples: ArrayLike, thresholds: ArrayLike) -> FloatArray:
    """Per image and label ``(N, K)``: fraction of MC samples ``(T, N, K)`` across ``thresholds`` from the mean.

    Delegates to :func:`bayesnet.decision.disagreement`, in the samples' own dtype like the service, so
    fitting and serving cannot disagree about a borderline image.
    """
    probs, thr = _samples_and_thresholds(samples, thresholds)
    return disagreement(probs, thr).double().numpy()


def uncertain_mask(samples: ArrayLike, thresholds: ArrayLike, uncertainty_threshold: ArrayLike) -> NDArray[np.bool_]:
    """``(N, K)`` True where the decision rule of :mod:`bayesnet.decision` calls a finding uncertain."""
    probs, thr = _samples_and_thresholds(samples, thresholds)
    limit = torch.as_tensor(np.asarray(uncertainty_threshold, dtype=np.float64), dtype=probs.dtype)
    return (disagreement(probs, thr) >= limit).numpy()


def fit_uncertainty_thresholds(
    y: ArrayLike,
    samples: ArrayLike,
    thresholds: ArrayLike,
    *,
    target_referral: float = 0.1,
    grid: tuple[float, ...] = UNCERTAINTY_GRID,
) -> FloatArray:
    """Per-label uncertainty threshold u ``(K,)`` in (0, 0.5] that spends a referral budget on errors.

    ``samples`` are calibrated MC probabilities ``(T, N, K)``, ``thresholds`` the decision thresholds
    ``(K,)``. A finding is referred when its disagreement fraction is >= u; lowering u refers a superset.

    Rule, per label, over the candidate ``grid`` (default 0.05, 0.10, ..., 0.50):

    1. Feasible: u refers at most ``target_referral`` of ALL images (labelled or not: the rate a
       deployment will see does not depend on which validation images happen to be annotated).
    2. Among feasible u, catch the most errors (decision ``mean >= threshold`` disagreeing with a
       non-NaN target) among the referred: because the referred sets are nested, that is the smallest
       feasible u, unless some larger u refers the same errors with fewer images.
    3. Among those, take the largest u: the fewest referrals for the same errors, i.e. the highest error
       rate among the referred.

    Maximising the error *rate* alone was rejected: it favours a handful of referrals (a single referred
    error scores 100 %) and leaves most of the budget, and most errors, unused. If even the largest u
    exceeds the budget, the largest is returned (the fewest referrals the rule allows) and a log warning
    says so. Labels without valid targets get 0.2, the spec's neutral value.
    """
    if not 0.0 <= target_referral <= 1.0:
        raise ValueError(f"target_referral must be a fraction in [0, 1], got {target_referral}")
    candidates = np.asarray(sorted(grid), dtype=np.float64)
    if candidates.size == 0 or not ((candidates > 0.0) & (candidates <= 0.5)).all():
        raise ValueError(f"uncertainty grid values must lie in (0, 0.5], got {list(grid)}")
    targets = as_targets(y)
    probs, thr = _samples_and_thresholds(samples, thresholds)
    if tuple(probs.shape[1:]) != targets.shape:
        raise ValueError(f"samples are {tuple(probs.shape)} but targets are {targets.shape}")
    # Compare in the samples' dtype, as the service does: in float32, 7/20 and u = 0.35 round to the same
    # value and the image is referred; comparing a float32 fraction with float64 u would say otherwise.
    spread = disagreement(probs, thr)  # (N, K)
    limits = torch.as_tensor(candidates, dtype=probs.dtype)
    wrong = (probs.mean(dim=0) >= thr).numpy() != (targets == 1.0)  # (N, K), meaningful where y is valid
    n_images = targets.shape[0]
    out = np.full(targets.shape[1], NEUTRAL_UNCERTAINTY)
    for k in range(targets.shape[1]):
        valid = ~np.isnan(targets[:, k])
        if not valid.any():
            continue
        referred = (spread[:, k][None, :] >= limits[:, None]).numpy()  # (U, N)
        rate = referred.sum(axis=1) / n_images
        feasible = rate <= target_referral + 1e-12
        if not feasible.any():
            logger.warning(
                "label %d: even u=%.2f refers %.1f%% of images, above the %.1f%% budget; using it anyway",
                k,
                candidates[-1],
                100.0 * rate[-1],
                100.0 * target_referral,
            )
            out[k] = candidates[-1]
            continue
        caught = (referred & (wrong[:, k] & valid)[None, :]).sum(axis=1)
        best = caught[feasible].max()
        out[k] = candidates[feasible & (caught == best)].max()
    return out


def bump_version(version: str, suffix: str = "cal") -> str:
    """The version of a calibrated spec: a PEP 440 local label, ``"0.1.0"`` -> ``"0.1.0+cal"``.

    The public part stays that of the trained weights (calibration changes no weight). Idempotent:
    recalibrating ``"0.1.0+cal"`` keeps it; another local label is extended (``"0.1.0+gpu"`` ->
    ``"0.1.0+gpu.cal"``).
    """
    if not suffix or not suffix.replace(".", "").isalnum():
        raise ValueError(f"version suffix must be alphanumeric (dots allowed), got {suffix!r}")
    public, plus, local = version.partition("+")
    if not plus:
        return f"{version}+{suffix}"
    if local.split(".")[-len(suffix.split(".")) :] == suffix.split("."):
        return version
    return f"{public}+{local}.{suffix}"


def _by_label(spec: ModelSpec, values: ArrayLike | Mapping[str, float], neutral: float) -> tuple[float, ...]:
    """Per-label values in spec order, with untrained labels reset to ``neutral``."""
    fitted = per_label(spec, values if isinstance(values, Mapping) else np.asarray(values).tolist(), neutral)
    return tuple(v if lb in spec.trained_labels else neutral for lb, v in zip(spec.labels, fitted, strict=True))


def _label_dict(spec: ModelSpec, values: ArrayLike) -> dict[str, float | None]:
    floats = json_floats(np.asarray(values, dtype=np.float64).reshape(-1))
    if len(floats) != spec.num_classes:
        raise ValueError(f"{len(floats)} values for {spec.num_classes} labels")
    return dict(zip(spec.labels, floats, strict=True))


def calibrated_spec(
    spec: ModelSpec,
    *,
    temperature: ArrayLike | Mapping[str, float],
    threshold: ArrayLike | Mapping[str, float],
    uncertainty_threshold: ArrayLike | Mapping[str, float],
    version_suffix: str = "cal",
    n_images: int | None = None,
    ece_before: ArrayLike | None = None,
    ece_after: ArrayLike | None = None,
    details: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """``spec`` with fitted calibration: per-label tuples, a bumped version and a record in ``extra``.

    Values are ``(K,)`` in the spec's label order or mappings by label name (missing names neutral).
    Labels not in ``spec.trained_labels`` keep neutral values (T = 1, threshold 0.5, u = 0.2): their
    outputs mean nothing, and a fitted value would only dress noise up as calibration. The version gets
    a local label (:func:`bump_version`). ``extra["calibration"]`` (replaced, the rest of ``extra`` kept)
    records the methods, ``n_images``, ECE before/after per label when given, and ``details`` merged on top
    (e.g. ``{"target_referral": 0.1}``). The result is validated by ``ModelSpec`` itself.
    """
    record: dict[str, Any] = {
        "method": {
            "temperature": "per-label NLL minimisation of sigmoid(logit / T), bounded search on log T",
            "threshold": "per-label Youden's J (TPR - FPR) maximum, midpoint between scores",
            "uncertainty_threshold": "per-label smallest-referral u catching the most errors within the budget",
        },
        "neutral_labels": list(spec.untrained_labels),
    }
    if n_images is not None:
        record["n_images"] = int(n_images)
    if ece_before is not None:
        record["ece_before"] = _label_dict(spec, ece_before)
    if ece_after is not None:
        record["ece_after"] = _label_dict(spec, ece_after)
    if details:
        record.update(details)
    return spec.replace(
        temperature=_by_label(spec, temperature, NEUTRAL_TEMPERATURE),
        threshold=_by_label(spec, threshold, NEUTRAL_THRESHOLD),
        uncertainty_threshold=_by_label(spec, uncertainty_threshold, NEUTRAL_UNCERTAINTY),
        version=bump_version(spec.version, version_suffix),
        extra={**spec.extra, "calibration": record},
    )


ReferralMethod = Literal["conformal", "disagreement"]

#: Levels at which ``calibrate`` tabulates and plots the trade-off between the guarantee and films referred.
TRADEOFF_ALPHAS: Final[tuple[float, ...]] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def calibrate_checkpoint(
    checkpoint: Path,
    csv: Path,
    *,
    out: Path | None = None,
    mc_samples: int = 20,
    target_referral: float = 0.1,
    referral: ReferralMethod = "conformal",
    alpha: float = 0.1,
    delta: float = 0.1,
    study_alpha: float = 0.1,
    alpha_positive: float | None = 0.1,
    referral_score: Literal["mean", "interval"] = "mean",
    seed: int = 0,
) -> ModelSpec:
    """Fit temperature, thresholds and the referral rule on ``csv``; write the spec as a new version.

    ``referral="conformal"`` (:mod:`train.conformal`) fits the risk-controlled rule at ``alpha`` / ``study_alpha``
    / ``delta`` and writes ``referral_report.json`` and ``referral_tradeoff.png`` beside the spec;
    ``"disagreement"`` keeps the older MC-disagreement rule (:func:`fit_uncertainty_thresholds`). The weights file
    is copied byte for byte (never re-encoded). Everything is fitted before anything is written, and ``out`` is
    assembled in a temporary directory and moved into place, so a failure leaves nothing half-written.

    Raises:
        train.conformal.ReferralInputError: levels outside (0, 1), a CSV without the model's label columns, or
            calibration films that cannot support the rule (e.g. a trained label with no positive film).
    """
    from train.card import REFERRAL_HEADING, referral_section, with_section
    from train.chexpert_csv import annotated_labels
    from train.conformal import ReferralInputError, fit_referral, tradeoff
    from train.plots import referral_tradeoff_plot

    if referral not in ("conformal", "disagreement"):
        raise ReferralInputError(f"unknown referral method {referral!r}; use 'conformal' or 'disagreement'")
    for name, value in (("alpha", alpha), ("delta", delta), ("study_alpha", study_alpha)):
        if not 0.0 < value < 1.0:
            raise ReferralInputError(f"--{name.replace('_', '-')} must be strictly between 0 and 1, got {value}")
    if alpha_positive is not None and not 0.0 < alpha_positive < 1.0:
        raise ReferralInputError(f"--alpha-positive must be strictly between 0 and 1, got {alpha_positive}")
    spec = load_spec(checkpoint)
    present = set(annotated_labels(csv))
    if not present & set(spec.trained_labels):
        raise ReferralInputError(
            f"{csv} has no label column for any finding this model was trained on ({', '.join(spec.trained_labels)}): "
            "calibration needs labelled films"
        )
    model, spec = load_checkpoint(checkpoint)
    preds = collect_checkpoint(model, spec, checkpoint, csv, mc_samples=mc_samples, seed=seed)
    temperature = fit_temperature(preds.mc_logits, preds.y)
    samples = sigmoid(preds.mc_logits / temperature)
    p_before = sigmoid(preds.mc_logits).mean(axis=0)
    p_after = samples.mean(axis=0)
    thresholds = fit_thresholds(preds.y, p_after)
    uncertainty = fit_uncertainty_thresholds(
        preds.y, samples.astype(np.float32), thresholds, target_referral=target_referral
    )
    details: dict[str, Any] = {"data": csv.name, "mc_samples": mc_samples, "referral": referral}
    new_spec = calibrated_spec(
        spec,
        temperature=temperature,
        threshold=thresholds,
        uncertainty_threshold=uncertainty,
        n_images=len(preds.y),
        ece_before=ece(preds.y, p_before),
        ece_after=ece(preds.y, p_after),
        details={**details, "target_referral": target_referral} if referral == "disagreement" else details,
    )
    extra_files: dict[str, bytes] = {}
    if referral == "conformal":
        notes = {
            "data": csv.name,
            "mc_samples": mc_samples,
            "fitted_with": "the same films as the temperature and thresholds (see docs/uncertainty.md)",
        }
        fitted = fit_referral(
            samples,
            preds.y,
            new_spec,
            alpha=alpha,
            delta=delta,
            study_alpha=study_alpha,
            alpha_positive=alpha_positive,
            score=referral_score,
            calibration_notes=notes,
        )
        rows = tradeoff(samples, preds.y, new_spec, alphas=TRADEOFF_ALPHAS, delta=delta, score=referral_score)
        new_spec = new_spec.replace(referral=fitted.spec)
        report = {"rule": fitted.spec.to_dict(), "fit": fitted.report, "tradeoff": rows}
        extra_files["referral_report.json"] = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
        extra_files["referral_tradeoff.png"] = referral_tradeoff_plot(rows, chosen=alpha)
        card = checkpoint / "MODEL_CARD.md"
        if card.is_file():
            section = referral_section(fitted.spec, report)
            extra_files["MODEL_CARD.md"] = with_section(card.read_text(), REFERRAL_HEADING, section).encode()
        logger.info("%s", tradeoff_table(rows, fitted.spec))
    else:
        new_spec = new_spec.replace(referral=None)
    target = out or checkpoint
    write_calibrated(checkpoint, target, new_spec, extra_files)
    logger.info("calibrated spec %s written to %s", new_spec.version, target / SPEC_FILE)
    return new_spec


def tradeoff_table(rows: list[dict[str, float]], rule: ReferralSpec) -> str:
    """The operating points a site can choose from, and the one chosen, as text for the command line."""
    lines = [
        f"referral trade-off on the {rule.calibration.get('n_films', '?')} calibration films "
        f"(alpha = study_alpha, delta = {rule.delta}):",
        "  alpha  films referred  normal films cleared  findings cleared",
    ]
    for row in rows:
        lines.append(
            f"  {row['alpha']:5.2f}  {row['study_referral_rate']:14.1%}  {row['normal_clearance_rate']:20.1%}"
            f"  {row['finding_cleared_rate']:16.1%}"
        )
    lines.append(
        f"chosen: alpha {rule.alpha}, study_alpha {rule.study_alpha}, delta {rule.delta}: "
        f"{rule.expected_study_referral_rate:.1%} of films referred, "
        f"{rule.expected_normal_clearance_rate:.1%} of normal films cleared"
    )
    if rule.study_threshold is None:
        lines.append(
            "  no study-level threshold is supported at these levels by these films: every film is referred. "
            "More labelled films, or a looser study_alpha, are the only honest ways to clear any."
        )
    return "\n".join(lines)


def write_site_rule(
    checkpoint: Path, out: Path | None, spec: ModelSpec, fitted: ReferralFit, notes: Mapping[str, Any]
) -> ModelSpec:
    """``spec`` with the refitted rule as a new version (``+site``), weights untouched, written to ``out`` (default:
    the checkpoint itself) with ``referral_report.json``: what ``calibrate --from-audit`` and ``--from-archive``
    write."""
    new_spec = spec.replace(referral=fitted.spec, version=bump_version(spec.version, "site"))
    report = {"rule": fitted.spec.to_dict(), "fit": fitted.report, "source": dict(notes)}
    extra = {"referral_report.json": (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()}
    write_calibrated(checkpoint, out or checkpoint, new_spec, extra)
    return new_spec


def write_calibrated(source: Path, target: Path, spec: ModelSpec, extra_files: Mapping[str, bytes]) -> None:
    """Write the calibrated checkpoint: weights and gate copied byte for byte, the new spec, the extra files."""
    if target.resolve() == source.resolve():
        for name, data in extra_files.items():
            tmp = target / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target / name)
        replace_spec(target, spec)
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if target.parent.exists() else None))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        for name, data in extra_files.items():
            (staging / name).write_bytes(data)
        replace_spec(staging, spec)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)
