"""Evaluation of a checkpoint on a CheXpert-layout CSV.

``python -m train evaluate``: per-label ROC-AUC with bootstrap 95% CIs (deterministic and MC-mean side by
side), calibration (ECE with 15 equal-width bins, Brier, NLL) before and after temperature scaling,
reliability diagrams, ROC curves, and whether the MC uncertainty finds the errors (AUC vs coverage when
the most uncertain images are referred first, against random referral), and selective prediction
(:mod:`train.selective`): for every registered uncertainty score, risk-coverage curves and AURC, the AUROC,
sensitivity and specificity of the films kept at several coverages with bootstrap CIs, the referral gain, and
what per-finding referral means per film. Writes ``report.md``, ``metrics.json`` and the PNGs.

:func:`evaluate` runs the pieces: :func:`measure` computes the metrics, :func:`draw_figures` writes the PNGs,
:func:`metrics_json` assembles ``metrics.json`` and :func:`train.report.write_report` writes ``report.md`` from it.

Calibration (``python -m train calibrate``) lives in :mod:`train.calibrate`; both start from
:func:`train.predict.collect`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bayesnet import ModelSpec, load_checkpoint
from train.predict import Predictions, collect_checkpoint, sigmoid

AUC = tuple[np.ndarray, np.ndarray, np.ndarray]  # point estimate, CI low, CI high; each (K,)


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` computes on one evaluation set of N images and the K labels of the spec."""

    labels: list[str]
    y: np.ndarray  # (N, K) 0/1, NaN = unknown or not trained
    p_mc_raw: np.ndarray  # (N, K) MC-mean probability before temperature scaling
    p_mc: np.ndarray  # (N, K) MC-mean probability after temperature scaling
    temperature: np.ndarray  # (K,)
    temperature_source: str
    auc_mc: AUC
    auc_det: AUC
    ece_before: np.ndarray  # (K,)
    ece_after: np.ndarray  # (K,)
    curve: dict[str, Any]  # referral most-uncertain first
    random_curve: dict[str, Any]  # referral at random
    selective: dict[str, Any]  # metrics.json's "selective" section
    referral_check: dict[str, Any] | None  # the spec's referral rule on these films; None without a rule


def _temperature(preds: Predictions, spec: ModelSpec) -> tuple[np.ndarray, str]:
    """The spec's temperatures when calibrate fitted them, else ones fitted here (in-sample), and where from."""
    from train.calibrate import fit_temperature

    spec_temperature = np.array(spec.temperature)
    if np.any(spec_temperature != 1.0):
        return spec_temperature, "the checkpoint's spec (fitted by calibrate)"
    in_sample = "fitted on this evaluation set (in-sample; run calibrate on held-out data)"
    return fit_temperature(preds.mc_logits, preds.y), in_sample


def measure(preds: Predictions, spec: ModelSpec, *, n_boot: int = 1000, seed: int = 0) -> Measured:
    """Every metric of the evaluation: AUCs with bootstrap CIs, ECE, referral curves, selective prediction."""
    from bayesnet.spec import NO_FINDING
    from train.metrics import bootstrap_auc, ece, random_referral_curve, referral_curve
    from train.selective import selective_report

    labels = list(spec.labels)
    temperature, temperature_source = _temperature(preds, spec)
    p_det = sigmoid(preds.det_logits / temperature)
    samples = sigmoid(preds.mc_logits / temperature)
    p_mc_raw = sigmoid(preds.mc_logits).mean(axis=0)
    p_mc = samples.mean(axis=0)
    trained = [labels.index(label) for label in spec.trained_labels]
    score = samples.var(axis=0)[:, trained].mean(axis=1)  # per image: mean MC variance over trained labels
    # Selective prediction, per finding, judged with the spec's decision thresholds; a film is abnormal when a
    # trained finding other than "No Finding" is positive.
    findings = np.array([label in spec.trained_labels and label != NO_FINDING for label in labels])
    referral_check = None
    if spec.referral is not None:
        from train.conformal import check_referral

        referral_check = check_referral(samples, preds.y, spec)
    return Measured(
        labels=labels,
        y=preds.y,
        p_mc_raw=p_mc_raw,
        p_mc=p_mc,
        temperature=temperature,
        temperature_source=temperature_source,
        auc_mc=bootstrap_auc(preds.y, p_mc, n_boot=n_boot, seed=seed),
        auc_det=bootstrap_auc(preds.y, p_det, n_boot=n_boot, seed=seed),
        ece_before=ece(preds.y, p_mc_raw),
        ece_after=ece(preds.y, p_mc),
        curve=referral_curve(preds.y, p_mc, score, seed=seed),
        random_curve=random_referral_curve(preds.y, p_mc, seed=seed),
        selective=selective_report(
            preds.y, samples, p_det, np.array(spec.threshold), labels, findings=findings, n_boot=n_boot, seed=seed
        ),
        referral_check=referral_check,
    )


def draw_figures(measured: Measured, out: Path) -> None:
    """The PNGs ``report.md`` links: reliability, ROC, referral, risk-coverage and selective AUROC."""
    from train.plots import referral_plot, reliability_grid, risk_coverage_plot, roc_grid, selective_auroc_plot

    m = measured
    reliability_grid(m.y, m.p_mc_raw, m.p_mc, m.labels, out / "reliability.png")
    roc_grid(m.y, m.p_mc, m.labels, out / "roc.png", auc=m.auc_mc[0], ci=(m.auc_mc[1], m.auc_mc[2]))
    referral_plot(m.curve, m.random_curve, out / "referral.png")
    risk_coverage_plot(m.selective, out / "risk_coverage.png")
    selective_auroc_plot(m.selective, out / "selective_auroc.png")


def metrics_json(
    measured: Measured,
    spec: ModelSpec,
    preds: Predictions,
    *,
    checkpoint: Path,
    csv: Path,
    mc_samples: int,
    n_boot: int,
) -> dict[str, Any]:
    """The ``metrics.json`` dictionary: JSON-ready, per-label values keyed by label with ``None`` for NaN."""
    from train.metrics import brier, json_floats, nanmean, nll

    m = measured
    (auc_mc, lo_mc, hi_mc), (auc_det, lo_det, hi_det) = m.auc_mc, m.auc_det

    def per_label(values: np.ndarray) -> dict[str, float | None]:
        return dict(zip(m.labels, json_floats(values), strict=True))

    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": {"name": spec.name, "version": spec.version, "arch": spec.arch},
        "data": str(csv),
        "n_images": len(m.y),
        "mc_samples": mc_samples,
        "bootstrap": {"n": n_boot, "ci": 0.95},
        "auc_mc": per_label(auc_mc),
        "auc_mc_ci": {"lo": per_label(lo_mc), "hi": per_label(hi_mc)},
        "auc_det": per_label(auc_det),
        "auc_det_ci": {"lo": per_label(lo_det), "hi": per_label(hi_det)},
        "mean_auc_mc": float(nanmean(auc_mc)),
        "mean_auc_det": float(nanmean(auc_det)),
        "ece_bins": "15 equal-width bins on [0, 1]",
        "ece_before": per_label(m.ece_before),
        "ece_after": per_label(m.ece_after),
        "mean_ece_before": float(nanmean(m.ece_before)),
        "mean_ece_after": float(nanmean(m.ece_after)),
        "brier_after": per_label(brier(m.y, m.p_mc)),
        "nll_after": per_label(nll(m.y, m.p_mc)),
        "temperature": per_label(m.temperature),
        "temperature_source": m.temperature_source,
        "referral_score": "mean MC variance over trained labels",
        "referral_curve": json.loads(json.dumps(m.curve, default=float)),
        "random_referral_curve": json.loads(json.dumps(m.random_curve, default=float)),
        "seconds_per_image": preds.seconds_per_image,
        "untrained_labels": list(spec.untrained_labels),
        "selective": m.selective,
    }
    if m.referral_check is not None:
        metrics["referral_check"] = m.referral_check
    return metrics


def evaluate(
    checkpoint: Path, csv: Path, out: Path, *, mc_samples: int = 20, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Write ``report.md``, ``metrics.json`` and the PNGs for ``checkpoint`` on ``csv``; return the metrics."""
    from train.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    model, spec = load_checkpoint(checkpoint)
    preds = collect_checkpoint(model, spec, checkpoint, csv, mc_samples=mc_samples, seed=seed)
    measured = measure(preds, spec, n_boot=n_boot, seed=seed)
    draw_figures(measured, out)
    metrics = metrics_json(measured, spec, preds, checkpoint=checkpoint, csv=csv, mc_samples=mc_samples, n_boot=n_boot)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_report(metrics, out)
    return metrics
