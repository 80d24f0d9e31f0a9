"""The risk-controlled referral rule: its guarantee over many calibration draws, its use of MAPIE, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from bayesnet import ModelSpec, load_checkpoint
from bayesnet.decision import Decision, decide
from bayesnet.referral import study_cleared
from train.calibrate import calibrate_checkpoint
from train.conformal import (
    GRID,
    ReferralInputError,
    check_markdown,
    check_referral,
    fit_negative_threshold,
    fit_positive_threshold,
    fit_referral,
    study_score_array,
)
from train.crossfit import crossfit
from train.fit import FitConfig, fit
from train.predict import collect, sigmoid
from train.synthetic import generate
from train.uncertainty_study import run_study

SPEC = ModelSpec(arch="test_efficientnet")
ALPHA, DELTA = 0.1, 0.1


# --- the procedure, checked independently of MAPIE --------------------------------------------------------------


def hoeffding_bentkus_p(risk_hat: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of "risk > alpha" for a binary loss (Learn-then-Test, Angelopoulos et al. 2021).

    For 0/1 losses the Bentkus term is the exact binomial tail (no factor e); Hoeffding uses the KL divergence of
    min(risk_hat, alpha) from alpha, so it is 1 once the empirical risk reaches the level.
    """
    r = min(risk_hat, alpha)
    kl = r * math.log(r / alpha) if r > 0 else 0.0
    kl += (1 - r) * math.log((1 - r) / (1 - alpha))
    hoeffding = math.exp(-n * kl)
    binomial = float(binom.cdf(math.ceil(n * risk_hat), n, alpha))
    return min(hoeffding, binomial)


def reference_negative_threshold(
    scores: np.ndarray, y: np.ndarray, alpha: float, delta: float, *, as_mapie: bool
) -> float | None:
    """Fixed-sequence testing from the safest threshold up: the last one whose miss-rate null is rejected.

    ``as_mapie``: the miss rate computed as MAPIE 1.6 does, ``1 - recall``. Its float round-off can make
    ``ceil(n * risk)`` count one more miss than there is (1 - 75/76 > 1/76), a slightly conservative p-value.
    """
    positives = scores[y == 1]
    best = None
    for lam in GRID:
        miss = 1.0 - float(np.mean(positives >= lam)) if as_mapie else float(np.mean(positives < lam))
        if hoeffding_bentkus_p(miss, positives.size, alpha) > delta:
            break
        best = float(lam)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_mapie_threshold_equals_the_published_procedure_written_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(np.int64)
    scores = np.clip(rng.normal(0.3 + 0.35 * y, 0.15), 0.0, 1.0)
    fitted = fit_negative_threshold(scores, y, alpha=ALPHA, delta=DELTA)
    assert fitted == reference_negative_threshold(scores, y, ALPHA, DELTA, as_mapie=True)
    exact = reference_negative_threshold(scores, y, ALPHA, DELTA, as_mapie=False)
    assert fitted is not None and exact is not None and fitted <= exact, "never less conservative than exact"


@pytest.mark.slow  # seconds of repeated draws: make test, not make test-fast
def test_exact_guarantee_over_many_calibration_draws_with_known_score_distributions() -> None:
    """Scores with known distributions: the TRUE miss rate at the fitted threshold is <= alpha in >= 1 - delta."""
    rng = np.random.default_rng(0)
    draws, n, prevalence = 400, 200, 0.3
    # Positives' scores ~ Beta(4, 2): true miss rate at lambda is the Beta(4, 2) CDF, (known in closed form).
    true_miss = [0.0] * draws
    for d in range(draws):
        y = (rng.random(n) < prevalence).astype(np.int64)
        scores = np.where(y == 1, rng.beta(4, 2, n), rng.beta(2, 4, n))
        lam = fit_negative_threshold(scores, y, alpha=ALPHA, delta=DELTA)
        lam = 0.0 if lam is None else lam
        true_miss[d] = 5 * lam**4 - 4 * lam**5  # Beta(4, 2) CDF
    covered = np.mean(np.array(true_miss) <= ALPHA)
    tolerance = 3 * math.sqrt(DELTA * (1 - DELTA) / draws)
    assert covered >= 1 - DELTA - tolerance
    assert np.median(true_miss) > 0.02, "the rule should clear something, not only refer everything"


def test_positive_side_controls_the_false_positive_rate() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.3).astype(np.int64)
    scores = np.clip(rng.normal(0.3 + 0.35 * y, 0.15), 0.0, 1.0)
    lam = fit_positive_threshold(scores, y, alpha=0.05, delta=DELTA)
    assert lam is not None
    assert np.mean(scores[y == 0] >= lam) <= 0.05
    assert np.mean(scores[y == 1] >= lam) > 0.3, "it still calls positives"


def test_too_few_positives_give_no_threshold_rather_than_a_loosened_one() -> None:
    scores = np.array([0.1] * 10 + [0.9] * 10)
    y = np.array([1] * 10 + [0] * 10)
    assert fit_negative_threshold(scores, y, alpha=ALPHA, delta=DELTA) is None


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_levels_outside_the_open_unit_interval_are_refused(level: float) -> None:
    with pytest.raises(ReferralInputError, match="strictly between 0 and 1"):
        fit_negative_threshold(np.array([0.2, 0.8]), np.array([0, 1]), alpha=level, delta=DELTA)
    with pytest.raises(ReferralInputError, match="strictly between 0 and 1"):
        fit_negative_threshold(np.array([0.2, 0.8]), np.array([0, 1]), alpha=ALPHA, delta=level)


def test_a_label_with_no_positive_film_is_a_clear_error() -> None:
    rng = np.random.default_rng(2)
    samples = rng.random((4, 50, 14))
    y = (rng.random((50, 14)) < 0.3).astype(np.float64)
    y[:, SPEC.label_index("Cardiomegaly")] = 0.0
    with pytest.raises(ReferralInputError, match="'Cardiomegaly' has no positive calibration film"):
        fit_referral(samples, y, SPEC, alpha=ALPHA, delta=DELTA, study_alpha=ALPHA)


def test_study_score_and_decisions_match_the_service_rule() -> None:
    """The fitting side (numpy) and the serving side (bayesnet, torch) agree film by film."""
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random((n, 14)) < 0.12).astype(np.float64)
    p = np.clip(0.15 + 0.6 * y + rng.normal(0, 0.08, (n, 14)), 0, 1)
    samples = np.clip(p[None] + rng.normal(0, 0.03, (10, n, 14)), 0, 1).astype(np.float32)
    fitted = fit_referral(samples, y, SPEC, alpha=ALPHA, delta=DELTA, study_alpha=ALPHA, alpha_positive=ALPHA)
    spec = SPEC.replace(referral=fitted.spec)
    codes = {Decision.NEGATIVE: 0, Decision.POSITIVE: 1, Decision.UNCERTAIN: 2}
    served = np.array([[codes[d] for d in row] for row in decide(torch.from_numpy(samples), spec)])
    assert (served == fitted.decisions).all()
    assert study_cleared(torch.from_numpy(samples), spec) == fitted.cleared.tolist()
    index = [spec.label_index(lb) for lb in fitted.spec.study_labels]
    assert "No Finding" not in fitted.spec.study_labels
    assert study_score_array(samples.mean(axis=0).astype(np.float64), index).shape == (n,)
    assert fitted.spec.expected_normal_clearance_rate > 0.0


# --- the guarantee end to end, on a model trained on synthetic films with known truth ---------------------------


@pytest.fixture(scope="module")
def synthetic_predictions(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, ModelSpec]:
    """Calibrated MC probabilities ``(T, N, K)`` and targets of ~400 synthetic films a small trained model never saw."""
    root = tmp_path_factory.mktemp("conformal")
    data = generate(root / "synth", n=560, seed=11, image_size=64, valid_fraction=0.75, prevalence=0.12)
    fit(
        FitConfig(
            train_csv=data.train_csv,
            out=root / "run",
            arch="test_efficientnet",
            init="none",
            epochs=4,
            batch_size=32,
            lr=3e-3,
            image_size=64,
            workers=0,
            progress=False,
        )
    )
    model, spec = load_checkpoint(root / "run" / "best")
    preds = collect(model, spec, data.valid_csv, policy="chexpert", mc_samples=8)
    return sigmoid(preds.mc_logits).astype(np.float32), preds.y, spec


@pytest.mark.slow
def test_guarantee_holds_over_200_random_calibration_test_splits(
    synthetic_predictions: tuple[np.ndarray, np.ndarray, ModelSpec],
) -> None:
    samples, y, spec = synthetic_predictions
    n = y.shape[0]
    rng = np.random.default_rng(0)
    label = spec.label_index("Cardiomegaly")
    within, within_study, cleared_any = 0, 0, 0
    splits = 200
    for _ in range(splits):
        order = rng.permutation(n)
        cal, test = order[: n // 2], order[n // 2 :]
        try:
            fitted = fit_referral(samples[:, cal], y[cal], spec, alpha=ALPHA, delta=DELTA, study_alpha=ALPHA)
        except ReferralInputError:
            continue  # a draw without positives for some label: refused, never fitted
        rule = spec.replace(referral=fitted.spec)
        decisions = decide(torch.from_numpy(samples[:, test]), rule)
        positives = y[test, label] == 1.0
        cleared = np.array([row[label] == Decision.NEGATIVE for row in decisions])
        within += float(cleared[positives].mean()) <= ALPHA
        study = np.array(study_cleared(torch.from_numpy(samples[:, test]), rule))
        index = [spec.label_index(lb) for lb in fitted.spec.study_labels]
        abnormal = np.nan_to_num(y[test][:, index]).max(axis=1) == 1.0
        within_study += float(study[abnormal].mean()) <= ALPHA
        cleared_any += bool(cleared.any())
    # The test half is finite too: allow Monte-Carlo slack of 3 standard errors over the splits.
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / splits)
    assert within / splits >= 1 - DELTA - slack
    assert within_study / splits >= 1 - DELTA - slack
    assert cleared_any > splits // 2, "a model trained on synthetic films should let the rule clear findings"


# --- the command -----------------------------------------------------------------------------------------------


def test_calibrate_refuses_a_csv_without_labels_and_writes_nothing(tmp_path: Path) -> None:
    data = generate(tmp_path / "synth", n=20, seed=0, image_size=64)
    model_dir = tmp_path / "model"
    from bayesnet import build_model, save_checkpoint

    save_checkpoint(build_model(SPEC.replace(image_size=64)), None, model_dir)
    unlabeled = tmp_path / "synth" / "paths.csv"
    rows = data.valid_csv.read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, name in enumerate(header) if name in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")]
    unlabeled.write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in rows) + "\n")
    with pytest.raises(ReferralInputError, match="no label column"):
        calibrate_checkpoint(model_dir, unlabeled, out=tmp_path / "site")
    with pytest.raises(ReferralInputError, match="strictly between 0 and 1"):
        calibrate_checkpoint(model_dir, data.valid_csv, out=tmp_path / "site", alpha=1.0)
    assert not (tmp_path / "site").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site.")], "no staging directory left behind"


def test_check_reports_the_rule_on_held_out_films_with_exact_intervals() -> None:
    rng = np.random.default_rng(4)
    n = 600
    y = (rng.random((n, 14)) < 0.15).astype(np.float64)
    p = np.clip(0.15 + 0.6 * y + rng.normal(0, 0.1, (n, 14)), 0, 1)
    samples = np.clip(p[None] + rng.normal(0, 0.03, (6, n, 14)), 0, 1).astype(np.float32)
    cal, test = slice(0, 300), slice(300, n)
    fitted = fit_referral(samples[:, cal], y[cal], SPEC, alpha=ALPHA, delta=DELTA, study_alpha=ALPHA)
    spec = SPEC.replace(referral=fitted.spec)
    check = check_referral(samples[:, test], y[test], spec)
    cardiomegaly = check["per_label"]["Cardiomegaly"]["missed"]
    positives = y[test, SPEC.label_index("Cardiomegaly")] == 1
    assert cardiomegaly["of"] == int(positives.sum())
    lo, hi = cardiomegaly["ci95"]
    assert lo <= cardiomegaly["rate"] <= hi
    assert check["referred"]["of"] == 300 and check["expected"]["study_referral_rate"] == pytest.approx(
        fitted.spec.expected_study_referral_rate
    )
    assert check["abnormal_cleared"]["ci95"][0] <= ALPHA, "held-out abnormal clearance is consistent with the level"
    # On its own films, the check (the service's code) refers exactly the fraction the card states.
    own = check_referral(samples[:, cal], y[cal], spec)
    assert own["referred"]["rate"] == pytest.approx(fitted.spec.expected_study_referral_rate)
    assert own["normal_cleared"]["rate"] == pytest.approx(fitted.spec.expected_normal_clearance_rate)
    text = check_markdown(check)
    assert "| Cardiomegaly |" in text and "the card expects" in text
    with pytest.raises(ReferralInputError, match="no referral rule"):
        check_referral(samples, y, SPEC)


def test_crossfit_and_study_run_end_to_end_on_a_tiny_synthetic_set(tmp_path: Path) -> None:
    data = generate(tmp_path / "synth", n=40, seed=0, image_size=64, prevalence=0.3)
    recipe = FitConfig(
        train_csv=data.train_csv,
        out=tmp_path / "cv",
        arch="test_efficientnet",
        init="none",
        epochs=1,
        image_size=64,
        workers=0,
        progress=False,
    )
    oof = crossfit([data.train_csv, data.valid_csv], tmp_path / "cv", recipe, folds=2, mc_samples=4, ensemble=2, tta=1)
    arrays = np.load(oof)
    assert arrays["mc_logits"].shape == (4, 40, 14) and arrays["ensemble_logits"].shape == (2, 40, 14)
    assert sorted(arrays["row"].tolist()) == list(range(40)), "every film predicted exactly once"
    assert set(arrays["fold"].tolist()) == {0.0, 1.0}
    study = run_study(tmp_path / "cv", tmp_path / "study", levels=[(0.3, 0.3, 0.2, None, "mean")])
    assert set(study["estimators"]) == {"mc_dropout", "deterministic", "ensemble", "tta"}
    assert study["estimators"]["tta"]["members"] == 1
    assert "| mc_dropout |" in (tmp_path / "study" / "study.md").read_text()
