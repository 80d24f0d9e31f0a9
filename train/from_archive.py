"""The retrospective audit: an archive run's scores (``python -m service.archive``, its ``results.parquet``) against
what the site's radiologists reported, and what ``python -m train calibrate`` would fit on those films.

    python -m train audit --results results.parquet --labels LABELS [--inventory ...] [--checkpoint MODEL] --out DIR
    python -m train calibrate --checkpoint MODEL --from-archive results.parquet --labels LABELS --out models/site

``LABELS`` is either

* a CheXpert-layout CSV (a ``Path`` column and a column per finding: 1, 0, -1, blank), matched on the table's
  ``path``: the run's ``--input`` CSV itself when it carries labels. -1 (the report was uncertain) counts as
  unknown, since an audit must not guess the truth; blank is "not mentioned", i.e. absent, as CheXpert codes it; or
* an outcomes file in any format ``POST /v1/outcomes`` takes (CSV or NDJSON, a FHIR Bundle, HL7 v2 ORU^R01;
  ``service.outcomes.parsing``), matched on ``request_id`` (the archive's ids are a function of the film's key),
  ``sop_instance_uid`` or ``study_instance_uid`` (a study with several scored films is ambiguous and its verdicts
  are left out, as the service refuses them).

No image is read: the table keeps, per finding, the MC mean and the 5th and 95th percentiles, which are every
score the rule thresholds (as ``train.from_audit`` does for the audit trail). The audit measures what the run did
(its ``refer`` column, which includes population and OOD referrals); the fit is what calibrate would choose on
these same films, so its own rates are in-sample: a site that adopts it audits it on films it was not fitted on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow.parquet as pq
from numpy.typing import NDArray

from bayesnet import ModelSpec
from bayesnet.checkpoint import load_spec, read_checkpoint_document
from bayesnet.labels import CHEXPERT_LABELS
from bayesnet.spec import ReferralScore
from train.calibrate import write_site_rule
from train.chexpert_csv import annotated_labels, code_labels, read_csv_columns
from train.conformal import (
    ReferralFit,
    ReferralInputError,
    check_enough_positives,
    clopper_pearson,
    fit_referral_on_scores,
    stored_side_scores,
)
from train.metrics import FloatArray, bootstrap_auc

__all__ = [
    "ArchiveFilms",
    "AuditInputError",
    "SiteLabels",
    "audit",
    "audit_markdown",
    "calibrate_from_archive",
    "exact_upper",
    "films_from_archive",
    "read_site_labels",
    "run_model_spec",
]

#: The table's per-finding decision names (``bayesnet.decision.Decision`` values).
NEGATIVE, POSITIVE = "negative", "positive"
#: One-sided confidence of the exact upper bounds the audit states.
BOUND_CONFIDENCE: Final = 0.95
BOOTSTRAP_RESAMPLES: Final = 2000


class AuditInputError(ValueError):
    """The results or the labels cannot give an audit (unreadable, no film in common, mixed models), in words."""


# --- the radiologists' labels -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteLabels:
    """Verdicts keyed how they name the film: ``(kind, value) -> {label: present}``; kind is ``path``,
    ``request_id``, ``sop_instance_uid`` or ``study_instance_uid``."""

    verdicts: dict[tuple[str, str], dict[str, bool]]
    source: str
    #: Rows of the file it could not read (an outcomes file's RowErrors, as text).
    problems: list[str] = field(default_factory=list)


def _chexpert_labels(path: Path) -> SiteLabels:
    columns = read_csv_columns(path)
    keys = columns["Path"]
    targets = code_labels(columns, range(len(keys)), dict.fromkeys(CHEXPERT_LABELS, "ignore"), str(path))
    present = annotated_labels(path)
    verdicts: dict[tuple[str, str], dict[str, bool]] = {}
    for i, key in enumerate(keys):
        row = {
            label: bool(targets[i, k] == 1.0)
            for k, label in enumerate(CHEXPERT_LABELS)
            if label in present and not math.isnan(float(targets[i, k]))
        }
        verdicts[("path", key)] = row
    return SiteLabels(verdicts, f"CheXpert-layout CSV {path.name}")


def read_site_labels(path: Path, codes_file: Path | None = None) -> SiteLabels:
    """The radiologists' verdicts in ``path`` (the module's two kinds, told apart by their content).

    Raises:
        AuditInputError: unreadable, or an outcomes file none of whose rows could be read.
    """
    from service.outcomes.parsing import CodeMap, parse_fhir, parse_hl7, parse_tabular

    try:
        text = path.read_bytes().decode("utf-8-sig")  # as stored: HL7 v2 separates segments with a bare CR
    except (OSError, UnicodeDecodeError) as err:
        raise AuditInputError(f"cannot read the labels {path}: {err}") from err
    first_line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    head = next(csv.reader(io.StringIO(first_line)), [])
    if "Path" in (name.strip() for name in head):
        try:
            return _chexpert_labels(path)
        except ValueError as err:
            raise AuditInputError(str(err)) from err
    try:
        codes = CodeMap.from_file(codes_file) if codes_file is not None else CodeMap.default()
    except (OSError, ValueError) as err:
        raise AuditInputError(f"cannot read the code map {codes_file}: {err}") from err
    stripped = text.lstrip()
    if stripped.startswith("MSH"):
        rows, errors = parse_hl7(text, codes)
        kind = "HL7 v2 messages"
    elif stripped.startswith("{") and '"resourceType"' in stripped[:2000]:
        try:
            rows, errors = parse_fhir(json.loads(text), codes)
        except json.JSONDecodeError as err:
            raise AuditInputError(f"{path} is not JSON: {err}") from err
        kind = "FHIR Bundle"
    else:
        media = "application/x-ndjson" if stripped.startswith("{") else "text/csv"
        rows, errors = parse_tabular(text, media, codes)  # type: ignore[arg-type]
        kind = "outcomes NDJSON" if media == "application/x-ndjson" else "outcomes CSV"
    problems = [f"row {e.row}: {e.detail}" for e in errors]
    if not rows:
        shown = "; ".join(problems[:5]) or "no verdict in it"
        raise AuditInputError(f"{path} gave no verdict ({kind}): {shown}")
    verdicts: dict[tuple[str, str], dict[str, bool]] = {}
    for row in rows:
        if row.key.item_index is not None:
            problems.append(f"row {row.row}: item_index names a batch item, which an archive run does not have")
            continue
        verdicts.setdefault((row.key.kind, row.key.value), {}).update(row.verdicts)
    return SiteLabels(verdicts, f"{kind} {path.name}", problems)


# --- the films --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveFilms:
    """The scored films of one model that have at least one verdict: ``(N, K)`` arrays over ``labels`` (the
    CheXpert order; NaN where the model did not score the finding or no verdict was given)."""

    labels: tuple[str, ...]
    keys: list[str]
    mean: FloatArray
    low: FloatArray
    high: FloatArray
    targets: FloatArray
    #: ``(N, K)`` the run's decision per finding ("" where not scored).
    decisions: NDArray[np.str_]
    #: ``(N,)`` whether the run referred the film (every reason, population and OOD included).
    refer: NDArray[np.bool_]
    model: str
    model_sha256: str
    #: How the labels met the results.
    matching: dict[str, int]

    def side_scores(self, score: str) -> tuple[FloatArray, FloatArray]:
        """``(negative_side, positive_side)`` as the rule thresholds them (``bayesnet.decision.side_scores``)."""
        return stored_side_scores(self.mean, self.low, self.high, score)


def films_from_archive(results: Path, labels: SiteLabels) -> ArchiveFilms:
    """The run's scored films that ``labels`` has verdicts for.

    Raises:
        AuditInputError: the table is unreadable, holds several models, or no scored film has a verdict.
    """
    try:
        rows = pq.read_table(results).to_pylist()
    except (OSError, ValueError) as err:
        raise AuditInputError(f"cannot read the results table {results}: {err}") from err
    scored = [r for r in rows if r["ok"]]
    models = Counter((r["model_name"], r["model_version"], r["model_sha256"]) for r in scored)
    if len(models) > 1:
        listing = ", ".join(f"{n} {v} ({s[:12]}): {c}" for (n, v, s), c in models.items())
        raise AuditInputError(f"{results} holds films of several models ({listing}); audit one model's run")
    by_study = Counter(r["study_instance_uid"] for r in scored if r["study_instance_uid"])
    matched: list[tuple[dict[str, Any], dict[str, bool]]] = []
    used: set[tuple[str, str]] = set()
    ambiguous: set[str] = set()
    for r in scored:
        verdicts: dict[str, bool] = {}
        for kind in ("path", "request_id", "sop_instance_uid", "study_instance_uid"):
            value = r.get(kind)
            if value is None or (kind, value) not in labels.verdicts:
                continue
            if kind == "study_instance_uid" and by_study[value] > 1:
                ambiguous.add(value)  # a study verdict cannot say which of its films it judged
                continue
            used.add((kind, value))
            verdicts.update(labels.verdicts[(kind, value)])
        if verdicts:
            matched.append((r, verdicts))
    matching = {
        "films_scored": len(scored),
        "films_failed": len(rows) - len(scored),
        "films_with_verdicts": len(matched),
        "verdict_keys": len(labels.verdicts),
        "verdict_keys_unmatched": len(set(labels.verdicts) - used - {("study_instance_uid", uid) for uid in ambiguous}),
        "study_verdicts_ambiguous": len(ambiguous),
    }
    if not matched:
        raise AuditInputError(
            f"no scored film of {results} has a verdict in {labels.source} ({len(scored)} scored films, "
            f"{len(labels.verdicts)} labelled keys): the labels must name the films by the run's path, request id, "
            "SOP or study instance UID"
        )
    shape = (len(matched), len(CHEXPERT_LABELS))
    mean, low, high, targets = (np.full(shape, np.nan) for _ in range(4))
    decisions = np.full(shape, "", dtype=object)
    for i, (r, verdicts) in enumerate(matched):
        for k, label in enumerate(CHEXPERT_LABELS):
            finding = r.get(label)
            if finding is not None:
                mean[i, k], low[i, k], high[i, k] = finding["conf"], finding["interval_low"], finding["interval_high"]
                decisions[i, k] = finding["decision"]
            if label in verdicts:
                targets[i, k] = 1.0 if verdicts[label] else 0.0
    ((name, version, sha256),) = models
    return ArchiveFilms(
        labels=CHEXPERT_LABELS,
        keys=[str(r["path"]) for r, _ in matched],
        mean=mean,
        low=low,
        high=high,
        targets=targets,
        decisions=decisions.astype(str),
        refer=np.array([bool(r["refer"]) for r, _ in matched]),
        model=f"{name} {version}",
        model_sha256=sha256,
        matching=matching,
    )


# --- the audit --------------------------------------------------------------------------------------------------


def exact_upper(count: int, n: int, confidence: float = BOUND_CONFIDENCE) -> float | None:
    """The exact (Clopper-Pearson) one-sided upper bound on a rate of which ``count`` of ``n`` were seen: the upper
    end of the two-sided interval at level ``2 * confidence - 1``."""
    return clopper_pearson(count, n, level=2.0 * confidence - 1.0)[1]


def _rate(count: int, n: int) -> dict[str, Any]:
    return {"count": count, "of": n, "rate": count / n if n else None, "upper": exact_upper(count, n)}


def _abnormal_normal(
    targets: FloatArray, study_index: Sequence[int], no_finding: int
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Abnormal: a finding present, or "No Finding" reported absent (the report named something outside the 14,
    which a cleared film would miss too). Normal: not abnormal, and "No Finding" reported or every finding known."""
    study = targets[:, list(study_index)]
    nothing = targets[:, no_finding]
    abnormal = (np.nan_to_num(study, nan=0.0).max(axis=1) == 1.0) | (nothing == 0.0)
    return abnormal, ~abnormal & ((nothing == 1.0) | ~np.isnan(study).any(axis=1))


def _fit(
    films: ArchiveFilms,
    spec: ModelSpec,
    *,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None,
    score: ReferralScore,
    notes: Mapping[str, Any],
) -> ReferralFit:
    index = [films.labels.index(label) for label in spec.labels]  # the spec's label order
    targets = films.targets[:, index]
    check_enough_positives(targets, spec, alpha=alpha, delta=delta, source=f"the {len(targets)} labelled films")
    negative_side, positive_side = films.side_scores(score)
    return fit_referral_on_scores(
        negative_side[:, index],
        positive_side[:, index],
        targets,
        spec,
        alpha=alpha,
        delta=delta,
        study_alpha=study_alpha,
        alpha_positive=alpha_positive,
        score=score,
        calibration_notes=notes,
    )


def audit(
    films: ArchiveFilms,
    *,
    spec: ModelSpec | None = None,
    alpha: float = 0.1,
    delta: float = 0.1,
    study_alpha: float = 0.1,
    alpha_positive: float | None = 0.1,
    score: ReferralScore | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The audit's numbers (JSON-ready).

    ``findings``: per finding with both verdicts among the films, the AUROC of the MC mean with a 95% percentile
    bootstrap interval (films resampled), and the positives the run's decision cleared (negative) with the exact
    one-sided upper bound. ``films``: of the films the run did not refer, how many had a finding (the miss rate
    among cleared films, what a clinical lead asks first), and of the abnormal films how many the run cleared (the
    quantity the rule's ``study_alpha`` promises), both with exact upper bounds (abnormal and normal as
    :func:`_abnormal_normal` says, over the findings the labels cover). ``fit``: with ``spec`` (the run's model), what
    ``train calibrate`` would fit here, or why it would refuse.
    """
    # The findings the labels cover: a finding no verdict names (a column the site's CSV does not have) cannot make
    # a film "not known to be normal".
    covered = np.asarray(~np.isnan(films.targets).all(axis=0), dtype=bool)
    study_index = [k for k, label in enumerate(films.labels) if label != "No Finding" and covered[k]]
    scored = ~np.isnan(films.mean)
    judged = np.where(scored, films.targets, np.nan)  # a finding's AUROC over the films the model scored it on
    auc, lo, hi = bootstrap_auc(judged, np.nan_to_num(films.mean), n_boot=BOOTSTRAP_RESAMPLES, seed=seed)
    findings: dict[str, Any] = {}
    for k, label in enumerate(films.labels):
        known = ~np.isnan(judged[:, k])
        if not known.any():
            continue
        positives = known & (films.targets[:, k] == 1.0)
        findings[label] = {
            "n": int(known.sum()),
            "positives": int(positives.sum()),
            "auroc": None if math.isnan(auc[k]) else float(auc[k]),
            "auroc_ci95": None if math.isnan(lo[k]) else [float(lo[k]), float(hi[k])],
            # "No Finding" cleared means a normal film called abnormal: not a miss, so not counted as one.
            "positives_cleared": None
            if label == "No Finding"
            else _rate(int((films.decisions[positives, k] == NEGATIVE).sum()), int(positives.sum())),
        }
    abnormal, normal = _abnormal_normal(films.targets, study_index, films.labels.index("No Finding"))
    cleared = ~films.refer
    known = abnormal | normal
    out: dict[str, Any] = {
        "model": films.model,
        "model_sha256": films.model_sha256,
        "matching": films.matching,
        "bound_confidence": BOUND_CONFIDENCE,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "findings": findings,
        "films": {
            "n": len(films.keys),
            "abnormal": int(abnormal.sum()),
            "normal": int(normal.sum()),
            "unknown": int((~known).sum()),
            "cleared": int(cleared.sum()),
            "abnormal_among_cleared": _rate(int((cleared & abnormal).sum()), int((cleared & known).sum())),
            "abnormal_cleared": _rate(int((cleared & abnormal).sum()), int(abnormal.sum())),
            "normal_cleared": _rate(int((cleared & normal).sum()), int(normal.sum())),
        },
    }
    if spec is not None:
        out["fit"] = _fit_summary(films, spec, alpha, delta, study_alpha, alpha_positive, score)
    return out


def _fit_summary(
    films: ArchiveFilms,
    spec: ModelSpec,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None,
    score: ReferralScore | None,
) -> dict[str, Any]:
    current = spec.referral
    chosen: ReferralScore = score or (current.score if current is not None else "mean")
    levels = {"alpha": alpha, "delta": delta, "study_alpha": study_alpha, "alpha_positive": alpha_positive}
    summary: dict[str, Any] = {"levels": levels, "score": chosen}
    try:
        fitted = _fit(
            films,
            spec,
            alpha=alpha,
            delta=delta,
            study_alpha=study_alpha,
            alpha_positive=alpha_positive,
            score=chosen,
            notes={"data": "archive run"},
        )
    except ReferralInputError as err:
        summary["refused"] = str(err)
        return summary
    rule = fitted.spec
    summary["rule"] = {
        label: {
            "clear_below": rule.negative_threshold[spec.label_index(label)],
            "positive_at": rule.positive_threshold[spec.label_index(label)],
            "clear_below_now": None if current is None else current.negative_threshold[spec.label_index(label)],
        }
        for label in spec.trained_labels
    }
    summary["study_threshold"] = rule.study_threshold
    summary["study_threshold_now"] = None if current is None else current.study_threshold
    summary["expected_referral_rate"] = rule.expected_study_referral_rate
    summary["expected_normal_clearance_rate"] = rule.expected_normal_clearance_rate
    summary["report"] = fitted.report
    return summary


# --- the report section -----------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _rate_text(entry: Mapping[str, Any], *, short: bool = False) -> str:
    """``count/of = rate (upper bound u)``; ``short``: ``count/of, at most u``, for a table cell a phone can show."""
    if not entry["of"]:
        return "n/a (no film)"
    if short:
        return f"{entry['count']}/{entry['of']}, at most {_pct(entry['upper'])}"
    return f"{entry['count']}/{entry['of']} = {_pct(entry['rate'])} (upper bound {_pct(entry['upper'])})"


def _threshold(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"


def audit_markdown(result: Mapping[str, Any], labels_source: str, plots: Sequence[str] = ()) -> str:
    """The audit as the report's section "Against the radiologists' labels"."""
    matching, films = result["matching"], result["films"]
    confidence = f"{result['bound_confidence']:.0%}"
    lines = [
        "## Against the radiologists' labels (the retrospective audit)",
        "",
        f"Labels: {labels_source}. {matching['films_with_verdicts']} of the {matching['films_scored']} scored films "
        f"have a verdict; {matching['verdict_keys_unmatched']} of the {matching['verdict_keys']} labelled keys name "
        "no scored film"
        + (
            f"; the verdicts of {matching['study_verdicts_ambiguous']} studies were left out (each names a study of "
            "several scored films, not which film)"
            if matching["study_verdicts_ambiguous"]
            else ""
        )
        + f". Model {result['model']} ({result['model_sha256'][:12]}). Upper bounds are exact (Clopper-Pearson), "
        f"one-sided {confidence}; AUROC intervals are 95% percentile bootstraps over films "
        f"({result['bootstrap_resamples']} resamples). A handful of films gives wide intervals: read them, not the "
        "point estimates.",
        "",
        "### What the run cleared",
        "",
        f'- films with a verdict: {films["n"]} (abnormal: a finding present or "No Finding" reported absent, '
        f'{films["abnormal"]}; normal: "No Finding" reported or every finding the labels cover absent, '
        f"{films['normal']}; neither known, {films['unknown']}); cleared by the run: {films['cleared']}",
        f"- **miss rate among cleared films** (a finding present in a film the run would not have shown a "
        f"radiologist): {_rate_text(films['abnormal_among_cleared'])}",
        f"- abnormal films cleared (what the rule's study_alpha promises): {_rate_text(films['abnormal_cleared'])}",
        f"- normal films cleared (the work it would save): {_rate_text(films['normal_cleared'])}",
        "",
        "### Per finding",
        "",
        "| finding | films | positives | AUROC (95% CI) | positives cleared (95% upper bound) |",
        "|---|---:|---:|---|---|",
    ]
    for label, row in result["findings"].items():
        auroc = "n/a (one class)" if row["auroc"] is None else f"{row['auroc']:.3f}"
        if row["auroc_ci95"] is not None:
            auroc += f" ({row['auroc_ci95'][0]:.3f}-{row['auroc_ci95'][1]:.3f})"
        missed = "-" if row["positives_cleared"] is None else _rate_text(row["positives_cleared"], short=True)
        lines.append(f"| {label} | {row['n']} | {row['positives']} | {auroc} | {missed} |")
    lines += ["", *(f"![{name}]({name})" for name in plots), ""]
    fit = result.get("fit")
    if fit is None:
        lines += ["Give `--checkpoint` (the run's model) to see what `python -m train calibrate` would fit here.", ""]
        return "\n".join(lines)
    levels = fit["levels"]
    lines += [
        "### What `python -m train calibrate` would fit on these films",
        "",
        f"Levels: alpha {levels['alpha']}, study_alpha {levels['study_alpha']}, delta {levels['delta']}, "
        f"alpha_positive {levels['alpha_positive']}; score `{fit['score']}`.",
        "",
    ]
    if "refused" in fit:
        lines += [f"It would refuse: {fit['refused']}", ""]
        return "\n".join(lines)
    lines += [
        f"- study threshold: {_threshold(fit['study_threshold'])} (now {_threshold(fit['study_threshold_now'])})",
        f"- films it would refer here: {_pct(fit['expected_referral_rate'])}; normal films it would clear: "
        f"{_pct(fit['expected_normal_clearance_rate'])}. In-sample: fitted and counted on the same films; "
        "`python -m train calibrate --from-archive` writes it, and a site audits it on other films before use.",
        "",
        "| finding | clear below (now) | positive at |",
        "|---|---|---|",
        *(
            f"| {label} | {_threshold(row['clear_below'])} ({_threshold(row['clear_below_now'])}) | "
            f"{_threshold(row['positive_at'])} |"
            for label, row in fit["rule"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def auroc_plot(result: Mapping[str, Any], out: Path) -> str | None:
    """``auroc.png``: each finding's AUROC with its interval; its name, or None when no finding has one."""
    rows = [(label, r) for label, r in result["findings"].items() if r["auroc"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    for y, (_, r) in enumerate(rows):
        if r["auroc_ci95"] is not None:
            axis.plot(r["auroc_ci95"], [y, y], color="tab:blue")
        axis.plot([r["auroc"]], [y], "o", color="tab:blue")
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(rows)), [f"{label} ({r['positives']}/{r['n']})" for label, r in rows], fontsize=8)
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("AUROC of the MC-dropout mean, 95% bootstrap interval (positives/films)")
    figure.tight_layout()
    figure.savefig(out / "auroc.png", dpi=80)
    plt.close(figure)
    return "auroc.png"


# --- calibrate --from-archive -----------------------------------------------------------------------------------


def run_model_spec(films: ArchiveFilms, checkpoint: Path, results: Path) -> ModelSpec:
    """The spec of ``checkpoint``, once its weights are checked to be those that scored the run.

    Raises:
        AuditInputError: other weights (a rule refitted for them would not be the run's).
    """
    sha256 = str(read_checkpoint_document(checkpoint)["weights_sha256"])
    if films.model_sha256 != sha256:
        raise AuditInputError(
            f"{results} was scored by weights {films.model_sha256[:16]}..., not {checkpoint}'s {sha256[:16]}...: "
            "give the model that scored the run"
        )
    return load_spec(checkpoint)


def calibrate_from_archive(
    checkpoint: Path,
    results: Path,
    labels: SiteLabels,
    *,
    out: Path | None,
    alpha: float,
    delta: float,
    study_alpha: float,
    alpha_positive: float | None,
    score: ReferralScore,
) -> ModelSpec:
    """Refit the checkpoint's referral rule on an archive run's films with verdicts, from the table's scores; write
    the spec as a new version (``+site``), weights untouched, to ``out`` (default: the checkpoint itself).

    Raises:
        AuditInputError: unreadable inputs, no film in common, or a run of other weights than ``checkpoint``'s.
        ReferralInputError: too few films with a finding for the levels, named.
    """
    films = films_from_archive(results, labels)
    spec = run_model_spec(films, checkpoint, results)
    notes = {"data": f"archive run {results.name}, labels {labels.source}", "fitted_with": "stored scores"}
    fitted = _fit(
        films,
        spec,
        alpha=alpha,
        delta=delta,
        study_alpha=study_alpha,
        alpha_positive=alpha_positive,
        score=score,
        notes=notes,
    )
    return write_site_rule(checkpoint, out, spec, fitted, notes)
