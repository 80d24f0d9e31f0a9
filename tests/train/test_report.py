"""``report.md`` from a small hand-made metrics dictionary: no model, no films, no figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from train.report import evaluation_markdown, label_table, write_report
from train.selective import selective_report

LABELS = ("Atelectasis", "Edema", "Fracture")


def _per_label(*values: float | None) -> dict[str, float | None]:
    return dict(zip(LABELS, values, strict=True))


def _metrics(**changes: Any) -> dict[str, Any]:
    """A metrics.json of three labels, "Fracture" untrained, with a real selective section on random films."""
    rng = np.random.default_rng(0)
    centre = rng.normal(0.0, 2.0, size=(60, 3))
    samples = expit(centre[None] + rng.normal(size=(8, 60, 3)))
    y = (rng.random((60, 3)) < expit(centre)).astype(np.float64)
    y[:, 2] = np.nan
    selective = selective_report(y, samples, expit(centre), np.full(3, 0.5), list(LABELS), n_boot=20, seed=0)
    metrics: dict[str, Any] = {
        "checkpoint": "runs/x/best",
        "model": {"name": "tiny", "version": "0.1.0+cal", "arch": "test_efficientnet"},
        "data": "valid.csv",
        "n_images": 60,
        "mc_samples": 8,
        "bootstrap": {"n": 20, "ci": 0.95},
        "auc_mc": _per_label(0.8125, 0.75, None),
        "auc_mc_ci": {"lo": _per_label(0.7, 0.6, None), "hi": _per_label(0.9, 0.85, None)},
        "auc_det": _per_label(0.8, 0.7, None),
        "ece_before": _per_label(0.2, 0.1, None),
        "ece_after": _per_label(0.05, 0.04, None),
        "mean_auc_mc": 0.78125,
        "mean_auc_det": 0.75,
        "mean_ece_before": 0.15,
        "mean_ece_after": 0.045,
        "temperature": _per_label(1.5, 0.9, 1.0),
        "temperature_source": "the checkpoint's spec (fitted by calibrate)",
        "referral_score": "mean MC variance over trained labels",
        "seconds_per_image": 0.0123,
        "untrained_labels": ["Fracture"],
        "selective": json.loads(json.dumps(selective, allow_nan=False)),
    }
    metrics.update(changes)
    return metrics


def test_label_table_has_a_row_per_label_and_n_a_where_undefined() -> None:
    rows = label_table(_metrics()).splitlines()
    header = "| label | AUC (MC mean) | 95% CI lo | 95% CI hi | AUC (deterministic) | ECE before | ECE after | T |"
    assert rows[0] == header
    assert rows[2] == "| Atelectasis | 0.812 | 0.700 | 0.900 | 0.800 | 0.200 | 0.050 | 1.500 |"
    assert rows[4] == "| Fracture | n/a | n/a | n/a | n/a | n/a | n/a | 1.000 |"
    assert len(rows) == 2 + len(LABELS)


def test_report_states_the_headline_numbers_and_links_every_figure(tmp_path: Path) -> None:
    metrics = _metrics()
    path = write_report(metrics, tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert text.startswith("# Evaluation of tiny 0.1.0+cal\n")
    assert "- Mean AUC over trained labels: MC mean 0.781, deterministic 0.750" in text
    assert "- Mean ECE (15 equal-width bins): 0.150 before, 0.045 after" in text
    assert "- Inference cost: 12.3 ms per image (deterministic + 8 MC samples)" in text
    assert "- Not trained (no annotations): Fracture" in text
    assert "Bootstrap: 20 resamples of films" in text
    assert metrics["selective"]["best"]["sentence"] in text
    for png in ("reliability", "roc", "referral", "risk_coverage", "selective_auroc"):
        assert f"]({png}.png)" in text, png
    assert "## The referral rule on these films" not in text  # no rule in the spec, no "referral_check"


def test_report_from_a_saved_metrics_json_is_the_same_text() -> None:
    metrics = _metrics(untrained_labels=[])
    saved = json.loads(json.dumps(metrics, allow_nan=False))
    assert evaluation_markdown(saved) == evaluation_markdown(metrics)
    assert "- Not trained (no annotations): none" in evaluation_markdown(saved)
