"""Calibration fitting on seeded synthetic data: temperature, thresholds, referral rule, calibrated spec."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from bayesnet.decision import Decision, decide
from bayesnet.spec import ModelSpec
from train.calibrate import (
    UNCERTAINTY_GRID,
    bump_version,
    calibrated_spec,
    fit_temperature,
    fit_thresholds,
    fit_uncertainty_thresholds,
    uncertain_mask,
)
from train.metrics import ece, nll
from train.plots import reliability_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _overconfident(n: int, k: int, seed: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Targets drawn from sigmoid(true logits), and those logits multiplied by ``scale`` (overconfident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 1.5, size=(n, k))
    y = (rng.random((n, k)) < expit(true_logits)).astype(np.float64)
    return scale * true_logits, y


def _mc_samples(n: int, k: int, seed: int, n_samples: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """MC probabilities (T, N, K) whose spread varies by image, and targets that err where samples disagree."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0.0, 2.5, size=(n, k))
    spread = rng.uniform(0.05, 1.0, size=(n, k))
    samples = expit(centre[None] + spread[None] * rng.normal(size=(n_samples, n, k))).astype(np.float32)
    # The truth lies somewhere within the MC spread, so mistakes happen where the samples straddle 0.5.
    true_logit = centre + spread * rng.normal(size=(n, k))
    y = (rng.random((n, k)) < expit(4.0 * true_logit)).astype(np.float64)
    return samples, y


# --- temperature --------------------------------------------------------------------------------------


def test_temperature_recovers_a_known_overconfidence_and_improves_calibration() -> None:
    logits, y = _overconfident(20_000, 3, seed=0)
    y[::4, 1] = np.nan
    temperature = fit_temperature(logits, y)
    np.testing.assert_allclose(temperature, 3.0, rtol=0.1)
    before, after = expit(logits), expit(logits / temperature)
    assert (ece(y, after) < 0.5 * ece(y, before)).all()
    assert (nll(y, after) < nll(y, before)).all()


def test_temperature_of_mc_sample_logits_and_of_degenerate_labels() -> None:
    logits, y = _overconfident(5000, 3, seed=1, scale=2.0)
    samples = logits[None] + 0.05 * np.random.default_rng(1).normal(size=(8, *logits.shape))
    y[:, 1] = np.nan
    y[:, 2] = 0.0
    temperature = fit_temperature(samples, y)
    assert 1.7 < temperature[0] < 2.3
    assert temperature[1:].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(logits[:, :2], y)


# --- decision thresholds ------------------------------------------------------------------------------


def test_thresholds_fall_between_separable_classes() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((300, 2)) < 0.3).astype(np.float64)
    p = np.where(y == 1.0, rng.uniform(0.6, 0.9, y.shape), rng.uniform(0.1, 0.3, y.shape))
    threshold = fit_thresholds(y, p)
    for k in range(2):
        assert p[y[:, k] == 0, k].max() < threshold[k] < p[y[:, k] == 1, k].min()
    np.testing.assert_array_equal((p >= threshold) == (y == 1.0), True)


def test_thresholds_fall_back_and_stay_inside_bounds() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((200, 4)) < 0.5).astype(np.float64)
    p = rng.uniform(0.2, 0.8, y.shape)
    p[:, 1] = np.where(y[:, 1] == 1.0, 0.005, 0.001)  # separable at a tiny score: clipped up to 0.01
    y[:, 2] = np.nan
    p[:, 3] = 1.0 - y[:, 3]  # perfectly wrong: no threshold beats chance
    threshold = fit_thresholds(y, p)
    assert 0.2 < threshold[0] < 0.8
    assert threshold[1:].tolist() == [0.01, 0.5, 0.5]


# --- uncertainty thresholds ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_uncertainty_thresholds_respect_the_referral_budget_and_refer_errors(target: float) -> None:
    samples, y = _mc_samples(3000, 3, seed=4)
    y[:, 2] = np.nan
    threshold = np.full(3, 0.5)
    u = fit_uncertainty_thresholds(y, samples, threshold, target_referral=target)
    assert set(u[:2].tolist()) <= set(UNCERTAINTY_GRID) and u[2] == 0.2
    referred = uncertain_mask(samples, threshold, u)
    assert (referred[:, :2].mean(axis=0) <= target).all()
    wrong = (samples.mean(axis=0) >= threshold) != (y == 1.0)
    for k in range(2):
        assert wrong[referred[:, k], k].mean() > 2.0 * wrong[~referred[:, k], k].mean()
        # No smaller u could have been used: it would break the budget or refer no extra error.
        smaller = [v for v in UNCERTAINTY_GRID if v < u[k]]
        if smaller:
            wider = uncertain_mask(samples, threshold, np.full(3, smaller[-1]))[:, k]
            assert wider.mean() > target or wrong[wider, k].sum() == wrong[referred[:, k], k].sum()


def test_uncertain_mask_is_the_services_decision_rule() -> None:
    samples, _ = _mc_samples(200, 3, seed=5, n_samples=10)
    spec = ModelSpec(labels=("A", "B", "C"), threshold=(0.5, 0.3, 0.7), uncertainty_threshold=(0.1, 0.2, 0.5))
    decisions = decide(torch.from_numpy(samples), spec)
    expected = np.array([[d is Decision.UNCERTAIN for d in row] for row in decisions])
    np.testing.assert_array_equal(uncertain_mask(samples, spec.threshold, spec.uncertainty_threshold), expected)


def test_an_unreachable_budget_takes_the_largest_u_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    # Half the samples on each side of 0.5 for every image: the disagreement is 0.5 everywhere.
    samples = np.concatenate([np.full((5, 50, 1), 0.2), np.full((5, 50, 1), 0.8)]).astype(np.float32)
    y = np.zeros((50, 1))
    with caplog.at_level(logging.WARNING, logger="train.calibrate"):
        u = fit_uncertainty_thresholds(y, samples, [0.5], target_referral=0.1)
    assert u.tolist() == [0.5]
    assert "budget" in caplog.text


# --- calibrated spec ----------------------------------------------------------------------------------


def test_calibrated_spec_round_trips_and_keeps_untrained_labels_neutral() -> None:
    spec = ModelSpec(labels=("A", "B", "C"), trained_labels=("A", "B"), version="0.1.0", extra={"data": "x"})
    calibrated = calibrated_spec(
        spec,
        temperature=np.array([2.0, 0.5, 7.0]),
        threshold={"A": 0.3, "B": 0.6, "C": 0.9},
        uncertainty_threshold=[0.15, 0.35, 0.45],
        n_images=1234,
        ece_before=np.array([0.2, 0.1, np.nan]),
        ece_after=[0.02, 0.03, np.nan],
        details={"target_referral": 0.1},
    )
    assert calibrated.temperature == (2.0, 0.5, 1.0)
    assert calibrated.threshold == (0.3, 0.6, 0.5)
    assert calibrated.uncertainty_threshold == (0.15, 0.35, 0.2)
    assert calibrated.version == "0.1.0+cal"
    record = calibrated.extra["calibration"]
    assert calibrated.extra["data"] == "x"
    assert record["n_images"] == 1234 and record["target_referral"] == 0.1
    assert record["ece_after"] == {"A": 0.02, "B": 0.03, "C": None} and record["neutral_labels"] == ["C"]
    text = calibrated.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert ModelSpec.from_json(text) == calibrated
    again = calibrated_spec(calibrated, temperature=[1, 1, 1], threshold=[0.5] * 3, uncertainty_threshold=[0.2] * 3)
    assert again.version == "0.1.0+cal" and again.temperature == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="values"):
        calibrated_spec(spec, temperature=[1.0], threshold=[0.5] * 3, uncertainty_threshold=[0.2] * 3)


def test_version_bump_is_a_local_label_and_idempotent() -> None:
    assert bump_version("0.1.0") == "0.1.0+cal"
    assert bump_version("0.1.0+cal") == "0.1.0+cal"
    assert bump_version("0.1.0+gpu") == "0.1.0+gpu.cal"
    assert bump_version("1.2.3", "cal.2") == "1.2.3+cal.2"


# --- plot ---------------------------------------------------------------------------------------------


def test_reliability_grid_writes_a_png_with_a_panel_per_label(tmp_path: Path) -> None:
    logits, y = _overconfident(2000, 14, seed=6)
    y[:, 13] = np.nan  # a label without data gets a "no data" panel, not an error
    temperature = fit_temperature(logits, y)
    labels = [f"finding {k}" for k in range(14)]
    path = reliability_grid(y, expit(logits), expit(logits / temperature), labels, tmp_path / "rel.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
