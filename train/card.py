"""Model cards: the human-readable account shipped beside a checkpoint (``MODEL_CARD.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bayesnet import load_checkpoint, save_checkpoint
from bayesnet.checkpoint import read_checkpoint_document

NIH_CITATION = (
    'Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. "ChestX-ray8: Hospital-scale Chest X-ray Database '
    'and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases." '
    "IEEE CVPR 2017. Data provided by the NIH Clinical Center."
)
INTENDED_USE = (
    "Demonstration and research only. Not a medical device; not for clinical use. Outputs must not inform "
    "diagnosis or treatment."
)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def model_card(metrics: dict[str, Any], *, data_notes: str, training_notes: str) -> str:
    """Markdown card from an evaluation's ``metrics.json``."""
    rows = []
    for label, auc in metrics["auc_mc"].items():
        lo, hi = metrics["auc_mc_ci"]["lo"][label], metrics["auc_mc_ci"]["hi"][label]
        rows.append(
            f"| {label} | {_fmt(auc)} | {_fmt(lo)}-{_fmt(hi)} | {_fmt(metrics['auc_det'][label])} | "
            f"{_fmt(metrics['ece_before'][label])} | {_fmt(metrics['ece_after'][label])} |"
        )
    untrained = ", ".join(metrics["untrained_labels"]) or "none"
    return f"""# Model card: {metrics["model"]["name"]} {metrics["model"]["version"]}

## Intended use
{INTENDED_USE}

## Model
{metrics["model"]["arch"]} (timm), Bayesian through Monte-Carlo dropout in the head; BatchNorm frozen at
inference; {metrics["mc_samples"]} MC samples; per-label temperature scaling, decision thresholds and
uncertainty rule in `model.json`.

## Data
{data_notes}

Citation required by the data provider: {NIH_CITATION}

Labels not trained (the source data does not annotate them; their outputs are not reported): {untrained}.

## Training
{training_notes}

## Measured performance
On `{Path(metrics["data"]).name}`, {metrics["n_images"]} images; bootstrap 95% CIs ({metrics["bootstrap"]["n"]}
resamples); ECE with {metrics["ece_bins"]}. Temperature: {metrics["temperature_source"]}.

| finding | AUC (MC mean) | 95% CI | AUC (deterministic) | ECE before | ECE after |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Mean AUC over trained labels: {metrics["mean_auc_mc"]:.3f} (MC mean), {metrics["mean_auc_det"]:.3f}
(deterministic). Mean ECE: {metrics["mean_ece_before"]:.3f} before, {metrics["mean_ece_after"]:.3f} after
temperature scaling.

## Limitations
Small, label-balanced sample with text-mined labels: AUCs have wide intervals and calibration does not
transfer to a natural prevalence. Evaluated on the same split used for model selection and calibration
unless stated otherwise, so the numbers are optimistic. Never validated prospectively.
"""


def export(checkpoint: Path, report: Path, out: Path, *, data_notes: str, training_notes: str) -> Path:
    """Write a half-precision copy of ``checkpoint`` and its ``MODEL_CARD.md`` to ``out``."""
    model, spec = load_checkpoint(checkpoint)
    metrics = json.loads((report / "metrics.json").read_text())
    document = read_checkpoint_document(checkpoint)
    metadata = dict(document.get("metadata") or {})
    metadata["metrics"] = {
        "data": Path(metrics["data"]).name,
        "n_images": metrics["n_images"],
        "mean_auc_mc": metrics["mean_auc_mc"],
        "auc_mc": metrics["auc_mc"],
        "auc_mc_ci": metrics["auc_mc_ci"],
        "mean_ece_before": metrics["mean_ece_before"],
        "mean_ece_after": metrics["mean_ece_after"],
    }
    metadata["intended_use"] = INTENDED_USE
    save_checkpoint(model, spec, out, dtype=torch.float16, metadata=metadata)
    (out / "MODEL_CARD.md").write_text(model_card(metrics, data_notes=data_notes, training_notes=training_notes))
    return out
