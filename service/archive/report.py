"""A report of an archive run that a clinical lead can read: ``python -m service.archive.report``.

From the run's Parquet table (``service.archive.table``) and, for a PACS run, its inventory: how many films were
scored, how many failed and why, how many the inventory skipped and why; what the referral rule would have done
(the fraction of films it would have cleared, the referral reasons); how many films the out-of-distribution gate
flagged, in the order they were scored (a jump there is a batch of films unlike the training films); and each
finding's score distribution with its decisions. Markdown with PNG plots, written to ``--out``.

    python -m service.archive.report --results results.parquet [--inventory results.jsonl.inventory.csv] --out report

With the radiologists' labels, ``python -m train audit`` writes the same report with the retrospective audit
appended (``train.from_archive``: per-finding AUROC with intervals, the miss rate among cleared films with an exact
bound, what ``train calibrate`` would fit); the service never imports ``train``, so that part lives there.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bayesnet.labels import CHEXPERT_LABELS
from service.archive.dicomweb import read_inventory, skipped_by_reason

__all__ = ["ArchiveSummary", "main", "summarise", "write_report"]


@dataclass(frozen=True)
class ArchiveSummary:
    films: int
    scored: int
    failed_by_type: dict[str, int]
    skipped_by_reason: dict[str, int]
    cleared: int
    reasons: dict[str, int]
    ood_flagged: int
    #: Per finding: films with a score, and how many of each decision.
    decisions: dict[str, dict[str, int]]
    models: dict[str, int]

    @property
    def cleared_fraction(self) -> float | None:
        return self.cleared / self.scored if self.scored else None


def summarise(rows: Sequence[dict[str, Any]], skipped: dict[str, int] | None = None) -> ArchiveSummary:
    """The counts of the report from the table's rows (``pyarrow.Table.to_pylist()``)."""
    scored = [r for r in rows if r["ok"]]
    decisions: dict[str, dict[str, int]] = {}
    for label in CHEXPERT_LABELS:
        found = Counter(r[label]["decision"] for r in scored if r.get(label) is not None)
        if found:
            decisions[label] = dict(sorted(found.items()))
    return ArchiveSummary(
        films=len(rows),
        scored=len(scored),
        failed_by_type=dict(sorted(Counter(str(r["error_type"]) for r in rows if not r["ok"]).items())),
        skipped_by_reason=dict(skipped or {}),
        cleared=sum(1 for r in scored if r["refer"] is False),
        reasons=dict(Counter(reason for r in scored for reason in r["referral_reasons"] or []).most_common()),
        ood_flagged=sum(1 for r in scored if r["ood_in_distribution"] is False),
        decisions=decisions,
        models=dict(Counter(f"{r['model_name']} {r['model_version']} ({r['model_sha256'][:12]})" for r in scored)),
    )


def _plots(rows: Sequence[dict[str, Any]], summary: ArchiveSummary, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["ok"]]
    names = []
    labels = list(summary.decisions)
    if labels:
        columns = 4
        figure, axes = plt.subplots(
            (len(labels) + columns - 1) // columns, columns, figsize=(14, 2.6 * ((len(labels) + 3) // 4)), squeeze=False
        )
        for axis, label in zip(axes.flat, labels, strict=False):
            for decision, colour in (("negative", "tab:green"), ("uncertain", "tab:orange"), ("positive", "tab:red")):
                values = [r[label]["conf"] for r in scored if r[label] is not None and r[label]["decision"] == decision]
                axis.hist(values, bins=20, range=(0, 1), color=colour, alpha=0.7, label=decision)
            axis.set_title(label, fontsize=9)
        for axis in list(axes.flat)[len(labels) :]:
            axis.axis("off")
        axes.flat[0].legend(fontsize=7)
        figure.suptitle("MC-dropout mean probability per finding, by the rule's decision")
        figure.tight_layout()
        figure.savefig(out / "scores.png", dpi=80)
        plt.close(figure)
        names.append("scores.png")
    if scored and any(r["ood_score"] is not None for r in scored):
        window = max(1, len(scored) // 50)
        flags = [r["ood_in_distribution"] is False for r in scored]
        rates = [sum(flags[i : i + window]) / len(flags[i : i + window]) for i in range(0, len(flags), window)]
        figure, axis = plt.subplots(figsize=(8, 2.8))
        axis.plot([i * window for i in range(len(rates))], rates, drawstyle="steps-post")
        axis.set_ylim(0, 1)
        axis.set_xlabel(f"films in the order scored (windows of {window})")
        axis.set_ylabel("flagged out of distribution")
        figure.tight_layout()
        figure.savefig(out / "ood.png", dpi=80)
        plt.close(figure)
        names.append("ood.png")
    return names


def _table(counts: dict[str, int], total: int, what: str) -> list[str]:
    if not counts:
        return [f"None {what}.", ""]
    lines = ["| | films | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {n} | {n / total:.1%} |" for name, n in counts.items()] if total else []
    return [*lines, ""]


def write_report(results: Path, out: Path, inventory: Path | None = None, *, sections: Sequence[str] = ()) -> Path:
    """Write ``out/report.md`` and its plots from the table ``results``, then ``sections`` (Markdown, e.g. the
    retrospective audit, whose plots the caller writes into ``out``); the report's path."""
    rows = pq.read_table(results).to_pylist()
    skipped = skipped_by_reason(read_inventory(inventory)) if inventory is not None else {}
    summary = summarise(rows, skipped)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, summary, out)
    cleared = summary.cleared_fraction
    lines = [
        "# Archive run: what the model would have done",
        "",
        f"Source: `{results.name}`. Research software, not a medical device: these are the model's outputs, not "
        "diagnoses; without the radiologists' labels they say what the rule would do, not whether it is right"
        + (" (the audit against the labels is the last section)." if sections else "."),
        "",
        "## Films",
        "",
        f"- in the results: {summary.films}; scored: {summary.scored}; failed: {summary.films - summary.scored}",
        f"- skipped before fetching (inventory): {sum(summary.skipped_by_reason.values())}",
        f"- model(s): {', '.join(f'{m} ({n} films)' for m, n in summary.models.items()) or 'none'}",
        "",
        "Failed, by error:",
        "",
        *_table(summary.failed_by_type, summary.films, "failed"),
        "Skipped, by reason:",
        "",
        *_table(summary.skipped_by_reason, summary.films + sum(summary.skipped_by_reason.values()), "skipped"),
        "## What the referral rule would have done",
        "",
        f"- cleared (not referred): {summary.cleared} of {summary.scored}"
        + (f" ({cleared:.1%})" if cleared is not None else ""),
        f"- flagged out of distribution: {summary.ood_flagged}",
        "",
        "Referral reasons (a film may have several):",
        "",
        *_table(summary.reasons, summary.scored, "referred"),
        "## Findings",
        "",
        "| finding | " + " | ".join(("negative", "uncertain", "positive")) + " |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | " + " | ".join(str(c.get(d, 0)) for d in ("negative", "uncertain", "positive")) + " |"
            for label, c in summary.decisions.items()
        ),
        "",
        *(f"![{name}]({name})" for name in plots),
        "",
        *sections,
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.archive.report",
        description=__doc__.split("\n")[0],
        epilog="With the radiologists' labels: python -m train audit --results ... --labels ... (the same report with "
        "the retrospective audit appended).",
    )
    parser.add_argument("--results", type=Path, required=True, help="the run's results.parquet")
    parser.add_argument("--inventory", type=Path, help="a PACS run's inventory CSV (skipped instances by reason)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and its plots")
    args = parser.parse_args(argv)
    print(write_report(args.results, args.out, args.inventory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
