"""Recalibrating the referral rule from the audit trail (``python -m train calibrate --from-audit``): the same rule
as calibration on the same films' MC samples, from the stored scores alone; a clear refusal when the verdicts
cannot support the levels; nothing written then."""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesnet.checkpoint import load_spec, read_checkpoint_document
from bayesnet.decision import side_scores
from service.audit import AuditStore
from service.audit.outcomes import store_outcomes
from service.outcomes.parsing import FilmKey, OutcomeRow
from service.schemas import AuditRecord
from train.__main__ import main
from train.conformal import fit_referral, fit_referral_on_scores

NOW = datetime.now(timezone.utc)


def _site(spec_labels: tuple[str, ...], trained: tuple[str, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MC samples ``(T, N, K)`` and targets ``(N, K)`` of a model that separates the findings fairly well."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(spec_labels))) < 0.3).astype(np.float64)
    centre = np.where(y == 1, rng.beta(5, 2, y.shape), rng.beta(2, 5, y.shape))
    samples = np.clip(centre[None] + rng.normal(0, 0.05, (20, *y.shape)), 0.001, 0.999).astype(np.float32)
    for k, label in enumerate(spec_labels):
        if label not in trained:
            y[:, k] = np.nan
    return samples, y


@pytest.mark.parametrize("score", ["mean", "interval"])
def test_the_rule_fitted_on_stored_scores_is_the_rule_fitted_on_the_samples(
    tiny_service_checkpoint: Path, score: str
) -> None:
    spec = load_spec(tiny_service_checkpoint)
    samples, y = _site(spec.labels, spec.trained_labels, 400, seed=1)
    levels = {"alpha": 0.1, "delta": 0.1, "study_alpha": 0.1, "alpha_positive": 0.1, "score": score}
    on_samples = fit_referral(samples, y, spec, **levels)  # type: ignore[arg-type]
    negative, positive = (t.double().numpy() for t in side_scores(torch.as_tensor(samples), score))
    on_scores = fit_referral_on_scores(negative, positive, y, spec, **levels)  # type: ignore[arg-type]
    assert on_scores.spec == on_samples.spec
    assert (on_scores.decisions == on_samples.decisions).all() and (on_scores.cleared == on_samples.cleared).all()
    assert on_scores.spec.study_threshold is not None and any(t is not None for t in on_scores.spec.negative_threshold)


def _trail(url: str, checkpoint: Path, samples: np.ndarray, y: np.ndarray) -> None:
    """The films as the service records them (MC mean and 5th/95th percentiles per finding) and the verdicts."""
    spec = load_spec(checkpoint)
    sha256 = str(read_checkpoint_document(checkpoint)["weights_sha256"])
    t = torch.as_tensor(samples)
    mean = t.mean(dim=0).numpy()
    low, high = torch.quantile(t, torch.tensor([0.05, 0.95]), dim=0).numpy()
    records, rows = [], []
    for i in range(y.shape[0]):
        findings = {
            label: {
                "conf": float(mean[i, k]),
                "std": 0.05,
                "decision": "uncertain",
                "interval": (float(low[i, k]), float(high[i, k])),
            }
            for k, label in enumerate(spec.labels)
            if label in spec.trained_labels
        }
        records.append(
            AuditRecord.model_validate(
                {
                    "event_id": uuid.uuid4().hex,
                    "request_id": f"film-{i}",
                    "occurred_at": NOW - timedelta(days=1),
                    "route": "/v1/predict",
                    "client_id": None,
                    "status": 200,
                    "model": {"name": spec.name, "version": spec.version, "sha256": sha256},
                    "input_sha256": "00" * 32,
                    "input_bytes": 1,
                    "findings": findings,
                    "referral": {"refer": True, "reasons": ["uncertain_finding"], "population": []},
                    "latency_ms": 1.0,
                }
            )
        )
        verdicts = {label: bool(y[i, k]) for k, label in enumerate(spec.labels) if not np.isnan(y[i, k])}
        rows.append(OutcomeRow(i + 1, FilmKey("request_id", f"film-{i}"), verdicts, None, None))
    store = AuditStore.open(url)
    try:
        store.insert(records)
        assert store_outcomes(store, rows, [], source="csv", submitted_by=None, received_at=NOW).stored
    finally:
        store.close()


def test_the_command_refits_the_rule_from_the_trail_alone_and_refuses_too_few_verdicts(
    tiny_service_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "site"
    shutil.copytree(tiny_service_checkpoint, checkpoint)
    spec = load_spec(checkpoint)
    samples, y = _site(spec.labels, spec.trained_labels, 400, seed=2)
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    _trail(url, checkpoint, samples, y)
    out = tmp_path / "recalibrated"
    base = ["calibrate", "--checkpoint", str(checkpoint), "--from-audit", url]
    assert main([*base, "--out", str(out), "--since", "2020-01-01", "--referral-score", "interval"]) == 0
    rule = load_spec(out).referral
    levels = {"alpha": 0.1, "delta": 0.1, "study_alpha": 0.1, "alpha_positive": 0.1}
    expected = fit_referral(samples, y, spec, **levels, score="interval")
    assert rule is not None and rule.negative_threshold == expected.spec.negative_threshold
    assert rule.study_threshold == expected.spec.study_threshold and load_spec(out).version.endswith("+site")
    assert (out / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert "Of films that have a finding" in capsys.readouterr().out

    # Levels the verdicts cannot support: refused, the findings named, nothing written.
    refused = tmp_path / "refused"
    assert main([*base, "--out", str(refused), "--alpha", "0.005", "--delta", "0.01"]) == 2
    message = capsys.readouterr().err
    assert "too few films with a finding" in message and "at least 919" in message and spec.trained_labels[0] in message
    assert not refused.exists()
    # No judged film in the window asked for: refused, with what to do.
    assert main([*base, "--out", str(refused), "--since", "2099-01-01"]) == 2
    assert "send verdicts" in capsys.readouterr().err and not refused.exists()
