"""Evaluation figures as PNG files: reliability diagrams, ROC curves, referral and selective-prediction curves.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas directly,
never through ``pyplot``: no global backend switch (importing this module changes nothing), no GUI,
no figure registry that would keep figures alive (so nothing to close and no "too many figures"
warning), and safe from worker threads. Array conventions are those of :mod:`train.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from train.metrics import FloatArray, as_targets, ece, per_label_auc, reliability_bins

_PANEL_INCHES = 3.0
_DPI = 100


def _grid(n_panels: int) -> tuple[Figure, list[Axes]]:
    """A near-square grid with one panel per label (14 -> 4 x 4); the unused panels are hidden."""
    n_cols = max(1, math.ceil(math.sqrt(n_panels)))
    n_rows = max(1, math.ceil(n_panels / n_cols))
    fig = Figure(figsize=(_PANEL_INCHES * n_cols, _PANEL_INCHES * n_rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(np.asarray(fig.subplots(n_rows, n_cols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    return fig, axes[:n_panels]


def _unit_square(ax: Axes) -> None:
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _labels_checked(labels: Sequence[str], n_labels: int) -> list[str]:
    names = list(labels)
    if len(names) != n_labels:
        raise ValueError(f"{len(names)} label names for {n_labels} columns")
    return names


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def reliability_grid(
    y: ArrayLike, p_before: ArrayLike, p_after: ArrayLike, labels: Sequence[str], path: str | Path
) -> Path:
    """One PNG of reliability diagrams, a panel per label, before and after temperature scaling.

    Each panel shows the diagonal (perfect calibration) and, per non-empty bin of the 15 equal-width bins
    of :func:`train.metrics.reliability_bins`, the fraction of positives against the mean predicted
    probability; the title carries both ECEs. A label without valid targets says "no data".
    """
    targets = as_targets(y)
    ece_before, ece_after = ece(targets, p_before), ece(targets, p_after)
    before, after = np.asarray(p_before, dtype=np.float64), np.asarray(p_after, dtype=np.float64)
    names = _labels_checked(labels, targets.shape[1])
    fig, axes = _grid(len(names))
    for k, (ax, name) in enumerate(zip(axes, names, strict=True)):
        _unit_square(ax)
        ax.set_title(f"{name}\nECE {_fmt(ece_before[k])} → {_fmt(ece_after[k])}", fontsize=8)
        if math.isnan(ece_before[k]):
            _no_data(ax)
            continue
        for probs, style, legend in ((before, "o-", "before"), (after, "s-", "after")):
            _, confidence, accuracy, counts = reliability_bins(targets[:, k], probs[:, k])
            filled = counts > 0
            ax.plot(confidence[filled], accuracy[filled], style, markersize=3, linewidth=1.2, label=legend)
        ax.legend(fontsize=6, loc="upper left")
    fig.supxlabel("mean predicted probability")
    fig.supylabel("fraction positive")
    return _save(fig, path)


def roc_grid(
    y: ArrayLike,
    p: ArrayLike,
    labels: Sequence[str],
    path: str | Path,
    auc: ArrayLike | None = None,
    ci: tuple[ArrayLike, ArrayLike] | None = None,
) -> Path:
    """One PNG of ROC curves, a panel per label; titles give the AUC (computed if not given) and the CI.

    ``ci`` is ``(lo, hi)``, each ``(K,)``, e.g. from :func:`train.metrics.bootstrap_auc`. A label with a
    single class or no valid targets says "no data".
    """
    targets = as_targets(y)
    probs = np.asarray(p, dtype=np.float64)
    names = _labels_checked(labels, targets.shape[1])
    aucs = per_label_auc(targets, probs) if auc is None else np.asarray(auc, dtype=np.float64).reshape(-1)
    lows, highs = (np.full(len(names), np.nan),) * 2 if ci is None else (np.asarray(c, dtype=np.float64) for c in ci)
    fig, axes = _grid(len(names))
    for k, (ax, name) in enumerate(zip(axes, names, strict=True)):
        _unit_square(ax)
        title = f"{name}\nAUC {_fmt(float(aucs[k]))}"
        if not (math.isnan(lows[k]) or math.isnan(highs[k])):
            title += f" [{lows[k]:.3f}, {highs[k]:.3f}]"
        ax.set_title(title, fontsize=8)
        valid = ~np.isnan(targets[:, k])
        y_k = targets[valid, k]
        if not 0 < y_k.sum() < y_k.size:  # roc_curve warns on a single class
            _no_data(ax)
            continue
        fpr, tpr, _ = roc_curve(y_k, probs[valid, k])
        ax.plot(fpr, tpr, linewidth=1.4)
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    return _save(fig, path)


def _series(curve: Mapping[str, Any], key: str) -> FloatArray:
    """A curve's list (``None`` for undefined) as floats with NaN, which matplotlib leaves as a gap."""
    return np.array([np.nan if v is None else float(v) for v in curve.get(key) or []], dtype=np.float64)


def referral_plot(curve: Mapping[str, Any], random_curve: Mapping[str, Any], path: str | Path) -> Path:
    """One PNG: metric vs coverage for uncertainty-based referral against random referral.

    Takes the dicts of :func:`train.metrics.referral_curve` and :func:`train.metrics.random_referral_curve`
    (e.g. read back from JSON). The random curve is drawn with a band of +- one standard deviation over its
    repeats. Coverage decreases to the right, as more images are referred. A second panel shows accuracy.
    """
    panels = [("auc", "mean per-label AUC")]
    if "accuracy" in curve and "accuracy" in random_curve:
        panels.append(("accuracy", "mean per-label accuracy"))
    fig = Figure(figsize=(5.0 * len(panels), 4.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        coverage = _series(curve, "coverage")
        ax.plot(coverage, _series(curve, key), "o-", label="refer most uncertain")
        random_coverage = _series(random_curve, "coverage")
        random_mean = _series(random_curve, key)
        ax.plot(random_coverage, random_mean, "s--", color="0.4", label="refer at random")
        spread = _series(random_curve, f"{key}_std")
        if spread.size == random_mean.size:
            ax.fill_between(random_coverage, random_mean - spread, random_mean + spread, color="0.8", alpha=0.6)
        if coverage.size:
            ax.set_xlim(coverage.max() + 0.01, coverage.min() - 0.01)
        ax.set_xlabel("coverage (fraction of images kept)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Referral by MC-dropout uncertainty")
    return _save(fig, path)


def referral_tradeoff_plot(rows: Sequence[Mapping[str, float]], *, chosen: float) -> bytes:
    """PNG bytes: films referred, normal films cleared and findings cleared against the guaranteed level alpha.

    ``rows`` are :func:`train.conformal.tradeoff` rows; ``chosen`` is marked, so a site sees what a looser or
    stricter guarantee would cost before it picks an operating point.
    """
    import io

    alphas = np.array([row["alpha"] for row in rows], dtype=np.float64)
    fig = Figure(figsize=(6.0, 4.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, name in (
        ("study_referral_rate", "films referred"),
        ("normal_clearance_rate", "normal films cleared"),
        ("finding_cleared_rate", "findings cleared (mean over labels)"),
    ):
        ax.plot(alphas, [row[key] for row in rows], marker="o", label=name)
    ax.axvline(chosen, color="0.5", linestyle="--", linewidth=1.0, label=f"chosen alpha = {chosen:g}")
    ax.set_xlabel("alpha = study_alpha (guaranteed maximum miss rate)")
    ax.set_ylabel("fraction of calibration films")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Referral trade-off", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _score_style(name: str) -> dict[str, Any]:
    """The random reference is drawn grey and dashed so the scores it must beat stand out."""
    return {"color": "0.4", "linestyle": "--"} if name == "random" else {}


def _coverage_axis(ax: Axes, coverage: FloatArray) -> None:
    if coverage.size:
        ax.set_xlim(coverage.max() + 0.01, coverage.min() - 0.01)  # coverage falls to the right: more referred
    ax.set_xlabel("coverage (fraction of each label's films kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def risk_coverage_plot(selective: Mapping[str, Any], path: str | Path) -> Path:
    """One PNG: macro risk (error rate of the kept decisions) against coverage, a line per uncertainty score.

    Takes the ``"selective"`` section of :func:`train.selective.selective_report` (also as read back from
    JSON); the legend gives each score's macro AURC, the area under its curve (lower is better).
    """
    fig = Figure(figsize=(6.0, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    coverage = np.array([], dtype=np.float64)
    for name, entry in selective["scores"].items():
        curve = entry["risk_coverage"]
        coverage = _series(curve, "coverage")
        aurc = entry["aurc"]["macro"]
        label = f"{name} (AURC {_fmt(math.nan if aurc is None else float(aurc))})"
        ax.plot(coverage, _series(curve, "macro_risk"), linewidth=1.4, label=label, **_score_style(name))
    ax.set_ylabel("macro risk (error rate on kept films)")
    _coverage_axis(ax, coverage)
    fig.suptitle("Risk-coverage: refer each label's least certain films first")
    return _save(fig, path)


def selective_auroc_plot(selective: Mapping[str, Any], path: str | Path) -> Path:
    """One PNG: macro AUROC of the kept films against coverage, a line per score with its bootstrap CI band.

    Takes the ``"selective"`` section of :func:`train.selective.selective_report` (also as read back from JSON).
    """
    fig = Figure(figsize=(6.0, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    coverage = _series(selective, "coverages")
    for name, entry in selective["scores"].items():
        auroc = entry["kept"]["auroc"]
        style = {"linestyle": "-", **_score_style(name)}
        (line,) = ax.plot(coverage, _series(auroc, "macro"), marker="o", markersize=3, label=name, **style)
        lo, hi = _series(auroc, "macro_lo"), _series(auroc, "macro_hi")
        if lo.size == coverage.size and hi.size == coverage.size:
            ax.fill_between(coverage, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_ylabel(f"macro AUROC of kept films ({100 * float(selective.get('ci', 0.95)):g}% CI)")
    _coverage_axis(ax, coverage)
    fig.suptitle("Discrimination on the films kept")
    return _save(fig, path)
