"""Model cards: the human-readable account shipped beside a checkpoint (``MODEL_CARD.md``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bayesnet import load_checkpoint, save_checkpoint
from bayesnet.checkpoint import read_checkpoint_document
from bayesnet.ood import copy_ood_gate
from bayesnet.referral import describe
from bayesnet.spec import ReferralSpec

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


OOD_HEADING = "## Out-of-distribution gate"


def ood_section(report: dict[str, Any]) -> str:
    """Markdown for the out-of-distribution gate from the report of ``python -m train ood``."""
    variants = report.get("variants") or []
    rows = "\n".join(
        f"| {v['kind']} | {v['dims']} | {_fmt(v['auroc'])} | {100 * v['outliers_flagged']:.0f}% |" for v in variants
    )
    table = (
        "\n\nVariants compared on the same images (threshold recalibrated for each):\n\n"
        "| score | PCA dims | AUROC | non-radiographs flagged |\n|---|---:|---:|---:|\n" + rows
        if rows
        else ""
    )
    missed = ", ".join(report.get("missed") or []) or "none"
    others = ", ".join(
        f"{name} {v['score_over_threshold']:.2f} ({'accepted' if v['accepted'] else 'flagged'})"
        for name, v in (report.get("other_chest") or {}).items()
    )
    others = others or "not available"
    kinds = ", ".join(f"{kind} {count}" for kind, count in (report.get("flagged_by_kind") or {}).items())
    return f"""{OOD_HEADING}
Score (`python -m train ood`), computed from the pooled trunk features every batch already has:
{report["method"]}.

Fitted on the {report["n_train"]} frontal radiographs of `{report["train_csv"]}`. Threshold:
{report["threshold"]:.2f}, the {100 * report["threshold_quantile"]:.0f}th percentile of the scores of the
{report["n_valid"]} held-out radiographs of `{report["valid_csv"]}`. Above it a response is marked
`in_distribution: false`, or refused with 422 when the service runs with `CXR_OOD_ACTION=reject`.

- AUROC, held-out radiographs against {report["n_outliers"]} images that are not frontal chest radiographs
  (scikit-image photos, textures and text, a tibia radiograph, a CT slice and a head phantom as PNG,
  noise, synthetic shapes): {report["auroc"]:.3f}.
- Flagged at the threshold: {100 * report["outliers_flagged"]:.0f}% ({kinds}); missed: {missed}. The least
  unusual of them scores {report["lowest_outlier_over_threshold"]:.2f} x the threshold.
- Radiographs accepted: {100 * report["valid_accepted"]:.1f}% of `{report["valid_csv"]}` (held out),
  {100 * report["train_accepted"]:.1f}% of `{report["train_csv"]}` (the fitting images: optimistic).
- Chest radiographs from another source (pydicom-data's NEMA RG1, a PA chest CR as DICOM), score /
  threshold: {others}.{table}

What the gate does not detect: it was not tested on lateral chest views, paediatric films or a set of
chest films from other hospitals and scanners (none are available here), so it may flag good films from
an unseen site and may pass a lateral view or another radiograph that looks chest-like. It is a guard
against the wrong kind of image, not a quality check, and the threshold rests on {report["n_valid"]}
validation films.
"""


def with_section(card: str, heading: str, section: str) -> str:
    """``card`` with the section under ``heading`` replaced by ``section`` (or inserted before "## Limitations")."""
    start = card.find(heading)
    if start >= 0:
        end = card.find("\n## ", start + len(heading))
        return card[:start] + section + (card[end + 1 :] if end >= 0 else "")
    anchor = card.find("## Limitations")
    if anchor < 0:
        return card.rstrip("\n") + "\n\n" + section
    return card[:anchor] + section + "\n" + card[anchor:]


def counts_text(counts: Sequence[int]) -> str:
    """``(k, n)`` as "k/n", how the OOD report's flagged and caught counts are written."""
    return f"{counts[0]}/{counts[1]}"


def validated_ood_section(report: dict[str, Any]) -> str:
    """The out-of-distribution section from the report of :func:`train.ood.fit_ood` (a gate validated in folds)."""

    validation = report["validation"]
    sources = ", ".join(f"{name} ({n})" for name, n in report["sources"].items())
    per_source = ", ".join(f"{s} {counts_text(v)}" for s, v in validation["held_out_flagged"].items())
    caught = ", ".join(f"{k} {counts_text(v)}" for k, v in validation["non_chest_caught"].items())
    new_site = "; ".join(
        f"with {row['held_out']} left out of the fit, {counts_text(row['flagged'])} of its films are flagged"
        for row in validation["new_source"]
    )
    others = ", ".join(
        f"{name} {v['score_over_threshold']:.2f} ({'accepted' if v['accepted'] else 'flagged'})"
        for name, v in (report.get("other_chest") or {}).items()
    )
    rows = "\n".join(
        f"| {v['feature_map']} | {v['kind']} | {v['dims']} | {v['crops']} | {v['held_out_flagged']} | "
        f"{v['new_source_flagged']} | {v['non_chest_caught']} | {v['auroc']:.4f} |"
        for v in report.get("variants") or []
    )
    variants = (
        "\n\nRecipes validated the same way (flagged / caught summed over the folds):\n\n"
        "| features | score | PCA dims | crops per film | held-out films flagged | flagged, source left out | "
        "non-chest caught | AUROC |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + rows
        if rows
        else ""
    )
    missed = ", ".join(report.get("missed") or []) or "none"
    children = report.get("children_left_out")
    paediatric = (
        f"paediatric films ({children['n']} films of children in the sources were left out of the reference: too "
        "few to say whether the gate tells them apart; Patient's Age in a DICOM header is what catches them)"
        if children
        else "paediatric films (none available; Patient's Age in a DICOM header is what catches them)"
    )
    crops = report["crops_per_film"]
    crops_note = f", each also as {crops} random field-of-view crop(s)" if crops else ""
    return f"""{OOD_HEADING}
Score (`python -m train ood`, docs/ood.md), computed from the pooled trunk features every batch already has:
{report["method"]}. Reference: {report["n_train"]} adult frontal chest films of {report["n_patients"]} patients
({sources}){crops_note}. Threshold {report["threshold"]:.4f}: the {report["threshold_from"]}.
Above it a response is marked `in_distribution: false`, or refused with 422 when the service runs with
`CXR_OOD_ACTION=reject`.

Validated in {len(validation["folds"])} folds grouped by patient (each fold's gate fitted and thresholded without
the films it is tested on):
- held-out chest films flagged: {counts_text(validation["held_out_flagged_total"])} ({per_source});
- images that are not chest radiographs caught: {counts_text(validation["non_chest_caught_total"])} summed over the
  folds ({caught}); mean AUROC {validation["auroc"]:.4f};
- a site the gate never saw: {new_site or "n/a (one source)"}.

The shipped gate (fitted on every film): {100 * report["outliers_flagged"]:.0f}% of {report["n_outliers"]} non-chest
images flagged; missed: {missed}. Chest films never fitted, score / threshold: {others or "none available"}.{variants}

What the gate does not detect: lateral views (none available here to test; the DICOM View Position and the
declared view are what catch them), {paediatric}, and it is a guard against the wrong kind of image, not a
quality check. Films from a new site are flagged more
often than films from the sites above until the gate is refitted with some of that site's films (`--films`).

"""


def with_ood_section(card: str, report: dict[str, Any]) -> str:
    """``card`` with its out-of-distribution section replaced (or inserted before "## Limitations").

    A report of the cross-fitted gate (it has ``validation``: folds by patient, sources left out) is rendered by
    :func:`validated_ood_section`; an older report by :func:`ood_section`.
    """
    if "validation" in report:
        return with_section(card, OOD_HEADING, validated_ood_section(report))
    return with_section(card, OOD_HEADING, ood_section(report))


REFERRAL_HEADING = "## Referral rule"


def referral_section(rule: ReferralSpec, report: dict[str, Any]) -> str:
    """The card's account of the referral rule: the guarantee in words, what it cost, per finding, the trade-off.

    ``report`` is the ``referral_report.json`` that ``python -m train calibrate`` writes beside the spec.
    """
    rows = []
    for label, row in report["fit"]["per_label"].items():
        rows.append(
            f"| {label} | {row['positives']} / {row['n']} | {_fmt(row['negative_threshold'])} | "
            f"{_fmt(row['positive_threshold'])} | {row['cleared_fraction']:.0%} | {row['miss_rate']:.0%} |"
        )
    tradeoff = "\n".join(
        f"| {r['alpha']:.2f} | {r['study_referral_rate']:.0%} | {r['normal_clearance_rate']:.0%} | "
        f"{r['finding_cleared_rate']:.0%} |"
        for r in report["tradeoff"]
    )
    calibration = rule.calibration
    return f"""{REFERRAL_HEADING}
{describe(rule)}

Method: {rule.method}; score: {rule.score} (see docs/uncertainty.md).
Calibration films: {calibration.get("n_films")} ({calibration.get("n_abnormal")} abnormal, \
{calibration.get("n_normal")} normal) from `{calibration.get("data", "?")}`; {calibration.get("fitted_with", "")}.
The guarantee holds only while the films a site sends are exchangeable with these: a new site, scanner or
population needs its own `python -m train calibrate --data site.csv`.

| finding | positives / films | clear below | positive from | cleared | missed (calibration) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

"n/a": the calibration films cannot support that side of the rule at these levels; it never fires.

Trade-off on the calibration films (alpha = study_alpha, delta = {rule.delta}), `referral_tradeoff.png`:

| alpha | films referred | normal films cleared | findings cleared |
|---:|---:|---:|---:|
{tradeoff}
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
    copy_ood_gate(checkpoint, out, spec)  # the gate's features come from the same trunk: it travels along
    card = model_card(metrics, data_notes=data_notes, training_notes=training_notes)
    if spec.ood is not None and isinstance(metadata.get("ood"), dict):
        card = with_ood_section(card, metadata["ood"])
    referral_report = checkpoint / "referral_report.json"
    if spec.referral is not None and referral_report.is_file():
        card = with_section(
            card, REFERRAL_HEADING, referral_section(spec.referral, json.loads(referral_report.read_text()))
        )
        for name in ("referral_report.json", "referral_tradeoff.png"):
            if (checkpoint / name).is_file() and (checkpoint / name).resolve() != (out / name).resolve():
                (out / name).write_bytes((checkpoint / name).read_bytes())
    (out / "MODEL_CARD.md").write_text(card)
    return out
