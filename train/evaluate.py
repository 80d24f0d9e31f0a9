"""Evaluation of a checkpoint on a CheXpert-layout CSV.

``python -m train evaluate``: per-label ROC-AUC with bootstrap 95% CIs (deterministic and MC-mean side by
side), calibration (ECE with 15 equal-width bins, Brier, NLL) before and after temperature scaling,
reliability diagrams, ROC curves, and whether the MC uncertainty finds the errors (AUC vs coverage when
the most uncertain images are referred first, against random referral), and selective prediction
(:mod:`train.selective`): for every registered uncertainty score, risk-coverage curves and AURC, the AUROC,
sensitivity and specificity of the films kept at several coverages with bootstrap CIs, the referral gain, and
what per-finding referral means per film. Writes ``report.md``, ``metrics.json`` and the PNGs.

Calibration (``python -m train calibrate``) lives in :mod:`train.calibrate`; both start from
:func:`train.predict.collect`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bayesnet import load_checkpoint
from train.predict import collect_checkpoint, sigmoid


def evaluate(
    checkpoint: Path,
    csv: Path,
    out: Path,
    *,
    mc_samples: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``report.md``, ``metrics.json`` and the PNGs for ``checkpoint`` on ``csv``; return the metrics."""
    from bayesnet.spec import NO_FINDING
    from train.calibrate import fit_temperature
    from train.metrics import (
        bootstrap_auc,
        brier,
        ece,
        json_floats,
        nanmean,
        nll,
        random_referral_curve,
        referral_curve,
        summary_table,
    )
    from train.plots import referral_plot, reliability_grid, risk_coverage_plot, roc_grid, selective_auroc_plot
    from train.selective import selective_markdown, selective_report

    out.mkdir(parents=True, exist_ok=True)
    model, spec = load_checkpoint(checkpoint)
    preds = collect_checkpoint(model, spec, checkpoint, csv, mc_samples=mc_samples, seed=seed)
    labels = list(spec.labels)
    spec_temperature = np.array(spec.temperature)
    calibrated = bool(np.any(spec_temperature != 1.0))
    if calibrated:
        temperature, temperature_source = spec_temperature, "the checkpoint's spec (fitted by calibrate)"
    else:
        temperature = fit_temperature(preds.mc_logits, preds.y)
        temperature_source = "fitted on this evaluation set (in-sample; run calibrate on held-out data)"
    p_det = sigmoid(preds.det_logits / temperature)
    samples_raw = sigmoid(preds.mc_logits)
    samples = sigmoid(preds.mc_logits / temperature)
    p_mc_raw = samples_raw.mean(axis=0)
    p_mc = samples.mean(axis=0)

    auc_det, lo_det, hi_det = bootstrap_auc(preds.y, p_det, n_boot=n_boot, seed=seed)
    auc_mc, lo_mc, hi_mc = bootstrap_auc(preds.y, p_mc, n_boot=n_boot, seed=seed)
    ece_before, ece_after = ece(preds.y, p_mc_raw), ece(preds.y, p_mc)
    variance = samples.var(axis=0)
    trained = [labels.index(label) for label in spec.trained_labels]
    score = variance[:, trained].mean(axis=1)  # per image: mean MC variance over trained labels
    curve = referral_curve(preds.y, p_mc, score, seed=seed)
    random_curve = random_referral_curve(preds.y, p_mc, seed=seed)

    reliability_grid(preds.y, p_mc_raw, p_mc, labels, out / "reliability.png")
    roc_grid(preds.y, p_mc, labels, out / "roc.png", auc=auc_mc, ci=(lo_mc, hi_mc))
    referral_plot(curve, random_curve, out / "referral.png")
    # Selective prediction, per finding, judged with the spec's decision thresholds; a film is abnormal when a
    # trained finding other than "No Finding" is positive.
    findings = np.array([label in spec.trained_labels and label != NO_FINDING for label in labels])
    selective = selective_report(
        preds.y, samples, p_det, np.array(spec.threshold), labels, findings=findings, n_boot=n_boot, seed=seed
    )
    risk_coverage_plot(selective, out / "risk_coverage.png")
    selective_auroc_plot(selective, out / "selective_auroc.png")

    def per_label(values: np.ndarray) -> dict[str, float | None]:
        return dict(zip(labels, json_floats(values), strict=True))

    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": {"name": spec.name, "version": spec.version, "arch": spec.arch},
        "data": str(csv),
        "n_images": len(preds.y),
        "mc_samples": mc_samples,
        "bootstrap": {"n": n_boot, "ci": 0.95},
        "auc_mc": per_label(auc_mc),
        "auc_mc_ci": {"lo": per_label(lo_mc), "hi": per_label(hi_mc)},
        "auc_det": per_label(auc_det),
        "auc_det_ci": {"lo": per_label(lo_det), "hi": per_label(hi_det)},
        "mean_auc_mc": float(nanmean(auc_mc)),
        "mean_auc_det": float(nanmean(auc_det)),
        "ece_bins": "15 equal-width bins on [0, 1]",
        "ece_before": per_label(ece_before),
        "ece_after": per_label(ece_after),
        "mean_ece_before": float(nanmean(ece_before)),
        "mean_ece_after": float(nanmean(ece_after)),
        "brier_after": per_label(brier(preds.y, p_mc)),
        "nll_after": per_label(nll(preds.y, p_mc)),
        "temperature": per_label(temperature),
        "temperature_source": temperature_source,
        "referral_score": "mean MC variance over trained labels",
        "referral_curve": json.loads(json.dumps(curve, default=float)),
        "random_referral_curve": json.loads(json.dumps(random_curve, default=float)),
        "seconds_per_image": preds.seconds_per_image,
        "untrained_labels": list(spec.untrained_labels),
        "selective": selective,
    }
    referral_text = ""
    if spec.referral is not None:
        from train.conformal import check_markdown, check_referral

        metrics["referral_check"] = check_referral(samples, preds.y, spec)
        referral_text = check_markdown(metrics["referral_check"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    table = summary_table(
        labels,
        **{
            "AUC (MC mean)": auc_mc,
            "95% CI lo": lo_mc,
            "95% CI hi": hi_mc,
            "AUC (deterministic)": auc_det,
            "ECE before": ece_before,
            "ECE after": ece_after,
            "T": temperature,
        },
    )
    report = f"""# Evaluation of {spec.name} {spec.version}

- Data: `{csv}` ({len(preds.y)} images); checkpoint `{checkpoint}`
- MC samples: {mc_samples}; bootstrap: {n_boot} resamples of images, percentile 95% CI
- Temperature: {temperature_source}
- Mean AUC over trained labels: MC mean {metrics["mean_auc_mc"]:.3f}, deterministic {metrics["mean_auc_det"]:.3f}
- Mean ECE (15 equal-width bins): {metrics["mean_ece_before"]:.3f} before, {metrics["mean_ece_after"]:.3f} after
  temperature scaling
- Inference cost: {preds.seconds_per_image * 1e3:.1f} ms per image (deterministic + {mc_samples} MC samples)
- Not trained (no annotations): {", ".join(spec.untrained_labels) or "none"}

{table}

## Calibration

![reliability](reliability.png)

## ROC curves

![roc](roc.png)

## Does the uncertainty find the errors?

Images are referred most-uncertain first (score: {metrics["referral_score"]}); the curve shows the mean
AUC on the images kept, against referring the same number at random.

![referral](referral.png)

## Selective prediction

Each finding is referred on its own: label k keeps the fraction c (coverage) of its films with the lowest
uncertainty score and is scored on those; macro = mean over trained labels. Risk is the error rate of the
decision `p >= threshold` (the spec's thresholds) on the kept films; AURC is the area under the
risk-coverage curve (lower is better) and E-AURC its excess over a score that ranks every error last.
`baseline_single_pass` uses the one no-dropout pass for its AUROC and decisions; every other score the MC
mean. Bootstrap: {n_boot} resamples of films, the selection redone on each, paired across scores. Study
level: a film is referred when any of its findings is; "abnormal cleared" is the fraction of films with a
positive finding that were neither referred nor called positive on any finding; "miss rate" the macro
fraction of positives, among findings not referred, decided negative.

{selective_markdown(selective)}
![risk-coverage](risk_coverage.png)

![selective AUROC](selective_auroc.png)

{referral_text}"""
    (out / "report.md").write_text(report)
    return metrics
