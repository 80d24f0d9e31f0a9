"""``report.md`` of ``python -m train evaluate``, written from the metrics alone.

:func:`evaluation_markdown` reads nothing but the ``metrics.json`` dictionary that :func:`train.evaluate.evaluate`
builds (per-label values keyed by label, ``None`` where undefined), so a report can be rewritten, or tested, from a
saved ``metrics.json`` without the model, the films or the figures. The figures it links are the PNGs
:func:`train.evaluate.draw_figures` writes beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.metrics import summary_table
from train.selective import selective_markdown

#: Columns of the per-label table: heading -> ``metrics`` key (a per-label dictionary), or (key, "lo" / "hi").
_TABLE_COLUMNS: dict[str, str | tuple[str, str]] = {
    "AUC (MC mean)": "auc_mc",
    "95% CI lo": ("auc_mc_ci", "lo"),
    "95% CI hi": ("auc_mc_ci", "hi"),
    "AUC (deterministic)": "auc_det",
    "ECE before": "ece_before",
    "ECE after": "ece_after",
    "T": "temperature",
}


def label_table(metrics: Mapping[str, Any]) -> str:
    """The Markdown table of per-label AUCs, CI, ECE and temperature, in the order of ``metrics["auc_mc"]``."""
    columns = {}
    for heading, key in _TABLE_COLUMNS.items():
        per_label = metrics[key[0]][key[1]] if isinstance(key, tuple) else metrics[key]
        columns[heading] = list(per_label.values())
    return summary_table(list(metrics["auc_mc"]), **columns)


def evaluation_markdown(metrics: Mapping[str, Any]) -> str:
    """The text of ``report.md`` for the ``metrics`` of one evaluation."""
    model, n_boot, mc_samples = metrics["model"], metrics["bootstrap"]["n"], metrics["mc_samples"]
    referral_text = ""
    if "referral_check" in metrics:
        from train.conformal import check_markdown  # loads torch and MAPIE: only for a spec with a referral rule

        referral_text = check_markdown(metrics["referral_check"])
    return f"""# Evaluation of {model["name"]} {model["version"]}

- Data: `{metrics["data"]}` ({metrics["n_images"]} images); checkpoint `{metrics["checkpoint"]}`
- MC samples: {mc_samples}; bootstrap: {n_boot} resamples of images, percentile 95% CI
- Temperature: {metrics["temperature_source"]}
- Mean AUC over trained labels: MC mean {metrics["mean_auc_mc"]:.3f}, deterministic {metrics["mean_auc_det"]:.3f}
- Mean ECE (15 equal-width bins): {metrics["mean_ece_before"]:.3f} before, {metrics["mean_ece_after"]:.3f} after
  temperature scaling
- Inference cost: {metrics["seconds_per_image"] * 1e3:.1f} ms per image (deterministic + {mc_samples} MC samples)
- Not trained (no annotations): {", ".join(metrics["untrained_labels"]) or "none"}

{label_table(metrics)}

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

{selective_markdown(metrics["selective"])}
![risk-coverage](risk_coverage.png)

![selective AUROC](selective_auroc.png)

{referral_text}"""


def write_report(metrics: Mapping[str, Any], out: Path) -> Path:
    """Write ``out/report.md`` for ``metrics``; returns its path."""
    path = out / "report.md"
    path.write_text(evaluation_markdown(metrics))
    return path
