"""Selective prediction: refer the films the model is least sure of, and measure what the rest is worth.

A selective classifier keeps the films it is sure of and refers the others to a radiologist. It is judged
by the **risk-coverage curve** (Geifman & El-Yaniv, NeurIPS 2017): at coverage c, keep the fraction c of
films with the LOWEST uncertainty score and measure the risk on them, here the error rate of the decision
``p >= threshold`` (the rule of :mod:`bayesnet.decision`). The area under that curve, **AURC** (Geifman et
al., ICLR 2019; the metric recommended for failure detection by Jaeger et al., ICLR 2023), summarises a
score in one number: lower is better. Its lower bound, reached by a score that ranks every error last, depends
only on how many errors there are; **E-AURC** = AURC minus that bound isolates the ranking.

Referral is per finding: label k keeps the fraction c of ITS valid films (non-NaN target) with the lowest
score ``s[:, k]``; each label is scored on its own kept films and macro values are means over labels with a
defined value. Ties in a score are broken by a seeded random order, never by row order (which may follow
the dataset's sorting).

Array conventions are those of :mod:`train.metrics`: targets ``y`` ``(N, K)`` with NaN unknown, calibrated
probabilities ``(N, K)``, calibrated MC samples ``(T, N, K)``, thresholds ``(K,)``. Every uncertainty score is
``(N, K)`` and oriented "higher = less sure, refer first". The scores are a registry, :data:`SCORES`:
adding an estimator is one :class:`UncertaintyScore` entry there.

Confidence intervals are percentile bootstraps over films: each resample draws N films with replacement
(the same resamples for every label and every score with the same seed, so differences are paired) and
redoes the whole selection on it, since which films are kept depends on the sample. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from train.metrics import (
    FloatArray,
    IntArray,
    _safe_divide,
    _SortedLabel,
    _weighted_auc,
    as_targets,
    json_floats,
    nanmean,
)

__all__ = [
    "GAIN_COVERAGES",
    "RISK_COVERAGE_GRID",
    "SCORES",
    "STUDY_COVERAGES",
    "TABLE_COVERAGES",
    "ScoreInputs",
    "SelectiveMetrics",
    "StudyReferral",
    "UncertaintyScore",
    "aurc",
    "compute_scores",
    "decision_error",
    "mc_interval",
    "mc_std",
    "mutual_information",
    "optimal_aurc",
    "paired_difference",
    "per_label_refer",
    "percentile_ci",
    "predictive_entropy",
    "random_score",
    "referral_gain",
    "selective_markdown",
    "selective_metrics",
    "selective_report",
    "study_referral",
    "threshold_margin",
]

#: Coverages at which the kept films' AUROC, sensitivity and specificity are reported with CIs.
TABLE_COVERAGES: Final[tuple[float, ...]] = (1.0, 0.9, 0.8, 0.7, 0.5)
#: Coverages of the referral gain (macro AUROC kept minus macro AUROC of all films).
GAIN_COVERAGES: Final[tuple[float, ...]] = (0.8, 0.5)
#: Coverages of the study-level (per film) report.
STUDY_COVERAGES: Final[tuple[float, ...]] = (0.8, 0.5)
#: Coverages of the plotted risk-coverage curve (point estimates only).
RISK_COVERAGE_GRID: Final[FloatArray] = np.round(np.linspace(1.0, 0.02, 50), 4)
#: Statistics of the kept films, each ``(C, K)`` per label.
KEPT_STATISTICS: Final[tuple[str, ...]] = ("auroc", "sensitivity", "specificity", "risk")
#: Bootstrap resamples are drawn in blocks of about this many (resample, film) cells. The blocks depend on N
#: only, so two calls with the same seed and N draw the same resamples (paired differences).
_BOOT_BLOCK_CELLS: Final = 200_000
# Independent random streams derived from one seed.
_TIE_STREAM, _RANDOM_SCORE_STREAM, _BOOT_STREAM = 1, 2, 3

Probability = Literal["mc_mean", "deterministic"]


# --- input checking ---------------------------------------------------------------------------------


def _float_array(name: str, values: ArrayLike, shape: tuple[int | None, ...]) -> FloatArray:
    """``values`` as float64 of the given shape (None = any size), finite; ValueError otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
    ):
        wanted = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise ValueError(f"{name} must have shape {wanted}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinity (mask targets, not predictions)")
    return arr


def _probabilities(name: str, values: ArrayLike, shape: tuple[int | None, ...]) -> FloatArray:
    arr = _float_array(name, values, shape)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min():.4g}, {arr.max():.4g}]")
    return arr


def _coverages(coverages: ArrayLike) -> FloatArray:
    cov = np.atleast_1d(np.asarray(coverages, dtype=np.float64))
    if cov.ndim != 1 or cov.size == 0 or not ((cov > 0.0) & (cov <= 1.0)).all():
        raise ValueError(f"coverages must be a non-empty list of fractions in (0, 1], got {cov.tolist()}")
    return cov


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _tie_break(n_films: int, seed: int) -> FloatArray:
    """A seeded random order ``(N,)`` that breaks ties in a score, shared by every label and score."""
    return np.asarray(_rng(seed, _TIE_STREAM).random(n_films), dtype=np.float64)


# --- uncertainty scores -----------------------------------------------------------------------------


def _binary_entropy(p: FloatArray) -> FloatArray:
    """Entropy in nats of Bernoulli(p), elementwise, with 0 log 0 = 0."""
    q = 1.0 - p
    return -(np.where(p > 0.0, p * np.log(np.where(p > 0.0, p, 1.0)), 0.0)) - np.where(
        q > 0.0, q * np.log(np.where(q > 0.0, q, 1.0)), 0.0
    )


def mc_std(samples: FloatArray) -> FloatArray:
    """Standard deviation ``(N, K)`` of the MC probabilities ``(T, N, K)`` (population, ddof 0)."""
    return np.asarray(samples.std(axis=0), dtype=np.float64)


def predictive_entropy(samples: FloatArray) -> FloatArray:
    """Entropy ``(N, K)``, in nats, of the MC-mean Bernoulli: H(mean_t p_t). Total uncertainty, peaks at 0.5."""
    return _binary_entropy(samples.mean(axis=0))


def mutual_information(samples: FloatArray) -> FloatArray:
    """BALD mutual information ``(N, K)`` in nats: H(mean_t p_t) - mean_t H(p_t), the epistemic part.

    Clipped at 0 against rounding (it is non-negative by Jensen's inequality).
    """
    aleatoric = _binary_entropy(samples).mean(axis=0)
    return np.asarray(np.maximum(_binary_entropy(samples.mean(axis=0)) - aleatoric, 0.0), dtype=np.float64)


def mc_interval(samples: FloatArray, threshold: FloatArray, *, lower: float = 0.05, upper: float = 0.95) -> FloatArray:
    """How far the MC interval crosses the decision threshold ``(N, K)``: ``min(hi - thr, thr - lo)``.

    ``lo`` and ``hi`` are the ``lower`` and ``upper`` quantiles (default 5% and 95%, linear interpolation) of the
    T MC probabilities of a film and label; ``thr`` is that label's threshold ``(K,)``. When the interval
    straddles the threshold, the score is positive: the length of its shorter arm on either side, so an interval
    split evenly across the threshold scores highest. When the whole interval lies on one side, the score is
    minus its distance to the threshold (``-(lo - thr)`` above, ``-(thr - hi)`` below): the further, the surer.
    One continuous formula, 0 when an end of the interval touches the threshold.
    """
    lo, hi = np.quantile(samples, [lower, upper], axis=0)
    return np.asarray(np.minimum(hi - threshold, threshold - lo), dtype=np.float64)


def threshold_margin(p: FloatArray, threshold: FloatArray) -> FloatArray:
    """Minus the distance of a probability ``(N, K)`` to its label's decision threshold ``(K,)``: ``-|p - thr|``."""
    return -np.abs(p - threshold)


def decision_error(p: FloatArray, threshold: FloatArray) -> FloatArray:
    """The probability ``(N, K)`` that the decision ``p >= thr`` is wrong, if ``p`` is calibrated: ``1 - p`` for a
    positive decision, ``p`` for a negative one. Unlike ``-|p - thr|`` it knows that a film just above a low
    threshold (say 0.3 against 0.1) is called positive but is probably negative."""
    return np.where(p >= threshold, 1.0 - p, p)


def random_score(shape: tuple[int, ...], seed: int) -> FloatArray:
    """A seeded uniform score: the "refer at random" reference every other score must beat."""
    return np.asarray(_rng(seed, _RANDOM_SCORE_STREAM).random(shape), dtype=np.float64)


@dataclass(frozen=True)
class ScoreInputs:
    """What an uncertainty score may use, checked: calibrated MC samples ``(T, N, K)``, the calibrated
    deterministic (no-dropout) probabilities ``(N, K)``, the decision thresholds ``(K,)`` and a seed."""

    samples: FloatArray
    p_det: FloatArray
    threshold: FloatArray
    seed: int = 0

    def __post_init__(self) -> None:
        samples = _probabilities("MC samples", self.samples, (None, None, None))
        if samples.shape[0] == 0:
            raise ValueError("MC samples must hold at least one sample (T >= 1)")
        _, n_films, n_labels = samples.shape
        object.__setattr__(self, "samples", samples)
        object.__setattr__(self, "p_det", _probabilities("p_det", self.p_det, (n_films, n_labels)))
        object.__setattr__(self, "threshold", _float_array("threshold", self.threshold, (n_labels,)))

    @property
    def p_mc(self) -> FloatArray:
        """The MC-mean probabilities ``(N, K)``: what the service decides on."""
        return np.asarray(self.samples.mean(axis=0), dtype=np.float64)


@dataclass(frozen=True)
class UncertaintyScore:
    """One registered uncertainty estimator.

    ``compute`` maps :class:`ScoreInputs` to a score ``(N, K)``, higher = less sure. ``probability`` says
    which probabilities its AUROC and decisions use: ``"mc_mean"`` (the service's) or ``"deterministic"``
    (the single no-dropout pass, for the baseline that costs one forward pass).
    """

    name: str
    description: str
    compute: Callable[[ScoreInputs], FloatArray]
    probability: Probability = "mc_mean"

    def probabilities(self, inputs: ScoreInputs) -> FloatArray:
        """The ``(N, K)`` probabilities this score is judged with."""
        return inputs.p_det if self.probability == "deterministic" else inputs.p_mc


#: The registry of uncertainty scores, in report order. Add an estimator here and it is evaluated,
#: tabulated and plotted everywhere.
SCORES: Final[Mapping[str, UncertaintyScore]] = MappingProxyType(
    {
        score.name: score
        for score in (
            UncertaintyScore("mc_std", "standard deviation of the T MC probabilities", lambda i: mc_std(i.samples)),
            UncertaintyScore(
                "mutual_information",
                "H(MC mean) - mean H(MC sample), nats (epistemic)",
                lambda i: mutual_information(i.samples),
            ),
            UncertaintyScore("predictive_entropy", "H(MC mean), nats (total)", lambda i: predictive_entropy(i.samples)),
            UncertaintyScore(
                "mc_interval",
                "min(q95 - thr, thr - q05) of the MC samples: depth of the 5-95% interval across the threshold",
                lambda i: mc_interval(i.samples, i.threshold),
            ),
            UncertaintyScore(
                "baseline_mean",
                "-|MC mean - thr|: distance of the decision to its threshold",
                lambda i: threshold_margin(i.p_mc, i.threshold),
            ),
            UncertaintyScore(
                "decision_error",
                "MC mean p < thr ? p : 1 - p: calibrated probability that the decision is wrong",
                lambda i: decision_error(i.p_mc, i.threshold),
            ),
            UncertaintyScore(
                "baseline_single_pass",
                "-|p_det - thr| from the one no-dropout pass; AUROC and decisions from p_det",
                lambda i: threshold_margin(i.p_det, i.threshold),
                probability="deterministic",
            ),
            UncertaintyScore("random", "seeded uniform: refer at random", lambda i: random_score(i.p_mc.shape, i.seed)),
        )
    }
)


def compute_scores(inputs: ScoreInputs, names: Sequence[str] | None = None) -> dict[str, FloatArray]:
    """Every registered score (or those ``names``), each ``(N, K)``, keyed by name in registry order."""
    wanted = list(SCORES) if names is None else list(names)
    unknown = [name for name in wanted if name not in SCORES]
    if unknown:
        raise ValueError(f"unknown uncertainty scores {unknown}; registered: {list(SCORES)}")
    return {name: SCORES[name].compute(inputs) for name in wanted}


# --- risk-coverage machinery ------------------------------------------------------------------------


@dataclass(frozen=True)
class _RankedLabel:
    """One label's valid films in referral order (lowest score first) and what the kept statistics need.

    Vectors are ``(n,)`` in that order; ``by_probability`` sorts the same films by probability for the AUROC
    and ``to_probability_order`` maps referral positions to that order.
    """

    rows: IntArray
    error: FloatArray
    positive: FloatArray
    true_positive: FloatArray
    true_negative: FloatArray
    by_probability: _SortedLabel
    to_probability_order: IntArray

    @classmethod
    def build(cls, y_k: FloatArray, p_k: FloatArray, thr_k: float, s_k: FloatArray, tie: FloatArray) -> _RankedLabel:
        valid = np.flatnonzero(~np.isnan(y_k))
        rows = valid[np.lexsort((tie[valid], s_k[valid]))].astype(np.int64)
        positive = y_k[rows] == 1.0
        decided = p_k[rows] >= thr_k
        by_probability = _SortedLabel.build(y_k, p_k)
        position = np.empty(y_k.size, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        return cls(
            rows=rows,
            error=(decided != positive).astype(np.float64),
            positive=positive.astype(np.float64),
            true_positive=(positive & decided).astype(np.float64),
            true_negative=(~positive & ~decided).astype(np.float64),
            by_probability=by_probability,
            to_probability_order=position[by_probability.rows],
        )


def _harmonic(n: int) -> FloatArray:
    """Harmonic numbers ``H[0..n]`` (H[0] = 0)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _kept_weights(weights: FloatArray, coverages: FloatArray) -> FloatArray:
    """How many copies of each film are kept ``(B, C, n)``, from multiplicities ``(B, n)`` in referral order.

    With multiplicities the resample is the referral order with copies adjacent, so keeping the first
    ``round(c * total)`` of it keeps a prefix of films, the last one possibly in part.
    """
    cum = np.cumsum(weights, axis=1)
    before = cum - weights
    total = cum[:, -1:]
    limit = np.minimum(total, np.floor(coverages[None, :] * total + 0.5))  # (B, C), round half up
    return np.clip(limit[:, :, None] - before[:, None, :], 0.0, weights[:, None, :])


def _aurc_weighted(error: FloatArray, weights: FloatArray, harmonic: FloatArray) -> FloatArray:
    """AURC ``(B,)`` of a referral order with 0/1 ``error`` ``(n,)`` under multiplicities ``(B, n)``.

    AURC = (1/M) sum_{i=1..M} errors(first i) / i over the M = sum(w) expanded films. Film j occupies
    positions b+1..b+w (b films before it, E errors before it), contributing
    sum_m (E + e m) / (b + m) = e w + (E - e b) (H[b + w] - H[b]) with harmonic numbers H: exact, no loop.
    """
    cum = np.cumsum(weights, axis=1)
    before = cum - weights
    error_weight = weights * error
    errors_before = np.cumsum(error_weight, axis=1) - error_weight
    d_harmonic = harmonic[cum.astype(np.int64)] - harmonic[before.astype(np.int64)]
    area = (error_weight + (errors_before - error * before) * d_harmonic).sum(axis=1)
    return _safe_divide(area, cum[:, -1] if cum.shape[1] else np.zeros(cum.shape[0]))


def _label_statistics(
    label: _RankedLabel, weights: FloatArray, coverages: FloatArray, harmonic: FloatArray
) -> tuple[dict[str, FloatArray], FloatArray]:
    """Kept-film statistics ``(B, C)`` (and ``n_kept``) and the AURC ``(B,)`` of one label under ``weights``."""
    n_rows, n = weights.shape
    if n == 0:
        nan = np.full((n_rows, coverages.size), np.nan)
        stats = {name: nan for name in KEPT_STATISTICS}
        return {**stats, "n_kept": np.zeros_like(nan)}, np.full(n_rows, np.nan)
    kept = _kept_weights(weights, coverages)
    n_kept = kept.sum(axis=2)
    n_positive = kept @ label.positive
    auroc = _weighted_auc(label.by_probability, kept[:, :, label.to_probability_order].reshape(-1, n))
    stats = {
        "auroc": auroc.reshape(n_rows, coverages.size),
        "sensitivity": _safe_divide(kept @ label.true_positive, n_positive),
        "specificity": _safe_divide(kept @ label.true_negative, n_kept - n_positive),
        "risk": _safe_divide(kept @ label.error, n_kept),
        "n_kept": n_kept,
    }
    return stats, _aurc_weighted(label.error, weights, harmonic)


def percentile_ci(boot: FloatArray, alpha: float = 0.05) -> tuple[FloatArray, FloatArray]:
    """Percentile interval ``(lo, hi)`` over axis 0 of bootstrap values ``(B, ...)``, ignoring NaN resamples.

    NaN (and no warning) where every resample is NaN or there are none.
    """
    shape = boot.shape[1:]
    if boot.shape[0] == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    empty = np.asarray(np.isnan(boot).all(axis=0))
    filled = np.where(empty[None], 0.0, boot)
    lo, hi = np.nanquantile(filled, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


@dataclass(frozen=True)
class SelectiveMetrics:
    """Selective-prediction metrics of one score, per label, with bootstrap resamples.

    ``per_label[stat]`` is ``(C, K)`` for each of :data:`KEPT_STATISTICS` and ``n_kept``, at ``coverage``
    ``(C,)``; ``aurc``/``e_aurc`` are ``(K,)``. ``boot[stat]`` ``(B, C, K)`` and ``boot_aurc`` ``(B, K)`` hold the
    same statistics on each of the B bootstrap resamples (B = 0 when not bootstrapped).
    """

    coverage: FloatArray
    per_label: Mapping[str, FloatArray]
    aurc: FloatArray
    e_aurc: FloatArray
    boot: Mapping[str, FloatArray]
    boot_aurc: FloatArray
    alpha: float = 0.05

    def index(self, coverage: float) -> int:
        """Position of ``coverage`` in :attr:`coverage`; ValueError when it was not computed."""
        hits = np.flatnonzero(np.isclose(self.coverage, coverage))
        if hits.size == 0:
            raise ValueError(f"coverage {coverage} was not computed (have {self.coverage.tolist()})")
        return int(hits[0])

    def macro(self, stat: str) -> FloatArray:
        """Mean over labels with a defined value ``(C,)`` of a kept-film statistic."""
        return nanmean(self.per_label[stat], axis=1)

    def macro_boot(self, stat: str) -> FloatArray:
        """The macro statistic on each resample ``(B, C)``."""
        return nanmean(self.boot[stat], axis=2)

    @property
    def macro_aurc(self) -> float:
        return float(nanmean(self.aurc))

    @property
    def macro_aurc_boot(self) -> FloatArray:
        """Macro AURC on each resample ``(B,)``."""
        return nanmean(self.boot_aurc, axis=1)


def _check_selection_inputs(
    y: ArrayLike, p: ArrayLike, threshold: ArrayLike, score: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    targets = as_targets(y)
    n_films, n_labels = targets.shape
    probs = _probabilities("probabilities", p, (n_films, n_labels))
    thr = _float_array("threshold", threshold, (n_labels,))
    ranking = _float_array("score", score, (n_films, n_labels))
    return targets, probs, thr, ranking


def _boot_blocks(n_films: int, n_boot: int, seed: int) -> list[IntArray]:
    """Bootstrap multiplicities ``(b, N)`` in blocks whose sizes depend on N only (same seed, same resamples)."""
    rng = _rng(seed, _BOOT_STREAM)
    block = max(1, _BOOT_BLOCK_CELLS // max(1, n_films))
    blocks = []
    for start in range(0, n_boot, block):
        n_rows = min(block, n_boot - start)
        draws = rng.integers(0, n_films, size=(n_rows, n_films)) + n_films * np.arange(n_rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_rows * n_films).reshape(n_rows, n_films)
        blocks.append(counts.astype(np.int64))
    return blocks


def selective_metrics(
    y: ArrayLike,
    p: ArrayLike,
    threshold: ArrayLike,
    score: ArrayLike,
    *,
    coverages: ArrayLike = TABLE_COVERAGES,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> SelectiveMetrics:
    """Risk, AUROC, sensitivity and specificity of the kept films, and AURC, per label, with bootstrap resamples.

    ``y`` ``(N, K)`` targets (NaN skipped), ``p`` ``(N, K)`` probabilities (AUROC and the decision
    ``p >= threshold``), ``threshold`` ``(K,)``, ``score`` ``(N, K)`` higher = refer first. Label k keeps the
    ``round(c * n_k)`` of its ``n_k`` valid films with the lowest score (ties: seeded random order). Kept AUROC,
    sensitivity or specificity is NaN where the kept films of a label lack a class; everything is NaN for a
    label without valid films.

    Bootstrap (``n_boot`` resamples, 0 for none): films are drawn with replacement and the selection is redone
    on each resample (a film drawn twice takes two adjacent places in the referral order). Resamples depend
    only on ``seed`` and N, so results of different scores are paired resample by resample.
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    targets, probs, thr, ranking = _check_selection_inputs(y, p, threshold, score)
    cov = _coverages(coverages)
    n_films, n_labels = targets.shape
    tie = _tie_break(n_films, seed)
    labels = [
        _RankedLabel.build(targets[:, k], probs[:, k], float(thr[k]), ranking[:, k], tie) for k in range(n_labels)
    ]
    harmonic = _harmonic(n_films)
    names = (*KEPT_STATISTICS, "n_kept")
    per_label = {name: np.full((cov.size, n_labels), np.nan) for name in names}
    aurc_point = np.full(n_labels, np.nan)
    best = np.full(n_labels, np.nan)
    boot = {name: np.full((n_boot, cov.size, n_labels), np.nan) for name in KEPT_STATISTICS}
    boot_aurc = np.full((n_boot, n_labels), np.nan)
    for k, label in enumerate(labels):
        stats, area = _label_statistics(label, np.ones((1, label.rows.size)), cov, harmonic)
        for name in names:
            per_label[name][:, k] = stats[name][0]
        aurc_point[k] = area[0]
        best[k] = _aurc_weighted(np.sort(label.error), np.ones((1, label.rows.size)), harmonic)[0]
    start = 0
    for counts in _boot_blocks(n_films, n_boot, seed) if n_boot else []:
        stop = start + counts.shape[0]
        for k, label in enumerate(labels):
            stats, area = _label_statistics(label, counts[:, label.rows].astype(np.float64), cov, harmonic)
            for name in KEPT_STATISTICS:
                boot[name][start:stop, :, k] = stats[name]
            boot_aurc[start:stop, k] = area
        start = stop
    return SelectiveMetrics(
        coverage=cov,
        per_label=per_label,
        aurc=aurc_point,
        e_aurc=aurc_point - best,
        boot=boot,
        boot_aurc=boot_aurc,
        alpha=alpha,
    )


def aurc(y: ArrayLike, p: ArrayLike, threshold: ArrayLike, score: ArrayLike, *, seed: int = 0) -> FloatArray:
    """AURC per label ``(K,)``: the mean, over n = 1..n_k kept films, of the error rate of the n lowest-scored.

    Errors are those of the decision ``p >= threshold``; NaN for a label without valid targets. Lower is better.
    """
    return selective_metrics(y, p, threshold, score, coverages=[1.0], n_boot=0, seed=seed).aurc


def optimal_aurc(y: ArrayLike, p: ArrayLike, threshold: ArrayLike) -> FloatArray:
    """The lowest AURC any score can reach per label ``(K,)``: every error ranked after every correct film.

    With r errors among n films it is (1/n) sum_{i=n-r+1..n} (i - n + r) / i, about r/n + (1 - r/n) ln(1 - r/n).
    """
    targets = as_targets(y)
    errors = (np.asarray(p, dtype=np.float64) >= np.asarray(threshold, dtype=np.float64)) != (targets == 1.0)
    score = errors.astype(np.float64)  # errors score highest: referred first
    return aurc(targets, p, threshold, score)


def paired_difference(a: FloatArray, b: FloatArray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI ``(lo, hi)`` of ``a - b`` over paired bootstrap values ``(B,)``."""
    lo, hi = percentile_ci((np.asarray(a) - np.asarray(b))[:, None], alpha)
    return float(lo[0]), float(hi[0])


def referral_gain(metrics: SelectiveMetrics, coverage: float) -> tuple[float, float, float]:
    """Macro AUROC of the kept films at ``coverage`` minus that of all films: ``(gain, lo, hi)``.

    The CI is the percentile bootstrap of the difference computed on each resample (paired).
    """
    at, full = metrics.index(coverage), metrics.index(1.0)
    macro = metrics.macro("auroc")
    boot = metrics.macro_boot("auroc")
    lo, hi = paired_difference(boot[:, at], boot[:, full], metrics.alpha)
    return float(macro[at] - macro[full]), lo, hi


# --- study level ------------------------------------------------------------------------------------


def per_label_refer(y: ArrayLike, score: ArrayLike, coverage: float, *, seed: int = 0) -> NDArray[np.bool_]:
    """Which findings a per-label selective rule refers ``(N, K)``, at ``coverage``.

    For label k, the ``round(coverage * n_k)`` lowest-scored of its n_k valid films are kept (ties: the seeded
    order of :func:`selective_metrics`); this sets a score cut-off, which is applied to every film, so a film
    whose target is unknown is kept or referred by its score like any other. Coverage 1 refers nothing, and a
    label without valid targets (one the model was not trained on) is never referred.
    """
    targets = as_targets(y)
    n_films, n_labels = targets.shape
    ranking = _float_array("score", score, (n_films, n_labels))
    cov = float(_coverages(coverage)[0])
    tie = _tie_break(n_films, seed)
    refer = np.zeros((n_films, n_labels), dtype=bool)
    for k in range(n_labels):
        valid = ~np.isnan(targets[:, k])
        n_valid = int(valid.sum())
        n_keep = min(n_valid, int(np.floor(cov * n_valid + 0.5)))
        if n_keep == n_valid:
            continue
        order = np.lexsort((tie, ranking[:, k]))  # every film, lowest score first
        last_kept = np.flatnonzero(valid[order])[n_keep - 1] if n_keep else -1
        refer[order[last_kept + 1 :], k] = True
    return refer


@dataclass(frozen=True)
class StudyReferral:
    """What a per-finding referral means per film (study level).

    ``referred_fraction``: films with at least one finding referred (the radiologist reads the whole film);
    ``referred_fraction_per_label`` ``(K,)``. ``miss_rate`` ``(K,)``: among the true positives of label k whose
    label k was not referred, the fraction decided negative. ``miss_rate_cleared_films`` ``(K,)``: the same
    among films not referred at all. ``abnormal_cleared``: abnormal films (a positive finding) that were not
    referred and decided negative on every finding, over all abnormal films: what would leave unread.
    """

    n_films: int
    referred_fraction: float
    referred_fraction_per_label: FloatArray
    miss_rate: FloatArray
    miss_rate_cleared_films: FloatArray
    n_abnormal: int
    n_abnormal_cleared: int
    abnormal_cleared: float

    @property
    def macro_miss_rate(self) -> float:
        return float(nanmean(self.miss_rate))

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        def per_label(values: FloatArray) -> dict[str, float | None]:
            return dict(zip(labels, json_floats(values), strict=True))

        return {
            "n_films": self.n_films,
            "referred_fraction": self.referred_fraction,
            "referred_fraction_per_label": per_label(self.referred_fraction_per_label),
            "miss_rate": per_label(self.miss_rate),
            "macro_miss_rate": json_floats(self.macro_miss_rate),
            "miss_rate_cleared_films": per_label(self.miss_rate_cleared_films),
            "n_abnormal": self.n_abnormal,
            "n_abnormal_cleared": self.n_abnormal_cleared,
            "abnormal_cleared": json_floats(self.abnormal_cleared),
        }


def study_referral(
    y: ArrayLike,
    p: ArrayLike,
    threshold: ArrayLike,
    refer: ArrayLike,
    *,
    findings: ArrayLike | None = None,
) -> StudyReferral:
    """Study-level consequences of referral flags ``refer`` ``(N, K)`` bool for decisions ``p >= threshold``.

    ``findings`` ``(K,)`` bool marks the labels whose positives make a film abnormal and whose decisions must
    all be negative for it to be cleared (default: every label with a valid target; pass the trained labels
    without "No Finding"). A film is referred when any of its labels is referred. NaN targets are skipped:
    a film is abnormal when a finding is known positive.
    """
    targets = as_targets(y)
    n_films, n_labels = targets.shape
    probs = _probabilities("probabilities", p, (n_films, n_labels))
    thr = _float_array("threshold", threshold, (n_labels,))
    flags = np.asarray(refer)
    if flags.shape != (n_films, n_labels) or flags.dtype != np.bool_:
        raise ValueError(f"refer must be a bool array of shape {(n_films, n_labels)}, got {flags.dtype} {flags.shape}")
    if findings is None:
        mask = ~np.isnan(targets).all(axis=0)
    else:
        mask = np.asarray(findings)
        if mask.shape != (n_labels,) or mask.dtype != np.bool_:
            raise ValueError(f"findings must be a bool array of shape ({n_labels},), got {mask.dtype} {mask.shape}")
    positive = targets == 1.0
    missed = positive & (probs < thr)
    film_referred = np.asarray(flags.any(axis=1))
    kept_label = ~flags
    kept_film = ~film_referred[:, None]
    abnormal = positive[:, mask].any(axis=1)
    all_negative = (probs[:, mask] < thr[mask]).all(axis=1)
    abnormal_cleared = abnormal & ~film_referred & all_negative
    n_abnormal = int(abnormal.sum())
    return StudyReferral(
        n_films=n_films,
        referred_fraction=float(film_referred.mean()) if n_films else float("nan"),
        referred_fraction_per_label=flags.mean(axis=0) if n_films else np.full(n_labels, np.nan),
        miss_rate=_safe_divide((missed & kept_label).sum(axis=0), (positive & kept_label).sum(axis=0)),
        miss_rate_cleared_films=_safe_divide((missed & kept_film).sum(axis=0), (positive & kept_film).sum(axis=0)),
        n_abnormal=n_abnormal,
        n_abnormal_cleared=int(abnormal_cleared.sum()),
        abnormal_cleared=float(abnormal_cleared.sum() / n_abnormal) if n_abnormal else float("nan"),
    )


# --- the evaluation report --------------------------------------------------------------------------


def selective_report(
    y: ArrayLike,
    samples: ArrayLike,
    p_det: ArrayLike,
    threshold: ArrayLike,
    labels: Sequence[str],
    *,
    findings: ArrayLike | None = None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    reference: str = "baseline_mean",
) -> dict[str, Any]:
    """The ``"selective"`` section of ``metrics.json``: every registered score (or ``names``) evaluated.

    Inputs are calibrated: ``samples`` ``(T, N, K)`` MC probabilities, ``p_det`` ``(N, K)``, ``threshold``
    ``(K,)``; ``findings`` as in :func:`study_referral`. Per score: AURC and E-AURC (macro with CI, per
    label), the macro risk-coverage curve on :data:`RISK_COVERAGE_GRID`, kept-film AUROC/sensitivity/
    specificity/risk at :data:`TABLE_COVERAGES` (macro and per label, with CIs), the referral gain at
    :data:`GAIN_COVERAGES` and the study-level report at :data:`STUDY_COVERAGES`. ``best`` names the score with
    the lowest macro AURC and the paired bootstrap CI of its AURC minus ``reference``'s (or, when it is the
    reference, of the runner-up's minus it). JSON-ready: NaN is ``None``.
    """
    targets = as_targets(y)
    inputs = ScoreInputs(
        np.asarray(samples, dtype=np.float64),
        np.asarray(p_det, dtype=np.float64),
        np.asarray(threshold, dtype=np.float64),
        seed,
    )
    names_list = list(labels)
    if len(names_list) != targets.shape[1]:
        raise ValueError(f"{len(names_list)} label names for {targets.shape[1]} columns")
    if targets.shape != inputs.p_det.shape:
        raise ValueError(f"targets have shape {targets.shape} but predictions have shape {inputs.p_det.shape}")
    scores = compute_scores(inputs, names)
    if reference not in scores:
        raise ValueError(f"reference score {reference!r} is not among {list(scores)}")

    def per_label(values: FloatArray) -> dict[str, Any]:
        return dict(zip(names_list, json_floats(values), strict=True))

    def per_label_series(values: FloatArray) -> dict[str, Any]:  # (C, K) -> {label: [C values]}
        return per_label(values.T)

    results: dict[str, SelectiveMetrics] = {}
    section: dict[str, Any] = {}
    for name, score in scores.items():
        entry = SCORES[name]
        probs = entry.probabilities(inputs)
        m = selective_metrics(
            targets, probs, inputs.threshold, score, coverages=TABLE_COVERAGES, n_boot=n_boot, seed=seed, alpha=alpha
        )
        results[name] = m
        curve = selective_metrics(
            targets, probs, inputs.threshold, score, coverages=RISK_COVERAGE_GRID, n_boot=0, seed=seed
        )
        aurc_lo, aurc_hi = percentile_ci(m.macro_aurc_boot[:, None], alpha)
        kept: dict[str, Any] = {}
        for stat in KEPT_STATISTICS:
            lo, hi = percentile_ci(m.macro_boot(stat), alpha)
            label_lo, label_hi = percentile_ci(m.boot[stat], alpha)
            kept[stat] = {
                "macro": json_floats(m.macro(stat)),
                "macro_lo": json_floats(lo),
                "macro_hi": json_floats(hi),
                "per_label": per_label_series(m.per_label[stat]),
                "per_label_lo": per_label_series(label_lo),
                "per_label_hi": per_label_series(label_hi),
            }
        kept["n_kept"] = {"per_label": per_label_series(m.per_label["n_kept"])}
        gains = []
        for c in GAIN_COVERAGES:
            gain, lo_gain, hi_gain = referral_gain(m, c)
            gains.append(
                {"coverage": c, "auroc_gain": json_floats(gain), "lo": json_floats(lo_gain), "hi": json_floats(hi_gain)}
            )
        study = []
        for c in STUDY_COVERAGES:
            refer = per_label_refer(targets, score, c, seed=seed)
            study.append(
                {
                    "coverage": c,
                    **study_referral(targets, probs, inputs.threshold, refer, findings=findings).to_json(names_list),
                }
            )
        section[name] = {
            "description": entry.description,
            "probability": entry.probability,
            "aurc": {
                "macro": json_floats(m.macro_aurc),
                "lo": json_floats(aurc_lo[0]),
                "hi": json_floats(aurc_hi[0]),
                "per_label": per_label(m.aurc),
            },
            "e_aurc": {"macro": json_floats(nanmean(m.e_aurc)), "per_label": per_label(m.e_aurc)},
            "risk_coverage": {"coverage": curve.coverage.tolist(), "macro_risk": json_floats(curve.macro("risk"))},
            "kept": kept,
            "referral_gain": gains,
            "study": study,
        }
    return {
        "method": (
            "per-label referral: each label keeps the fraction c of its valid films with the lowest score; "
            "risk = error rate of p >= threshold on the kept films; AURC = mean risk over n = 1..n_k kept "
            "(Geifman et al. 2019); macro = mean over labels with a defined value; percentile bootstrap over "
            "films, selection redone on every resample, paired across scores"
        ),
        "threshold": per_label(inputs.threshold),
        "coverages": list(TABLE_COVERAGES),
        "n_boot": n_boot,
        "ci": 1.0 - alpha,
        "seed": seed,
        "scores": section,
        "best": _best(results, reference, alpha),
    }


def _best(results: Mapping[str, SelectiveMetrics], reference: str, alpha: float) -> dict[str, Any]:
    """The score with the lowest macro AURC, and whether it beats ``reference`` beyond the bootstrap CI."""
    ranked = sorted(
        (name for name in results if not np.isnan(results[name].macro_aurc)), key=lambda n: results[n].macro_aurc
    )
    if not ranked:
        return {"score": None, "reference": reference, "sentence": "No score has a defined AURC (no valid targets)."}
    winner = ranked[0]
    other, base = (winner, reference) if winner != reference else (ranked[1] if len(ranked) > 1 else winner, winner)
    difference = results[other].macro_aurc - results[base].macro_aurc
    lo, hi = paired_difference(results[other].macro_aurc_boot, results[base].macro_aurc_boot, alpha)
    distinguishable = bool(not np.isnan(lo) and (hi < 0.0 or lo > 0.0))
    ci_text = "no CI" if np.isnan(lo) else f"{100 * (1 - alpha):g}% CI [{lo:+.4f}, {hi:+.4f}]"
    if winner != reference:
        verdict = "outside the bootstrap CI (0 excluded)" if distinguishable else "not distinguishable (CI includes 0)"
        sentence = (
            f"Lowest macro AURC: {winner} ({results[winner].macro_aurc:.4f}); against {reference} "
            f"({results[reference].macro_aurc:.4f}) the difference is {difference:+.4f}, {ci_text}: {verdict}."
        )
    else:
        verdict = "the reference is better beyond the CI" if distinguishable else "not distinguishable (CI includes 0)"
        sentence = (
            f"Lowest macro AURC: {winner} itself ({results[winner].macro_aurc:.4f}); the runner-up {other} is "
            f"{difference:+.4f} higher, {ci_text}: {verdict}."
        )
    return {
        "score": winner,
        "macro_aurc": results[winner].macro_aurc,
        "reference": reference,
        "compared": other,
        "difference": json_floats(difference),
        "lo": json_floats(lo),
        "hi": json_floats(hi),
        "distinguishable": distinguishable,
        "sentence": sentence,
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(float(value), spec)


def _with_ci(value: Any, lo: Any, hi: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if lo is None or hi is None:
        return _fmt(value, spec)
    return f"{_fmt(value, spec)} [{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def selective_markdown(section: Mapping[str, Any]) -> str:
    """The report's tables from a :func:`selective_report` section (also as read back from JSON).

    A macro table (score x coverage: kept-film AUROC [CI], sensitivity, specificity, risk, and the score's
    AURC [CI]), a per-score summary (E-AURC, AUROC gain, study level) and the one-line verdict.
    """
    coverages = list(section["coverages"])
    ci = f"{100 * section['ci']:g}% CI"
    lines = [
        f"| score | coverage | AUROC [{ci}] | sensitivity | specificity | risk | AURC [{ci}] |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in section["scores"].items():
        kept = entry["kept"]
        for i, c in enumerate(coverages):
            auroc = kept["auroc"]
            aurc_text = (
                _with_ci(entry["aurc"]["macro"], entry["aurc"]["lo"], entry["aurc"]["hi"], ".4f") if i == 0 else ""
            )
            lines.append(
                f"| {name if i == 0 else ''} | {c:.0%} | "
                f"{_with_ci(auroc['macro'][i], auroc['macro_lo'][i], auroc['macro_hi'][i])} | "
                f"{_fmt(kept['sensitivity']['macro'][i])} | {_fmt(kept['specificity']['macro'][i])} | "
                f"{_fmt(kept['risk']['macro'][i])} | {aurc_text} |"
            )
    first = next(iter(section["scores"].values()), None)
    gain_cov = [g["coverage"] for g in first["referral_gain"]] if first else []
    study_cov = [s["coverage"] for s in first["study"]] if first else []
    header = ["score", "E-AURC"]
    header += [f"AUROC gain at {c:.0%} kept [{ci}]" for c in gain_cov]
    header += [f"films referred / abnormal cleared / miss rate at {c:.0%}" for c in study_cov]
    summary = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, entry in section["scores"].items():
        cells = [name, _fmt(entry["e_aurc"]["macro"], ".4f")]
        cells += [_with_ci(g["auroc_gain"], g["lo"], g["hi"], "+.3f") for g in entry["referral_gain"]]
        cells += [
            f"{_fmt(s['referred_fraction'], '.0%')} / {_fmt(s['abnormal_cleared'], '.1%')} / "
            f"{_fmt(s['macro_miss_rate'], '.1%')}"
            for s in entry["study"]
        ]
        summary.append("| " + " | ".join(cells) + " |")
    verdict = str(section["best"]["sentence"])
    return "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n\n" + verdict + "\n"
