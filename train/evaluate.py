"""Evaluation and calibration of a checkpoint on a CheXpert-layout CSV.

``python -m train evaluate``: per-label ROC-AUC with bootstrap 95% CIs (deterministic and MC-mean side by
side), calibration (ECE with 15 equal-width bins, Brier, NLL) before and after temperature scaling,
reliability diagrams, ROC curves, and whether the MC uncertainty finds the errors (AUC vs coverage when
the most uncertain images are referred first, against random referral). Writes ``report.md``,
``metrics.json`` and the PNGs.

``python -m train calibrate``: fits per-label temperature (NLL of the MC-mean probability), decision
thresholds (Youden's J) and the uncertainty rule's parameter, and writes them into the checkpoint's spec
as a new version.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayesnet import BayesianEfficientNet, ModelSpec, load_checkpoint, save_checkpoint
from bayesnet.checkpoint import SPEC_FILE, read_checkpoint_document
from bayesnet.mc import mc_logits
from bayesnet.ood import copy_ood_gate

log = logging.getLogger("train.evaluate")


@dataclass(frozen=True)
class Predictions:
    """Everything evaluation needs, for N images and the K labels of the spec."""

    y: np.ndarray  # (N, K) 0/1, NaN = unknown or a label the model was not trained on
    det_logits: np.ndarray  # (N, K) deterministic pass
    mc_logits: np.ndarray  # (T, N, K) stochastic passes (uncalibrated)
    seconds_per_image: float


def _policy_of(checkpoint: Path) -> str:
    document = read_checkpoint_document(checkpoint)
    config = (document.get("metadata") or {}).get("config") or {}
    return str(config.get("uncertain_policy", "chexpert"))


def collect(
    model: BayesianEfficientNet,
    spec: ModelSpec,
    csv: Path,
    *,
    policy: str,
    mc_samples: int,
    batch_size: int = 16,
    workers: int = 0,
    seed: int = 0,
    device: torch.device | None = None,
) -> Predictions:
    """Run the model over a CSV: deterministic logits and T stochastic logits per image (trunk once)."""
    from train.data import load_chexpert, make_loader, parse_uncertain_policy

    device = device or next(model.parameters()).device
    ds = load_chexpert(csv, policy=parse_uncertain_policy(policy))
    loader = make_loader(ds, spec, train=False, batch_size=batch_size, workers=workers, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    ys, dets, mcs = [], [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device)
            trunk = model.forward_trunk(x)
            dets.append(model.forward_stochastic(trunk).float().cpu())  # eval mode, no masks: deterministic
            mcs.append(mc_logits(model, trunk, mc_samples, generator=generator).cpu())
            ys.append(y)
    elapsed = time.perf_counter() - started
    y_all = torch.cat(ys).numpy().astype(np.float64)
    untrained = [i for i, label in enumerate(spec.labels) if label not in spec.trained_labels]
    y_all[:, untrained] = np.nan
    return Predictions(
        y=y_all,
        det_logits=torch.cat(dets).numpy().astype(np.float64),
        mc_logits=torch.cat(mcs, dim=1).numpy().astype(np.float64),
        seconds_per_image=elapsed / max(1, len(y_all)),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def calibrate(
    checkpoint: Path,
    csv: Path,
    *,
    out: Path | None = None,
    mc_samples: int = 20,
    target_referral: float = 0.1,
    seed: int = 0,
) -> ModelSpec:
    """Fit temperature, thresholds and the uncertainty rule on ``csv``; save the spec as a new version."""
    from train.calibrate import calibrated_spec, fit_temperature, fit_thresholds, fit_uncertainty_thresholds
    from train.metrics import ece

    model, spec = load_checkpoint(checkpoint)
    preds = collect(model, spec, csv, policy=_policy_of(checkpoint), mc_samples=mc_samples, seed=seed)
    temperature = fit_temperature(preds.mc_logits, preds.y)
    samples = _sigmoid(preds.mc_logits / temperature)
    p_before = _sigmoid(preds.mc_logits).mean(axis=0)
    p_after = samples.mean(axis=0)
    thresholds = fit_thresholds(preds.y, p_after)
    uncertainty = fit_uncertainty_thresholds(
        preds.y, samples.astype(np.float32), thresholds, target_referral=target_referral
    )
    new_spec = calibrated_spec(
        spec,
        temperature=temperature,
        threshold=thresholds,
        uncertainty_threshold=uncertainty,
        n_images=len(preds.y),
        ece_before=ece(preds.y, p_before),
        ece_after=ece(preds.y, p_after),
        details={"data": csv.name, "mc_samples": mc_samples, "target_referral": target_referral},
    )
    document = read_checkpoint_document(checkpoint)
    target = out or checkpoint
    save_checkpoint(model, new_spec, target, metadata=document.get("metadata") or {})
    copy_ood_gate(checkpoint, target, new_spec)
    card = checkpoint / "MODEL_CARD.md"
    if out is not None and card.is_file():
        (out / "MODEL_CARD.md").write_text(card.read_text())
    log.info("calibrated spec %s written to %s", new_spec.version, target / SPEC_FILE)
    return new_spec


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
    from train.plots import referral_plot, reliability_grid, roc_grid

    out.mkdir(parents=True, exist_ok=True)
    model, spec = load_checkpoint(checkpoint)
    preds = collect(model, spec, csv, policy=_policy_of(checkpoint), mc_samples=mc_samples, seed=seed)
    labels = list(spec.labels)
    spec_temperature = np.array(spec.temperature)
    calibrated = bool(np.any(spec_temperature != 1.0))
    if calibrated:
        temperature, temperature_source = spec_temperature, "the checkpoint's spec (fitted by calibrate)"
    else:
        temperature = fit_temperature(preds.mc_logits, preds.y)
        temperature_source = "fitted on this evaluation set (in-sample; run calibrate on held-out data)"
    p_det = _sigmoid(preds.det_logits / temperature)
    samples_raw = _sigmoid(preds.mc_logits)
    samples = _sigmoid(preds.mc_logits / temperature)
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
    }
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
"""
    (out / "report.md").write_text(report)
    return metrics
