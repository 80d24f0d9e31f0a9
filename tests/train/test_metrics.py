"""Evaluation maths on seeded synthetic arrays with known answers: AUC, bootstrap, calibration, referral."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from train.metrics import (
    _SortedLabel,
    _weighted_auc,
    bootstrap_auc,
    brier,
    ece,
    nll,
    per_label_auc,
    print_auc_table,
    random_referral_curve,
    referral_curve,
    reliability_bins,
    summary_table,
)
from train.plots import referral_plot, roc_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _noisy_scores(n: int, k: int, seed: int, separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Targets with 30 % prevalence and probabilities that separate the classes imperfectly."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=(n, k)) + separation * (2.0 * y - 1.0))))
    return y, p


# --- AUC ----------------------------------------------------------------------------------------------


def test_perfect_predictions_score_perfectly() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.4).astype(np.float64)
    p = y.copy()
    np.testing.assert_allclose(per_label_auc(y, p), 1.0)
    np.testing.assert_allclose(ece(y, p), 0.0, atol=1e-12)
    np.testing.assert_allclose(brier(y, p), 0.0, atol=1e-12)
    assert (nll(y, p) < 1e-6).all()


def test_auc_of_a_hand_example_and_its_mirror() -> None:
    y = np.array([[0.0], [0.0], [1.0], [1.0]])
    p = np.array([[0.1], [0.4], [0.35], [0.8]])
    np.testing.assert_allclose(per_label_auc(y, p), [0.75])  # 3 of 4 positive-negative pairs ordered
    np.testing.assert_allclose(per_label_auc(y, 1.0 - p), [0.25])


def test_masked_and_degenerate_labels_give_nan_without_warnings() -> None:
    y, p = _noisy_scores(300, 4, seed=1)
    y[:, 1] = np.nan  # never annotated
    y[:, 2] = 1.0  # single class
    y[::3, 3] = np.nan  # partly annotated
    auc = per_label_auc(y, p)
    assert np.isnan(auc[1]) and np.isnan(auc[2]) and not np.isnan(auc[3])
    for metric in (ece, brier, nll):
        values = metric(y, p)
        assert np.isnan(values[1]), metric.__name__
        assert np.isfinite(values[[0, 2, 3]]).all(), metric.__name__  # calibration of one class is defined
    point, lo, hi = bootstrap_auc(y, p, n_boot=50)
    assert np.isnan(point[[1, 2]]).all() and np.isnan(lo[[1, 2]]).all() and np.isnan(hi[[1, 2]]).all()
    assert np.isfinite(lo[[0, 3]]).all()


def test_masked_entries_are_ignored_not_scored() -> None:
    y, p = _noisy_scores(400, 2, seed=2)
    masked = y.copy()
    masked[:100] = np.nan
    p_garbage = p.copy()
    p_garbage[:100] = 1.0 - y[:100]  # confidently wrong where the targets are unknown
    for metric in (per_label_auc, ece, brier, nll):
        np.testing.assert_allclose(metric(masked, p_garbage), metric(y[100:], p[100:]), err_msg=metric.__name__)


def test_invalid_inputs_are_rejected() -> None:
    y = np.array([[1.0], [-1.0]])  # CheXpert's raw "uncertain" code slipped through
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        per_label_auc(y, np.array([[0.2], [0.3]]))
    with pytest.raises(ValueError, match="shape"):
        brier(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece(np.zeros((2, 1)), np.array([[0.5], [1.5]]))


# --- bootstrap ----------------------------------------------------------------------------------------


def test_weighted_auc_equals_sklearn_on_a_resample_with_ties() -> None:
    y, p = _noisy_scores(500, 1, seed=3)
    p = np.round(p, 1)  # many ties
    y[::7] = np.nan
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 500, 500)
    label = _SortedLabel.build(y[:, 0], p[:, 0])
    counts = np.bincount(idx, minlength=500).astype(np.float64)
    valid = ~np.isnan(y[idx, 0])
    expected = roc_auc_score(y[idx, 0][valid], p[idx, 0][valid])
    np.testing.assert_allclose(_weighted_auc(label, counts[None, label.rows]), [expected])


def test_bootstrap_ci_contains_the_point_estimate_and_narrows_with_more_data() -> None:
    y_small, p_small = _noisy_scores(200, 3, seed=4)
    y_large, p_large = _noisy_scores(5000, 3, seed=4)
    auc_s, lo_s, hi_s = bootstrap_auc(y_small, p_small, n_boot=300, seed=0)
    auc_l, lo_l, hi_l = bootstrap_auc(y_large, p_large, n_boot=300, seed=0)
    np.testing.assert_allclose(auc_s, per_label_auc(y_small, p_small))
    assert ((lo_s <= auc_s) & (auc_s <= hi_s)).all()
    assert ((lo_l <= auc_l) & (auc_l <= hi_l)).all()
    assert ((hi_l - lo_l) < 0.5 * (hi_s - lo_s)).all()  # ~1/sqrt(25) = 0.2 expected


def test_bootstrap_is_reproducible_and_skips_single_class_resamples() -> None:
    y, p = _noisy_scores(100, 2, seed=5)
    y[:, 1] = 0.0
    y[:2, 1] = 1.0  # 2 positives: many resamples miss both; those must be skipped, not crash
    first = bootstrap_auc(y, p, n_boot=200, seed=11)
    second = bootstrap_auc(y, p, n_boot=200, seed=11)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    _, lo, hi = first
    assert 0.0 <= lo[1] <= hi[1] <= 1.0


# --- calibration metrics ------------------------------------------------------------------------------


def test_ece_and_reliability_bins_of_a_hand_example() -> None:
    # 15 bins: 0.1 -> bin 1, 0.5 -> bin 7, 0.9 -> bin 13, 1.0 -> the last bin (14).
    y = np.array([0.0, 1.0, 1.0, 1.0, 0.0, np.nan])
    p = np.array([0.1, 0.1, 0.9, 0.9, 0.5, 0.7])
    centers, confidence, accuracy, counts = reliability_bins(y, p)
    assert counts.tolist() == [0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0]
    np.testing.assert_allclose(centers[[0, 14]], [1 / 30, 29 / 30])
    np.testing.assert_allclose(confidence[[1, 7, 13]], [0.1, 0.5, 0.9])
    np.testing.assert_allclose(accuracy[[1, 7, 13]], [0.5, 0.0, 1.0])
    assert np.isnan(confidence[0]) and np.isnan(accuracy[0])
    # ECE = 2/5 * |0.1 - 0.5| + 1/5 * |0.5 - 0| + 2/5 * |0.9 - 1| = 0.16 + 0.10 + 0.04
    np.testing.assert_allclose(ece(y[:, None], p[:, None]), [0.30])
    assert reliability_bins([1.0], [1.0])[3][-1] == 1


def test_brier_and_nll_of_a_hand_example() -> None:
    y = np.array([[1.0], [0.0]])
    p = np.array([[0.8], [0.4]])
    np.testing.assert_allclose(brier(y, p), [(0.2**2 + 0.4**2) / 2])
    np.testing.assert_allclose(nll(y, p), [-(math.log(0.8) + math.log(0.6)) / 2])
    np.testing.assert_allclose(nll(np.array([[1.0]]), np.array([[0.0]])), [-math.log(1e-7)])  # clipped


# --- referral -----------------------------------------------------------------------------------------


def _referral_case(seed: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores with errors, and an uncertainty that is higher on the misclassified images."""
    y, p = _noisy_scores(2000, 3, seed=seed, separation=1.0)
    rng = np.random.default_rng(seed)
    wrong = (p >= 0.5) != (y == 1.0)
    score = wrong.mean(axis=1) + 0.3 * rng.random(2000)
    return y, p, score


def test_referral_by_an_informative_score_raises_auc_and_accuracy_above_random() -> None:
    y, p, score = _referral_case()
    curve = referral_curve(y, p, score)
    random = random_referral_curve(y, p, n_repeats=10)
    json.dumps(curve, allow_nan=False)
    json.dumps(random, allow_nan=False)
    assert curve["mode"] == "image" and curve["coverage"][0] == 1.0 and curve["coverage"][-1] == 0.5
    np.testing.assert_allclose(curve["auc"][0], per_label_auc(y, p).mean())
    assert curve["auc"][-1] > curve["auc"][0] + 0.05
    assert curve["accuracy"][-1] > curve["accuracy"][0] + 0.05
    assert all(a > r for a, r in zip(curve["auc"][1:], random["auc"][1:], strict=True))
    assert abs(random["auc"][-1] - random["auc"][0]) < 0.03  # random referral leaves AUC where it was
    assert curve["n_kept"][-1] == [1000, 1000, 1000]


def test_per_label_referral_keeps_a_fraction_of_each_labels_valid_entries() -> None:
    y, p, score = _referral_case(seed=7)
    y[:1000, 2] = np.nan
    y[:, 1] = np.nan
    per_label_score = np.repeat(score[:, None], 3, axis=1)
    curve = referral_curve(y, p, per_label_score, coverages=[1.0, 0.5], threshold=np.array([0.5, 0.5, 0.4]))
    json.dumps(curve, allow_nan=False)
    assert curve["mode"] == "label"
    assert curve["n_kept"] == [[2000, 0, 1000], [1000, 0, 500]]
    assert curve["auc_per_label"][0][1] is None and curve["auc"][1] > curve["auc"][0]


# --- tables and plots ---------------------------------------------------------------------------------


def test_tables_format_floats_and_missing_values() -> None:
    table = summary_table(["A", "B"], auc=[0.91234, float("nan")], n_images=np.array([10, 0]), ece=[None, 0.05])
    assert table.splitlines() == [
        "| label | auc | n images | ece |",
        "|---|---:|---:|---:|",
        "| A | 0.912 | 10 | n/a |",
        "| B | n/a | 0 | 0.050 |",
    ]
    text = print_auc_table(["Cardiomegaly", "Edema"], np.array([0.8, np.nan]), lo=[0.75, np.nan], hi=[0.85, np.nan])
    lines = text.splitlines()
    assert re.fullmatch(r"Cardiomegaly +0\.800  \[0\.750, 0\.850\]", lines[2])
    assert re.fullmatch(r"Edema +n/a  n/a", lines[3])
    assert re.fullmatch(r"mean \(1 labels\)  0\.800", lines[-1])
    assert lines[0].index("AUC") + 3 == lines[2].index("0.800") + 5 == lines[3].index("n/a") + 3  # aligned


def test_roc_and_referral_plots_write_pngs(tmp_path: Path) -> None:
    y, p, score = _referral_case()
    y[:, 1] = np.nan
    auc, lo, hi = bootstrap_auc(y, p, n_boot=20)
    roc = roc_grid(y, p, ["A", "B", "C"], tmp_path / "figs" / "roc.png", auc=auc, ci=(lo, hi))
    curve = json.loads(json.dumps(referral_curve(y, p, score)))  # plots must accept what was saved as JSON
    random = json.loads(json.dumps(random_referral_curve(y, p, n_repeats=3)))
    referral = referral_plot(curve, random, tmp_path / "referral.png")
    for path in (roc, referral):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
