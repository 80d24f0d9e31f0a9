"""Evaluation maths for multi-label classifiers: discrimination, calibration and uncertainty referral.

Array conventions (shared by the whole training package):

- ``y`` ``(N, K)`` float targets, 0 or 1, with NaN meaning unknown/masked. Every metric skips the NaN
  entries label by label, so a label annotated on only some images is scored on those images.
- ``p`` ``(N, K)`` probabilities in [0, 1] (for the ranking metrics, AUC and referral, any finite score).
- MC samples ``(T, N, K)``; per-image referral scores ``(N,)`` or per finding ``(N, K)``.

A label whose value is undefined (no valid target at all; for AUC also a single class) gets NaN and
never a warning: pytest turns warnings into errors, and a warning per degenerate label would drown a log.
Functions that build reports return plain lists and dicts with ``None`` for NaN so they serialise as
standard JSON.

Only numpy, scipy and scikit-learn: no torch, so evaluation can run on saved prediction arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_auc_score

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Default coverages of the referral curves: keep all images, then refer 5 % more per step down to 50 %.
DEFAULT_COVERAGES: Final[FloatArray] = np.linspace(1.0, 0.5, 11)
#: Probabilities are clipped to [eps, 1 - eps] before taking logs, so a confident mistake costs
#: -log(1e-7) ~ 16 nats instead of infinity.
NLL_EPS: Final = 1e-7
#: Bootstrap resamples are processed in blocks of about this many (resample, image) cells, which bounds
#: memory at a few tens of MB whatever N and n_boot are.
_BOOT_BLOCK_CELLS: Final = 2_000_000


# --- input checking and small helpers ---------------------------------------------------------------


def as_targets(y: ArrayLike) -> FloatArray:
    """``y`` as a float64 ``(N, K)`` array, checked to hold only 0, 1 and NaN.

    Catches the classic CheXpert slip of passing the raw ``-1`` ("uncertain") code, or a blank coded as
    something other than NaN, which would otherwise be scored as a class.
    """
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"targets must be (N, K), got shape {arr.shape}")
    ok = np.isnan(arr) | (arr == 0.0) | (arr == 1.0)
    if not ok.all():
        bad = np.unique(arr[~ok])[:5]
        raise ValueError(f"targets must be 0, 1 or NaN (unknown); found {bad.tolist()}")
    return arr


def _scores_like(y: FloatArray, p: ArrayLike, what: str = "scores") -> FloatArray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape != y.shape:
        raise ValueError(f"{what} have shape {arr.shape} but targets have shape {y.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinity: predictions must be finite (mask targets, not predictions)")
    return arr


def _probabilities_like(y: FloatArray, p: ArrayLike) -> FloatArray:
    arr = _scores_like(y, p, "probabilities")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"probabilities must lie in [0, 1], got range [{arr.min():.4g}, {arr.max():.4g}]")
    return arr


def _per_label_threshold(threshold: ArrayLike | None, n_labels: int) -> FloatArray:
    if threshold is None:
        return np.full(n_labels, 0.5)
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n_labels,)).copy()
    if not np.isfinite(thr).all():
        raise ValueError(f"thresholds must be finite, got {thr.tolist()}")
    return thr


def _coverages(coverages: ArrayLike) -> FloatArray:
    cov = np.atleast_1d(np.asarray(coverages, dtype=np.float64))
    if cov.ndim != 1 or cov.size == 0 or not ((cov > 0.0) & (cov <= 1.0)).all():
        raise ValueError(f"coverages must be a non-empty list of fractions in (0, 1], got {cov.tolist()}")
    return cov


def _n_keep(coverage: float, n: int) -> int:
    """How many of ``n`` items a coverage keeps: round half up, so coverage 1 keeps all and 0.5 of 3 keeps 2."""
    return min(n, math.floor(coverage * n + 0.5))


def _safe_divide(num: NDArray[Any], den: NDArray[Any]) -> FloatArray:
    """``num / den`` with NaN (and no warning) where ``den`` is 0."""
    num64 = np.asarray(num, dtype=np.float64)
    den64 = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num64, den64).shape, np.nan)
    np.divide(num64, den64, out=out, where=den64 != 0)
    return out


def nanmean(values: ArrayLike, axis: int | None = None) -> FloatArray:
    """Mean ignoring NaN, NaN (not a ``RuntimeWarning``) where everything is NaN."""
    arr = np.asarray(values, dtype=np.float64)
    finite = ~np.isnan(arr)
    return _safe_divide(np.where(finite, arr, 0.0).sum(axis=axis), finite.sum(axis=axis))


def json_floats(values: ArrayLike) -> Any:
    """Nested lists of floats with NaN as ``None``: ``json.dumps`` would otherwise write non-standard ``NaN``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return None if np.isnan(arr) else float(arr)
    return [json_floats(row) for row in arr]


# --- AUC --------------------------------------------------------------------------------------------


def per_label_auc(y: ArrayLike, p: ArrayLike) -> FloatArray:
    """ROC-AUC per label ``(K,)`` over the non-NaN targets (scikit-learn); NaN where a label has < 2 classes."""
    targets = as_targets(y)
    scores = _scores_like(targets, p)
    out = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        valid = ~np.isnan(targets[:, k])
        y_k = targets[valid, k]
        n_pos = int(y_k.sum())
        if 0 < n_pos < y_k.size:  # roc_auc_score warns and returns NaN on one class; don't ask it
            out[k] = float(roc_auc_score(y_k, scores[valid, k]))
    return out


@dataclass(frozen=True)
class _SortedLabel:
    """One label's valid entries sorted by score, with tie groups, for many weighted AUCs at once.

    ``rows`` indexes the images (ascending score), ``positive`` is the target in that order and
    ``starts`` are the first positions of each run of equal scores.
    """

    rows: IntArray
    positive: NDArray[np.bool_]
    starts: IntArray

    @classmethod
    def build(cls, y_k: FloatArray, s_k: FloatArray) -> _SortedLabel:
        valid = np.flatnonzero(~np.isnan(y_k))
        rows = valid[np.argsort(s_k[valid], kind="stable")].astype(np.int64)
        sorted_scores = s_k[rows]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) if rows.size else rows
        return cls(rows=rows, positive=y_k[rows] == 1.0, starts=starts.astype(np.int64))


def _weighted_auc(label: _SortedLabel, weights: FloatArray) -> FloatArray:
    """AUC ``(B,)`` of one label under B weightings ``(B, n)`` of its sorted entries.

    Integer weights are bootstrap multiplicities, 0/1 weights select a subset. The AUC is the Mann-Whitney
    statistic, P(score of a positive > score of a negative) + 1/2 P(tie), computed from per-tie-group
    weight sums, so one sort serves every weighting. NaN where a weighting leaves a single class.
    """
    n_rows = weights.shape[0]
    if label.rows.size == 0:
        return np.full(n_rows, np.nan)
    pos_w = np.where(label.positive, weights, 0.0)
    group_pos = np.add.reduceat(pos_w, label.starts, axis=1)
    group_all = np.add.reduceat(weights, label.starts, axis=1)
    group_neg = group_all - group_pos
    neg_below = np.cumsum(group_neg, axis=1) - group_neg
    wins = np.einsum("bg,bg->b", group_pos, neg_below + 0.5 * group_neg)
    return _safe_divide(wins, group_pos.sum(axis=1) * group_neg.sum(axis=1))


def bootstrap_auc(
    y: ArrayLike, p: ArrayLike, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per-label AUC with a percentile bootstrap confidence interval: ``(auc, lo, hi)``, each ``(K,)``.

    Images (rows) are resampled with replacement, the same resample for every label, so the interval
    reflects patient-level sampling variability. A resample in which a label has a single class is
    skipped for that label; lo/hi are the alpha/2 and 1 - alpha/2 quantiles of the remaining resampled
    AUCs (NaN if none remain). ``auc`` is the point estimate on all data (:func:`per_label_auc`).

    Speed: each resample is a vector of multiplicities, and the AUC under multiplicities is computed with
    one sort per label (:func:`_weighted_auc`) shared by every resample, so no resample sorts or copies the images.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    targets = as_targets(y)
    scores = _scores_like(targets, p)
    n_images, n_labels = targets.shape
    auc = per_label_auc(targets, scores)
    lo = np.full(n_labels, np.nan)
    hi = np.full(n_labels, np.nan)
    if n_images == 0:
        return auc, lo, hi
    labels = [_SortedLabel.build(targets[:, k], scores[:, k]) for k in range(n_labels)]
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, n_labels), np.nan)
    block = max(1, _BOOT_BLOCK_CELLS // n_images)
    for start in range(0, n_boot, block):
        n_rows = min(block, n_boot - start)
        draws = rng.integers(0, n_images, size=(n_rows, n_images)) + n_images * np.arange(n_rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_rows * n_images).reshape(n_rows, n_images)
        counts_f = counts.astype(np.float64)
        for k, label in enumerate(labels):
            boot[start : start + n_rows, k] = _weighted_auc(label, counts_f[:, label.rows])
    for k in range(n_labels):
        kept = boot[~np.isnan(boot[:, k]), k]
        if kept.size:
            lo[k], hi[k] = np.quantile(kept, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc, lo, hi


# --- calibration ------------------------------------------------------------------------------------


def reliability_bins(
    y_k: ArrayLike, p_k: ArrayLike, n_bins: int = 15
) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
    """Reliability diagram data for one label: ``(bin_centers, mean_confidence, accuracy, counts)``.

    Bins are ``n_bins`` equal-width intervals of [0, 1]: bin b holds b/n_bins <= p < (b+1)/n_bins, the last
    bin also holds p = 1. ``mean_confidence`` is the mean predicted probability of the positive class in a
    bin, ``accuracy`` the fraction of positive targets there (what the probability should match), both
    NaN for empty bins. NaN targets are skipped. Each output is ``(n_bins,)``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    targets = as_targets(np.asarray(y_k, dtype=np.float64).reshape(-1, 1))[:, 0]
    probs = _probabilities_like(targets, np.asarray(p_k, dtype=np.float64).reshape(-1))
    valid = ~np.isnan(targets)
    targets, probs = targets[valid], probs[valid]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2.0
    index = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    mean_confidence = _safe_divide(np.bincount(index, weights=probs, minlength=n_bins), counts)
    accuracy = _safe_divide(np.bincount(index, weights=targets, minlength=n_bins), counts)
    return centers, mean_confidence, accuracy, counts


def ece(y: ArrayLike, p: ArrayLike, *, n_bins: int = 15) -> FloatArray:
    """Expected calibration error per label ``(K,)``: sum over bins of (n_b / n) |mean p_b - fraction positive_b|.

    Uses the ``n_bins`` (default 15) equal-width bins on [0, 1] of :func:`reliability_bins`, on the
    positive-class probability (each label is its own binary problem, so "confidence" is p, not
    max(p, 1 - p)). NaN for a label without valid targets; a single-class label is still well defined.
    """
    targets = as_targets(y)
    probs = _probabilities_like(targets, p)
    out = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        _, confidence, accuracy, counts = reliability_bins(targets[:, k], probs[:, k], n_bins)
        total = counts.sum()
        if total:
            filled = counts > 0
            out[k] = float(np.sum(counts[filled] / total * np.abs(confidence[filled] - accuracy[filled])))
    return out


def brier(y: ArrayLike, p: ArrayLike) -> FloatArray:
    """Brier score per label ``(K,)``: mean squared difference between probability and 0/1 target.

    NaN for a label without valid targets.
    """
    targets = as_targets(y)
    probs = _probabilities_like(targets, p)
    valid = ~np.isnan(targets)
    squared = np.where(valid, (probs - np.where(valid, targets, 0.0)) ** 2, 0.0)
    return _safe_divide(squared.sum(axis=0), valid.sum(axis=0))


def nll(y: ArrayLike, p: ArrayLike) -> FloatArray:
    """Mean binary cross-entropy per label ``(K,)`` in nats, probabilities clipped to [1e-7, 1 - 1e-7].

    NaN for a label without valid targets.
    """
    targets = as_targets(y)
    probs = np.clip(_probabilities_like(targets, p), NLL_EPS, 1.0 - NLL_EPS)
    valid = ~np.isnan(targets)
    t = np.where(valid, targets, 0.0)
    loss = np.where(valid, -(t * np.log(probs) + (1.0 - t) * np.log1p(-probs)), 0.0)
    return _safe_divide(loss.sum(axis=0), valid.sum(axis=0))


# --- referral ---------------------------------------------------------------------------------------


def _kept_metrics(
    label: _SortedLabel, correct_k: NDArray[np.bool_], keep: FloatArray
) -> tuple[FloatArray, FloatArray, IntArray]:
    """AUC, accuracy and count ``(C,)`` of one label on C kept subsets ``keep`` ``(C, n)`` (0/1, sorted order)."""
    kept = keep.sum(axis=1)
    accuracy = _safe_divide(keep @ correct_k[label.rows].astype(np.float64), kept)
    return _weighted_auc(label, keep), accuracy, kept.astype(np.int64)


def referral_curve(
    y: ArrayLike,
    p: ArrayLike,
    score: ArrayLike,
    *,
    coverages: ArrayLike = DEFAULT_COVERAGES,
    threshold: ArrayLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Does the uncertainty find the errors? Metrics on the images kept after referring the most uncertain.

    For each coverage c the fraction c of images with the LOWEST referral ``score`` is kept (the rest
    would go to a radiologist) and scored: mean per-label AUC and mean per-label accuracy of the decision
    ``p >= threshold`` (the rule of :mod:`bayesnet.decision`; default threshold 0.5, else ``(K,)``).
    If the score tracks the model's mistakes, both rise as coverage falls, above the random baseline of
    :func:`random_referral_curve`.

    ``score`` ``(N,)`` ranks whole images (e.g. the max or mean MC variance over labels): a referred image
    is referred for every label, and each label is scored on its valid targets among the kept images.
    ``score`` ``(N, K)`` refers per finding: each label keeps the fraction c of ITS valid entries. Ties in
    the score are broken by a seeded random order rather than by row order, which may follow the dataset's
    sorting (patients, sites).

    Returns a JSON-ready dict: ``mode`` ("image" or "label"), ``coverage``, ``auc`` and ``accuracy``
    (means over labels with a defined value, one per coverage), ``auc_per_label``/``accuracy_per_label``/
    ``n_kept`` (one list of K per coverage), ``threshold`` and ``n_images``; NaN is written as ``None``.
    """
    targets = as_targets(y)
    probs = _scores_like(targets, p)
    n_images, n_labels = targets.shape
    ranking = np.asarray(score, dtype=np.float64)
    if ranking.shape not in ((n_images,), (n_images, n_labels)):
        raise ValueError(f"score must be (N,) = ({n_images},) or (N, K) = {targets.shape}, got {ranking.shape}")
    if not np.isfinite(ranking).all():
        raise ValueError("referral scores contain NaN or infinity")
    cov = _coverages(coverages)
    thr = _per_label_threshold(threshold, n_labels)
    correct = (probs >= thr) == (targets == 1.0)
    tie_break = np.asarray(np.random.default_rng(seed).random(size=n_images), dtype=np.float64)

    def keep_lowest(values: FloatArray, rows: IntArray) -> FloatArray:
        """0/1 keep matrix ``(C, len(rows))``: per coverage, the lowest-scoring fraction of ``rows``."""
        rank = np.empty(rows.size, dtype=np.int64)
        rank[np.lexsort((tie_break[rows], values[rows]))] = np.arange(rows.size)
        limits = np.array([_n_keep(c, rows.size) for c in cov])
        return (rank[None, :] < limits[:, None]).astype(np.float64)

    auc = np.full((cov.size, n_labels), np.nan)
    accuracy = np.full((cov.size, n_labels), np.nan)
    n_kept = np.zeros((cov.size, n_labels), dtype=np.int64)
    image_keep = keep_lowest(ranking, np.arange(n_images)) if ranking.ndim == 1 else None
    for k in range(n_labels):
        label = _SortedLabel.build(targets[:, k], probs[:, k])
        keep = image_keep[:, label.rows] if image_keep is not None else keep_lowest(ranking[:, k], label.rows)
        auc[:, k], accuracy[:, k], n_kept[:, k] = _kept_metrics(label, correct[:, k], keep)
    return {
        "mode": "image" if ranking.ndim == 1 else "label",
        "coverage": cov.tolist(),
        "auc": json_floats(nanmean(auc, axis=1)),
        "accuracy": json_floats(nanmean(accuracy, axis=1)),
        "auc_per_label": json_floats(auc),
        "accuracy_per_label": json_floats(accuracy),
        "n_kept": n_kept.tolist(),
        "threshold": thr.tolist(),
        "n_images": n_images,
    }


def random_referral_curve(
    y: ArrayLike,
    p: ArrayLike,
    *,
    coverages: ArrayLike = DEFAULT_COVERAGES,
    n_repeats: int = 20,
    seed: int = 0,
    threshold: ArrayLike | None = None,
) -> dict[str, Any]:
    """The baseline for :func:`referral_curve`: refer images at random instead of by uncertainty.

    Each repeat keeps a random fraction c of the images for every coverage c. Returns a JSON-ready dict
    with ``coverage``, ``auc`` and ``accuracy`` (mean over repeats of the mean over labels),
    ``auc_std``/``accuracy_std`` (their spread over repeats), ``auc_per_label`` (mean over repeats, one
    list of K per coverage), ``n_repeats``, ``threshold`` and ``n_images``; NaN is written as ``None``.
    """
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    targets = as_targets(y)
    probs = _scores_like(targets, p)
    n_images, n_labels = targets.shape
    cov = _coverages(coverages)
    thr = _per_label_threshold(threshold, n_labels)
    correct = (probs >= thr) == (targets == 1.0)
    labels = [_SortedLabel.build(targets[:, k], probs[:, k]) for k in range(n_labels)]
    limits = np.array([_n_keep(c, n_images) for c in cov])
    rng = np.random.default_rng(seed)
    auc = np.full((n_repeats, cov.size, n_labels), np.nan)
    accuracy = np.full((n_repeats, cov.size, n_labels), np.nan)
    for r in range(n_repeats):
        rank = rng.permutation(n_images)
        keep = (rank[None, :] < limits[:, None]).astype(np.float64)
        for k, label in enumerate(labels):
            auc[r, :, k], accuracy[r, :, k], _ = _kept_metrics(label, correct[:, k], keep[:, label.rows])
    macro_auc = nanmean(auc, axis=2)  # (R, C)
    macro_accuracy = nanmean(accuracy, axis=2)
    return {
        "coverage": cov.tolist(),
        "auc": json_floats(nanmean(macro_auc, axis=0)),
        "auc_std": json_floats(_nanstd(macro_auc, axis=0)),
        "accuracy": json_floats(nanmean(macro_accuracy, axis=0)),
        "accuracy_std": json_floats(_nanstd(macro_accuracy, axis=0)),
        "auc_per_label": json_floats(nanmean(auc, axis=0)),
        "n_repeats": n_repeats,
        "threshold": thr.tolist(),
        "n_images": n_images,
    }


def _nanstd(values: FloatArray, axis: int) -> FloatArray:
    """Population standard deviation ignoring NaN, without warnings."""
    mean = np.expand_dims(nanmean(values, axis=axis), axis)
    return np.sqrt(nanmean((values - mean) ** 2, axis=axis))


# --- tables -----------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return "n/a" if math.isnan(float(value)) else f"{float(value):.3f}"
    return str(value)


def summary_table(labels: Sequence[str], **columns: ArrayLike | Sequence[Any]) -> str:
    """A Markdown table: one row per label, one column per keyword (``auc=..., ece=...``), K values each.

    Floats are written with 3 decimals, NaN and ``None`` as "n/a", integers and strings as they are.
    Column names are the keywords with ``_`` shown as spaces.
    """
    names = list(labels)
    cols = {
        name.replace("_", " "): list(np.asarray(values, dtype=object).reshape(-1)) for name, values in columns.items()
    }
    for name, values in cols.items():
        if len(values) != len(names):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(names)} labels")
    lines = [
        "| " + " | ".join(["label", *cols]) + " |",
        "|" + "---|" + "---:|" * len(cols),
    ]
    for i, label in enumerate(names):
        lines.append("| " + " | ".join([label, *(_cell(values[i]) for values in cols.values())]) + " |")
    return "\n".join(lines) + "\n"


def print_auc_table(
    labels: Sequence[str], auc: ArrayLike, *, lo: ArrayLike | None = None, hi: ArrayLike | None = None
) -> str:
    """A fixed-width text table of per-label AUCs (optionally with a CI) and their mean, for training logs.

    Returns the text (library code logs, it does not print). The mean is over labels with a defined AUC.
    """
    names = list(labels)
    values = np.asarray(auc, dtype=np.float64).reshape(-1)
    if values.size != len(names):
        raise ValueError(f"{values.size} AUCs for {len(names)} labels")
    with_ci = lo is not None and hi is not None
    lows = np.asarray(lo if lo is not None else np.full(values.size, np.nan), dtype=np.float64).reshape(-1)
    highs = np.asarray(hi if hi is not None else np.full(values.size, np.nan), dtype=np.float64).reshape(-1)
    defined = int((~np.isnan(values)).sum())
    width = max([len(name) for name in names] + [len(f"mean ({defined} labels)"), len("label")])

    def row(name: str, value: float, low: float = math.nan, high: float = math.nan, ci: bool = with_ci) -> str:
        text = f"{name:<{width}}  {_cell(value):>5}"
        if ci:
            text += "  " + ("n/a" if math.isnan(low) or math.isnan(high) else f"[{low:.3f}, {high:.3f}]")
        return text

    body = [row(name, float(values[i]), float(lows[i]), float(highs[i])) for i, name in enumerate(names)]
    mean = row(f"mean ({defined} labels)", float(nanmean(values)), ci=False)
    header = f"{'label':<{width}}  {'AUC':>5}" + ("  CI" if with_ci else "")
    rule = "-" * max(len(line) for line in [header, *body, mean])
    lines = [header, rule, *body, rule, mean]
    return "\n".join(lines) + "\n"
