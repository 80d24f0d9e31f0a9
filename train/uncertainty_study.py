"""What the cross-fitted predictions say: which uncertainty estimator earns its cost, and what the referral rule does.

``python -m train study --cv runs/cv --out reports/uncertainty`` reads :func:`train.crossfit.crossfit`'s
``oof.npz`` and writes ``study.json`` and ``study.md`` (the tables of docs/uncertainty.md):

1. **Estimators, fold by fold** (mean and standard deviation over the K held-out folds): MC dropout in the head,
   the deterministic pass, the ensemble of heads sharing the trunk, test-time augmentation. Each estimator gets
   its own temperature and Youden thresholds for fold k, fitted on its predictions of the other folds' films. Columns:
   AUROC, ECE, AURC with the estimator's own spread as the referral score (std over samples, members or
   augmentations; the deterministic pass has none and uses its distance to the threshold), AURC with the
   confidence score (the calibrated probability that the decision is wrong), the kept films' AUROC gain at 80%
   and 50% coverage, and the measured milliseconds per film.
2. **The referral rule, nested**: for each fold, the rule is fitted on the other folds' films and applied to the
   fold's films, which no model and no rule saw. Pooled over folds: per finding the fraction of positives
   cleared, abnormal films cleared as normal, films referred and normal films cleared, against the levels and
   against what the rule expected on its own calibration films.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from bayesnet.spec import ModelSpec
from train.conformal import ReferralInputError, check_referral, fit_referral
from train.metrics import FloatArray, ece, nanmean, per_label_auc
from train.predict import sigmoid
from train.selective import decision_error, selective_metrics, threshold_margin

ESTIMATORS: Final[tuple[str, ...]] = ("mc_dropout", "deterministic", "ensemble", "tta")


_LOGIT_KEYS: Final[dict[str, str]] = {
    "mc_dropout": "mc_logits",
    "deterministic": "det_logits",
    "ensemble": "ensemble_logits",
    "tta": "tta_logits",
}


def _logits(data: Mapping[str, NDArray[Any]], name: str) -> FloatArray | None:
    """Per-member logits ``(M, N, K)`` of an estimator (None: not recorded)."""
    logits = np.asarray(data[_LOGIT_KEYS[name]], dtype=np.float64)
    if logits.ndim == 2:
        logits = logits[None]
    return None if logits.shape[0] == 0 else logits


def _samples(data: Mapping[str, NDArray[Any]], name: str, temperature: FloatArray) -> FloatArray | None:
    """Calibrated per-member probabilities ``(M, N, K)`` of an estimator with each film's fold temperature."""
    logits = _logits(data, name)
    if logits is None:
        return None
    out: FloatArray = sigmoid(logits / temperature[None])
    return out


def _fold_metrics(y: FloatArray, samples: FloatArray, threshold: FloatArray, trained: list[int]) -> dict[str, float]:
    p = samples.mean(axis=0)
    own = samples.std(axis=0) if samples.shape[0] > 1 else threshold_margin(p, threshold)
    y_t, p_t, thr = y[:, trained], p[:, trained], threshold[trained]
    out: dict[str, float] = {
        "auroc": float(nanmean(per_label_auc(y_t, p_t))),
        "ece": float(nanmean(ece(y_t, p_t))),
    }
    for name, score in (("aurc_own", own[:, trained]), ("aurc_confidence", decision_error(p_t, thr))):
        metrics = selective_metrics(y_t, p_t, thr, score, coverages=(1.0, 0.8, 0.5), n_boot=0)
        out[name] = float(metrics.macro_aurc)
        if name == "aurc_own":
            macro = metrics.macro("auroc")
            out["gain_80"] = float(macro[1] - macro[0])
            out["gain_50"] = float(macro[2] - macro[0])
    return out


def _cross_fold_calibration(
    logits: FloatArray, y: FloatArray, folds: NDArray[np.int64], k: int
) -> tuple[FloatArray, FloatArray]:
    """Temperature and Youden thresholds ``(K,)`` of one estimator for fold k, fitted on the OTHER folds' films.

    Every estimator gets its own, fitted the same way, so no estimator is judged with another's calibration.
    """
    from train.calibrate import fit_temperature, fit_thresholds

    other = folds != k
    temperature = fit_temperature(logits[:, other], y[other])
    thresholds = fit_thresholds(y[other], sigmoid(logits[:, other] / temperature).mean(axis=0))
    return temperature, thresholds


def compare_estimators(data: Mapping[str, NDArray[Any]], timing: list[Mapping[str, float]]) -> dict[str, Any]:
    """Per estimator: mean and sd over folds of each column of module item 1, and milliseconds per film."""
    y = np.asarray(data["y"], dtype=np.float64)
    folds = np.asarray(data["fold"]).astype(int)
    trained = [k for k in range(y.shape[1]) if not np.isnan(y[:, k]).all()]
    ms = {
        "mc_dropout": np.mean([t["trunk"] + t["mc"] for t in timing]) * 1e3,
        "deterministic": np.mean([t["trunk"] + t["det"] for t in timing]) * 1e3,
        "ensemble": np.mean([t["trunk"] + t["ens"] for t in timing]) * 1e3,
        "tta": np.mean([t["tta"] for t in timing]) * 1e3,
    }
    table: dict[str, Any] = {}
    for name in ESTIMATORS:
        logits = _logits(data, name)
        if logits is None:
            continue
        rows = []
        for k in sorted(set(folds.tolist())):
            temperature, thresholds = _cross_fold_calibration(logits, y, folds, k)
            samples = sigmoid(logits[:, folds == k] / temperature)
            rows.append(_fold_metrics(y[folds == k], samples, thresholds, trained))
        columns = rows[0].keys()
        table[name] = {
            c: {"mean": float(np.mean([r[c] for r in rows])), "sd": float(np.std([r[c] for r in rows], ddof=1))}
            for c in columns
        }
        table[name]["ms_per_film"] = float(ms[name])
        table[name]["members"] = int(logits.shape[0])
    return table


def nested_referral(
    data: Mapping[str, NDArray[Any]],
    labels: list[str],
    *,
    alpha: float,
    study_alpha: float,
    delta: float,
    alpha_positive: float | None,
    score: str,
) -> dict[str, Any]:
    """The rule fitted on K - 1 folds and applied to the held-out fold, pooled over folds (module item 2)."""
    y = np.asarray(data["y"], dtype=np.float64)
    folds = np.asarray(data["fold"]).astype(int)
    samples = _samples(data, "mc_dropout", np.asarray(data["temperature"], dtype=np.float64))
    assert samples is not None
    trained = tuple(lb for k, lb in enumerate(labels) if not np.isnan(y[:, k]).all())
    spec = ModelSpec(arch="test_efficientnet", labels=tuple(labels), trained_labels=trained)
    misses = {lb: [0, 0] for lb in trained}  # [positives cleared, positives]
    false_pos = {lb: [0, 0] for lb in trained}
    cleared_abnormal = [0, 0]
    referred = [0, 0]
    normal_cleared = [0, 0]
    expected: list[dict[str, float]] = []
    for k in sorted(set(folds.tolist())):
        cal, test = folds != k, folds == k
        try:
            fitted = fit_referral(
                samples[:, cal],
                y[cal],
                spec,
                alpha=alpha,
                delta=delta,
                study_alpha=study_alpha,
                alpha_positive=alpha_positive,
                score=score,  # type: ignore[arg-type]
            )
        except ReferralInputError as err:
            return {"error": str(err)}
        rule = fitted.spec
        expected.append(
            {
                "study_referral_rate": rule.expected_study_referral_rate,
                "normal_clearance_rate": rule.expected_normal_clearance_rate,
            }
        )
        check = check_referral(samples[:, test], y[test], spec.replace(referral=rule))
        for lb in trained:
            for total, entry in (
                (misses[lb], check["per_label"][lb]["missed"]),
                (false_pos[lb], check["per_label"][lb]["false_positive"]),
            ):
                total[0] += entry["count"]
                total[1] += entry["of"]
        for total, entry in (
            (cleared_abnormal, check["abnormal_cleared"]),
            (referred, check["referred"]),
            (normal_cleared, check["normal_cleared"]),
        ):
            total[0] += entry["count"]
            total[1] += entry["of"]

    def rate(pair: list[int]) -> float | None:
        return pair[0] / pair[1] if pair[1] else None

    return {
        "levels": {"alpha": alpha, "study_alpha": study_alpha, "delta": delta, "alpha_positive": alpha_positive},
        "score": score,
        "miss_rate": {lb: {"rate": rate(v), "misses": v[0], "positives": v[1]} for lb, v in misses.items()},
        "false_positive_rate": {lb: {"rate": rate(v), "count": v[0], "negatives": v[1]} for lb, v in false_pos.items()},
        "abnormal_cleared": {"rate": rate(cleared_abnormal), "count": cleared_abnormal[0], "of": cleared_abnormal[1]},
        "study_referral_rate": rate(referred),
        "normal_clearance": {"rate": rate(normal_cleared), "count": normal_cleared[0], "of": normal_cleared[1]},
        "expected_on_calibration": {
            "study_referral_rate": float(np.mean([e["study_referral_rate"] for e in expected])),
            "normal_clearance_rate": float(np.mean([e["normal_clearance_rate"] for e in expected])),
        },
    }


def _markdown(study: Mapping[str, Any]) -> str:
    lines = [
        "| estimator | members | AUROC | ECE | AURC (own spread) | AURC (confidence) | gain 80% | gain 50% | ms/film |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in study["estimators"].items():

        def cell(column: str, row: Mapping[str, Any] = row) -> str:
            return f"{row[column]['mean']:.3f} ± {row[column]['sd']:.3f}"

        lines.append(
            f"| {name} | {row['members']} | {cell('auroc')} | {cell('ece')} | {cell('aurc_own')} | "
            f"{cell('aurc_confidence')} | {cell('gain_80')} | {cell('gain_50')} | {row['ms_per_film']:.1f} |"
        )
    for run in study["referral"]:
        if "error" in run:
            lines += ["", f"Referral rule: {run['error']}"]
            continue
        lv = run["levels"]
        lines += [
            "",
            f"Referral rule (score {run['score']}, alpha {lv['alpha']}, study_alpha {lv['study_alpha']}, "
            f"delta {lv['delta']}, alpha_positive {lv['alpha_positive']}), fitted on K-1 folds, applied to the "
            "held-out fold, pooled:",
            "",
            "| finding | positives cleared (held out) | negatives called positive |",
            "|---|---:|---:|",
        ]
        for lb, m in run["miss_rate"].items():
            fp = run["false_positive_rate"][lb]
            miss = "n/a" if m["rate"] is None else f"{m['rate']:.1%}"
            fpr = "n/a" if fp["rate"] is None else f"{fp['rate']:.1%}"
            lines.append(
                f"| {lb} | {miss} ({m['misses']}/{m['positives']}) | {fpr} ({fp['count']}/{fp['negatives']}) |"
            )
        ac, nc = run["abnormal_cleared"], run["normal_clearance"]
        exp = run["expected_on_calibration"]
        lines += [
            "",
            f"Abnormal films cleared as normal: {ac['count']}/{ac['of']}; films referred: "
            f"{run['study_referral_rate']:.1%} (the rules expected {exp['study_referral_rate']:.1%} on their own "
            f"calibration films); normal films cleared: {nc['count']}/{nc['of']} "
            f"(expected {exp['normal_clearance_rate']:.1%}).",
        ]
    return "\n".join(lines) + "\n"


def run_study(
    cv: Path,
    out: Path,
    *,
    levels: list[tuple[float, float, float, float | None, str]],
    variants: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Both analyses on ``cv/oof.npz``; writes ``out/study.json`` and ``out/study.md``.

    ``variants`` maps a name to another crossfit directory of a different recipe on the same films and folds
    (e.g. dropout after the last stage too): its MC-dropout and deterministic rows join the table as
    ``mc_dropout_NAME`` and ``deterministic_NAME``.
    """
    data = dict(np.load(cv / "oof.npz"))
    meta = json.loads((cv / "crossfit.json").read_text())
    labels = [str(x) for x in data["labels"]]
    estimators = compare_estimators(data, meta["seconds_per_film"])
    for name, path in (variants or {}).items():
        other = dict(np.load(path / "oof.npz"))
        if not np.array_equal(other["row"], data["row"]) or not np.array_equal(other["fold"], data["fold"]):
            raise ValueError(f"{path} was cross-fitted on other films or folds than {cv}: not comparable")
        rows = compare_estimators(other, json.loads((path / "crossfit.json").read_text())["seconds_per_film"])
        for estimator in ("mc_dropout", "deterministic"):
            estimators[f"{estimator}_{name}"] = rows[estimator]
    study: dict[str, Any] = {
        "crossfit": {k: meta[k] for k in ("csvs", "folds", "seed", "mc_samples", "ensemble", "tta", "n_films")},
        "variants": {name: str(path) for name, path in (variants or {}).items()},
        "estimators": estimators,
        "referral": [
            nested_referral(data, labels, alpha=a, study_alpha=s, delta=d, alpha_positive=ap, score=sc)
            for a, s, d, ap, sc in levels
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    (out / "study.md").write_text(_markdown(study))
    return study


CARD_HEADING: Final = "## Cross-validated estimates"


def card_section(study: Mapping[str, Any]) -> str:
    """The model card's cross-validated numbers: the recipe's AUROC and ECE, and the referral procedure held out."""
    meta = study["crossfit"]
    mc = study["estimators"]["mc_dropout"]
    lines = [
        CARD_HEADING,
        f"The training recipe, {meta['folds']}-fold cross-validated over all {meta['n_films']} films (one model per "
        "fold, each scored on films it never saw; `python -m train crossfit` then `python -m train study`, "
        "docs/uncertainty.md): mean AUROC over the trained findings "
        f"{mc['auroc']['mean']:.3f} +- {mc['auroc']['sd']:.3f} (sd over folds), ECE {mc['ece']['mean']:.3f} +- "
        f"{mc['ece']['sd']:.3f} (temperature fitted on the other folds' films). These are the numbers to expect "
        "on new films from the same source; the "
        "validation-set figures above are optimistic (the same films chose the epoch and the calibration).",
        "",
        "The referral procedure, fitted on the other folds' films and applied to each held-out fold (pooled):",
        "",
        "| level (alpha = study_alpha) | score | abnormal films cleared | films referred (expected) | "
        "normal films cleared | findings over alpha |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for run in study["referral"]:
        if "error" in run:
            continue
        over = [
            f"{lb} {m['misses']}/{m['positives']}"
            for lb, m in run["miss_rate"].items()
            if m["rate"] is not None and m["rate"] > run["levels"]["alpha"]
        ]
        ac, nc = run["abnormal_cleared"], run["normal_clearance"]
        lines.append(
            f"| {run['levels']['alpha']} | {run['score']} | {ac['count']}/{ac['of']} | "
            f"{run['study_referral_rate']:.1%} ({run['expected_on_calibration']['study_referral_rate']:.1%}) | "
            f"{nc['count']}/{nc['of']} | {', '.join(over) or 'none'} |"
        )
    return "\n".join(lines) + "\n"
