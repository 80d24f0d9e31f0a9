"""Selective prediction on hand-made arrays with known answers, and its section of ``python -m train evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from train.plots import risk_coverage_plot, selective_auroc_plot
from train.selective import (
    SCORES,
    TABLE_COVERAGES,
    ScoreInputs,
    _aurc_weighted,
    _harmonic,
    _kept_weights,
    aurc,
    compute_scores,
    decision_error,
    mc_interval,
    mutual_information,
    optimal_aurc,
    per_label_refer,
    predictive_entropy,
    referral_gain,
    selective_markdown,
    selective_metrics,
    selective_report,
    study_referral,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _aurc_by_hand(error: np.ndarray, score: np.ndarray) -> float:
    """Mean over i of the error rate of the i lowest-scored films (scores distinct, so no tie-breaking)."""
    order = np.argsort(score, kind="stable")
    cumulative = np.cumsum(error[order])
    return float(np.mean(cumulative / np.arange(1, error.size + 1)))


def _one_label(n: int, seed: int, error_rate: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label, threshold 0.5: targets, probabilities, and which decisions are wrong (about ``error_rate``)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.float64)
    wrong = rng.random(n) < error_rate
    confident = rng.uniform(0.55, 0.95, n)
    p = np.where((y == 1.0) != wrong, confident, 1.0 - confident)  # decided positive iff (y == 1) xor wrong
    return y[:, None], p[:, None], wrong


def _mc_world(n: int, k: int, seed: int, n_samples: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets ``(N, K)``, MC samples ``(T, N, K)`` and p_det, where errors happen near the threshold 0.5."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0.0, 2.0, size=(n, k))
    spread = rng.uniform(0.05, 1.0, size=(n, k))
    samples = expit(centre[None] + spread[None] * rng.normal(size=(n_samples, n, k)))
    y = (rng.random((n, k)) < expit(2.0 * (centre + spread * rng.normal(size=(n, k))))).astype(np.float64)
    return y, samples, expit(centre)


# --- scores -------------------------------------------------------------------------------------------


def test_scores_on_hand_made_samples() -> None:
    thr = np.array([0.5, 0.5, 0.5])
    # Film 0: all samples 0.5 (no disagreement); film 1: spread evenly across 0.5; film 2: all well above.
    samples = np.array(
        [
            [[0.5, 0.1, 0.8]],
            [[0.5, 0.9, 0.9]],
        ]
    ).transpose(0, 2, 1)  # (T=2, N=3, K=1)
    samples = np.broadcast_to(samples, (2, 3, 3)).copy()
    mi = mutual_information(samples)
    assert mi[0, 0] == pytest.approx(0.0, abs=1e-12)  # identical samples: no epistemic uncertainty
    assert mi[1, 0] > 0.0
    assert predictive_entropy(samples)[0, 0] == pytest.approx(math.log(2.0))  # H(0.5) = ln 2 nats
    interval = mc_interval(samples, thr, lower=0.0, upper=1.0)  # the interval is [min, max] here
    assert interval[1, 0] == pytest.approx(0.4)  # [0.1, 0.9] straddles 0.5: shorter arm 0.4
    assert interval[2, 0] == pytest.approx(-0.3)  # [0.8, 0.9] lies 0.3 above 0.5
    assert interval[0, 0] == pytest.approx(0.0)  # [0.5, 0.5] touches the threshold
    scores = compute_scores(ScoreInputs(samples, np.full((3, 3), 0.7), thr, seed=1))
    assert list(scores) == list(SCORES)
    assert all(s.shape == (3, 3) for s in scores.values())
    np.testing.assert_allclose(scores["baseline_single_pass"], -0.2)  # -|0.7 - 0.5| from p_det
    np.testing.assert_allclose(scores["baseline_mean"][2], -0.35)  # MC mean 0.85
    assert SCORES["baseline_single_pass"].probability == "deterministic"
    # A low threshold: 0.3 is called positive but wrong with probability 0.7; 0.05 negative, wrong w.p. 0.05.
    np.testing.assert_allclose(decision_error(np.array([[0.3, 0.05, 0.9]]), np.full(3, 0.1)), [[0.7, 0.05, 0.1]])
    again = compute_scores(ScoreInputs(samples, np.full((3, 3), 0.7), thr, seed=1), ["random"])["random"]
    np.testing.assert_array_equal(again, scores["random"])  # seeded


def test_interval_score_ranks_a_straddling_interval_above_a_narrow_confident_one() -> None:
    thr = np.array([0.2])
    rng = np.random.default_rng(0)
    straddling = rng.uniform(0.1, 0.3, size=(50, 1, 1))
    confident_low = rng.uniform(0.01, 0.05, size=(50, 1, 1))
    score = mc_interval(np.concatenate([straddling, confident_low], axis=1), thr)
    assert score[0, 0] > 0.0 > score[1, 0]


# --- AURC ---------------------------------------------------------------------------------------------


def test_aurc_matches_its_definition_and_a_perfect_ranking_reaches_the_optimum() -> None:
    y, p, wrong = _one_label(200, seed=0)
    n, r = wrong.size, int(wrong.sum())
    score = np.random.default_rng(1).random((n, 1))
    assert aurc(y, p, [0.5], score)[0] == pytest.approx(_aurc_by_hand(wrong.astype(float), score[:, 0]))
    by_hand_optimum = sum((i - (n - r)) / i for i in range(n - r + 1, n + 1)) / n
    perfect = wrong.astype(np.float64)[:, None] + 0.01 * score  # every error above every correct film
    assert aurc(y, p, [0.5], perfect)[0] == pytest.approx(by_hand_optimum)
    assert optimal_aurc(y, p, [0.5])[0] == pytest.approx(by_hand_optimum)
    worst = aurc(y, p, [0.5], -perfect)[0]  # errors referred last: kept first
    assert worst > aurc(y, p, [0.5], score)[0] > by_hand_optimum
    metrics = selective_metrics(y, p, [0.5], perfect, n_boot=0)
    assert metrics.e_aurc[0] == pytest.approx(0.0, abs=1e-12)


def test_random_ranking_has_the_constant_risk_as_aurc() -> None:
    y, p, wrong = _one_label(20_000, seed=2)
    score = np.random.default_rng(3).random((wrong.size, 1))
    assert aurc(y, p, [0.5], score)[0] == pytest.approx(wrong.mean(), abs=0.01)


def test_ranking_errors_first_lowers_the_risk_of_the_kept_half() -> None:
    y, p, wrong = _one_label(400, seed=4)
    noise = np.random.default_rng(5).random(wrong.size)
    finds_errors = (wrong + noise)[:, None]  # errors score higher than all correct films
    misleads = (noise - wrong)[:, None]
    half, full = TABLE_COVERAGES.index(0.5), TABLE_COVERAGES.index(1.0)
    good = selective_metrics(y, p, [0.5], finds_errors, n_boot=0).per_label["risk"]
    bad = selective_metrics(y, p, [0.5], misleads, n_boot=0).per_label["risk"]
    assert good[full, 0] == pytest.approx(wrong.mean())
    assert good[half, 0] == 0.0  # 30 % errors, all among the referred half
    assert bad[half, 0] > good[full, 0]


def test_weighted_selection_and_aurc_equal_the_expanded_resample() -> None:
    """A bootstrap multiplicity must act exactly like that many adjacent copies of the film."""
    rng = np.random.default_rng(6)
    error = (rng.random(30) < 0.4).astype(np.float64)
    weights = rng.integers(0, 4, size=(5, 30)).astype(np.float64)
    area = _aurc_weighted(error, weights, _harmonic(int(weights.sum(axis=1).max())))
    kept = _kept_weights(weights, np.array([0.5]))
    for b in range(5):
        expanded = np.repeat(error, weights[b].astype(np.int64))
        cumulative = np.cumsum(expanded) / np.arange(1, expanded.size + 1)
        assert area[b] == pytest.approx(cumulative.mean())
        n_keep = math.floor(0.5 * expanded.size + 0.5)
        assert kept[b, 0].sum() == n_keep
        assert kept[b, 0] @ error == expanded[:n_keep].sum()


# --- kept-film metrics and the bootstrap --------------------------------------------------------------


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_more_films() -> None:
    widths = []
    for n in (200, 2000):
        y, samples, _ = _mc_world(n, 3, seed=7)
        p = samples.mean(axis=0)
        score = -np.abs(p - 0.5)
        metrics = selective_metrics(y, p, np.full(3, 0.5), score, n_boot=200, seed=0)
        at = metrics.index(0.8)
        macro = metrics.macro("auroc")[at]
        boot = metrics.macro_boot("auroc")[:, at]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        assert lo <= macro <= hi
        gain, gain_lo, gain_hi = referral_gain(metrics, 0.8)
        assert gain_lo <= gain <= gain_hi
        assert gain > 0.0  # referring the films nearest the threshold leaves the easier ones
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # ~ 1 / sqrt(10)


def test_same_seed_pairs_the_resamples_of_different_scores() -> None:
    y, samples, _ = _mc_world(150, 2, seed=8)
    p = samples.mean(axis=0)
    a = selective_metrics(y, p, [0.5, 0.5], -np.abs(p - 0.5), n_boot=50, seed=3)
    b = selective_metrics(y, p, [0.5, 0.5], samples.std(axis=0), n_boot=50, seed=3)
    full = a.index(1.0)
    # At coverage 1 nothing is referred, so both scores see the same films on every resample.
    np.testing.assert_allclose(a.macro_boot("auroc")[:, full], b.macro_boot("auroc")[:, full])
    gain, lo, hi = referral_gain(a, 1.0)
    assert gain == lo == hi == 0.0


def test_nan_targets_are_skipped_as_if_the_films_were_absent() -> None:
    y, p, _ = _one_label(120, seed=9)
    score = np.random.default_rng(10).random((120, 1))
    masked = y.copy()
    masked[::3] = np.nan
    keep = ~np.isnan(masked[:, 0])
    with_nan = selective_metrics(masked, p, [0.5], score, n_boot=0)
    subset = selective_metrics(y[keep], p[keep], [0.5], score[keep], n_boot=0)
    for stat in ("auroc", "sensitivity", "specificity", "risk", "n_kept"):
        np.testing.assert_allclose(with_nan.per_label[stat], subset.per_label[stat])
    np.testing.assert_allclose(with_nan.aurc, subset.aurc)


def test_single_class_and_empty_labels_give_none_without_a_warning() -> None:
    y, samples, p_det = _mc_world(60, 3, seed=11)
    y[:, 1] = 0.0  # one class: AUROC and sensitivity undefined, risk and specificity defined
    y[:, 2] = np.nan  # never annotated
    report = json.loads(json.dumps(selective_report(y, samples, p_det, np.full(3, 0.5), ["a", "b", "c"], n_boot=20)))
    kept = report["scores"]["mc_std"]["kept"]
    assert kept["auroc"]["per_label"]["b"] == [None] * len(TABLE_COVERAGES)
    assert kept["sensitivity"]["per_label"]["b"] == [None] * len(TABLE_COVERAGES)
    assert all(v is not None for v in kept["specificity"]["per_label"]["b"])
    assert report["scores"]["mc_std"]["aurc"]["per_label"]["c"] is None
    assert kept["auroc"]["macro"][0] == pytest.approx(kept["auroc"]["per_label"]["a"][0])  # macro over defined


def test_bad_inputs_raise_value_errors() -> None:
    y, samples, p_det = _mc_world(20, 2, seed=12)
    p, thr = samples.mean(axis=0), np.full(2, 0.5)
    with pytest.raises(ValueError, match="score must have shape"):
        selective_metrics(y, p, thr, p[:, :1])
    with pytest.raises(ValueError, match="threshold must have shape"):
        selective_metrics(y, p, np.full(3, 0.5), p)
    with pytest.raises(ValueError, match="probabilities must have shape"):
        selective_metrics(y, p.T, thr, p)
    with pytest.raises(ValueError, match="must lie in"):
        selective_metrics(y, p + 1.0, thr, p)
    with pytest.raises(ValueError, match="contain NaN"):
        selective_metrics(y, p, thr, np.full_like(p, np.nan))
    with pytest.raises(ValueError, match="coverages"):
        selective_metrics(y, p, thr, p, coverages=[0.0])
    with pytest.raises(ValueError, match="targets must be"):
        selective_metrics(np.full_like(y, 2.0), p, thr, p)
    with pytest.raises(ValueError, match="MC samples must have shape"):
        ScoreInputs(samples[0], p_det, thr)
    with pytest.raises(ValueError, match="p_det must have shape"):
        ScoreInputs(samples, p_det[:5], thr)
    with pytest.raises(ValueError, match="unknown uncertainty scores"):
        compute_scores(ScoreInputs(samples, p_det, thr), ["mc_variance_typo"])
    with pytest.raises(ValueError, match="refer must be a bool array"):
        study_referral(y, p, thr, np.zeros_like(y))
    with pytest.raises(ValueError, match="label names"):
        selective_report(y, samples, p_det, thr, ["only one"], n_boot=0)


# --- study level --------------------------------------------------------------------------------------


def test_study_level_miss_rate_and_abnormal_films_cleared_by_hand() -> None:
    # Two findings A and B, threshold 0.5. Six films:
    #   film  y(A,B)   p(A,B)      refer(A,B)
    #   0     1, 0     0.2, 0.1    no, no      A positive decided negative, nothing referred: missed, cleared
    #   1     1, 0     0.8, 0.1    no, no      A found
    #   2     1, 1     0.3, 0.4    yes, no     A referred; B missed; the film is referred (not cleared)
    #   3     0, 1     0.1, 0.2    no, yes     B referred; the film is referred
    #   4     0, 0     0.1, 0.1    no, no      normal, cleared
    #   5     0, 1     0.1, 0.9    no, no      B found
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 0], [0, 1]], dtype=np.float64)
    p = np.array([[0.2, 0.1], [0.8, 0.1], [0.3, 0.4], [0.1, 0.2], [0.1, 0.1], [0.1, 0.9]])
    refer = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [0, 0], [0, 0]], dtype=bool)
    study = study_referral(y, p, [0.5, 0.5], refer)
    assert study.referred_fraction == pytest.approx(2 / 6)  # films 2 and 3
    np.testing.assert_allclose(study.referred_fraction_per_label, [1 / 6, 1 / 6])
    # A: positives not referred for A are films 0, 1 -> film 0 missed: 1/2.
    # B: positives not referred for B are films 2, 5 -> film 2 missed: 1/2.
    np.testing.assert_allclose(study.miss_rate, [0.5, 0.5])
    # Among films not referred at all (0, 1, 4, 5): A positives 0, 1 (one missed); B positive 5 (found).
    np.testing.assert_allclose(study.miss_rate_cleared_films, [0.5, 0.0])
    # Abnormal films: 0, 1, 2, 3, 5. Cleared unread (not referred, every finding negative): film 0 only.
    assert (study.n_abnormal, study.n_abnormal_cleared) == (5, 1)
    assert study.abnormal_cleared == pytest.approx(1 / 5)
    # With only A counted as a finding, film 5 is no longer abnormal and film 0 is still cleared: 1 of 3.
    only_a = study_referral(y, p, [0.5, 0.5], refer, findings=np.array([True, False]))
    assert (only_a.n_abnormal, only_a.n_abnormal_cleared) == (3, 1)


def test_per_label_refer_applies_each_labels_cut_off_to_every_film() -> None:
    y = np.array([[0.0, np.nan]] * 6 + [[np.nan, np.nan]] * 2)
    y[:3, 0] = 1.0
    score = np.zeros((8, 2))
    score[:, 0] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05, 0.9]  # the unannotated films 6 and 7 score low and high
    refer = per_label_refer(y, score, 0.5, seed=0)
    assert refer[:, 0].tolist() == [False, False, False, True, True, True, False, True]  # 3 of 6 annotated kept
    assert not refer[:, 1].any()  # no valid targets: never referred
    assert not per_label_refer(y, score, 1.0).any()


# --- report, plots and evaluate() ---------------------------------------------------------------------


def test_report_is_json_ready_and_names_a_winner_from_the_data(tmp_path: Path) -> None:
    y, samples, p_det = _mc_world(300, 4, seed=13)
    section = selective_report(y, samples, p_det, np.full(4, 0.5), list("abcd"), n_boot=100, seed=0)
    loaded = json.loads(json.dumps(section, allow_nan=False))
    assert set(loaded["scores"]) == set(SCORES)
    best = loaded["best"]
    macro = {name: entry["aurc"]["macro"] for name, entry in loaded["scores"].items()}
    assert best["score"] == min(macro, key=lambda name: macro[name])
    assert macro["random"] > macro["baseline_mean"]  # errors sit near the threshold here
    assert ("outside the bootstrap CI" in best["sentence"]) == best["distinguishable"]
    text = selective_markdown(loaded)
    assert best["sentence"] in text
    assert text.count("| mc_interval |") == 2  # the macro table and the summary
    for plot, name in ((risk_coverage_plot, "rc.png"), (selective_auroc_plot, "auroc.png")):
        assert plot(loaded, tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
