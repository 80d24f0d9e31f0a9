"""``python -m service.monitor --since 7d --reference 30d``: is the population the model sees drifting?
(``--guarantee MODEL_DIR``: is the referral rule keeping its promise on the radiologists' verdicts? docs/guarantee.md)

Reads the audit trail (``CXR_AUDIT_URL`` or ``--url``) and compares the current window (the last ``--since``)
with the reference window just before it (``--reference`` long), without any ground truth (CheXstray, Soin et
al. 2022: monitor outputs and input metadata). Prints a report, writes a PNG plot, and exits 3 when an alert
threshold is crossed (0 otherwise), so a cron job or CI step can page someone.

Alert thresholds (docs/audit.md "Drift monitoring"):

* a label's confidence distribution: two-sample Kolmogorov-Smirnov (scipy) p < 0.01 / number of labels
  (Bonferroni) and KS statistic >= 0.1; the population stability index (PSI, 10 reference-decile bins) is
  reported beside it (< 0.1 stable, 0.1-0.25 moderate, >= 0.25 major) but does not alert by itself;
* OOD rate, referral rate: chi-squared test on the 2x2 table p < 0.01 and an absolute change >= 5 points;
* input format mix and image size mix: chi-squared test p < 0.01 and Cramer's V >= 0.1;
* no alert at all with fewer than ``--min-records`` (30) answered predictions in either window.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from scipy import stats

from service.audit import AuditQuery, AuditStore
from service.schemas import AuditRecord

EXIT_DRIFT = 3
KS_ALPHA = 0.01
KS_MIN_STATISTIC = 0.1
RATE_ALPHA = 0.01
RATE_MIN_CHANGE = 0.05
MIX_ALPHA = 0.01
MIX_MIN_CRAMERS_V = 0.1
_SIZE_BUCKETS_MP = ((0.0, "<1 MP"), (1.0, "1-4 MP"), (4.0, "4-9 MP"), (9.0, ">=9 MP"))
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w`` -> timedelta."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration like 7d, 12h, 90m or 2w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


def format_duration(span: timedelta) -> str:
    """The inverse of :func:`parse_duration`, in the largest whole unit."""
    seconds = span.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds >= _UNIT_S[unit] and seconds % _UNIT_S[unit] == 0:
            return f"{seconds / _UNIT_S[unit]:g}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class LabelDrift:
    label: str
    reference_mean: float
    current_mean: float
    ks_statistic: float
    ks_pvalue: float
    psi: float
    alert: bool


@dataclass(frozen=True)
class RateDrift:
    name: str
    reference: float
    current: float
    pvalue: float
    alert: bool


@dataclass(frozen=True)
class MixDrift:
    name: str
    categories: list[str]
    reference: list[int]
    current: list[int]
    pvalue: float
    cramers_v: float
    alert: bool


@dataclass(frozen=True)
class DriftReport:
    reference_n: int
    current_n: int
    labels: list[LabelDrift]
    rates: list[RateDrift]
    mixes: list[MixDrift]
    enough_data: bool

    @property
    def alert(self) -> bool:
        flags = [d.alert for d in self.labels] + [r.alert for r in self.rates] + [m.alert for m in self.mixes]
        return self.enough_data and any(flags)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's decile bins (a floor of 1e-4 keeps empty bins finite)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if edges.size < 3:
        return 0.0
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.maximum(np.histogram(reference, edges)[0] / reference.size, 1e-4)
    cur = np.maximum(np.histogram(current, edges)[0] / current.size, 1e-4)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _size_bucket(record: AuditRecord) -> str:
    if record.width is None or record.height is None:
        return "unknown"
    megapixels = record.width * record.height / 1e6
    name = _SIZE_BUCKETS_MP[0][1]
    for low, bucket in _SIZE_BUCKETS_MP:
        if megapixels >= low:
            name = bucket
    return name


def _mix(name: str, reference: list[str], current: list[str]) -> MixDrift:
    categories = sorted(set(reference) | set(current))
    ref = [reference.count(c) for c in categories]
    cur = [current.count(c) for c in categories]
    if len(categories) < 2 or sum(ref) == 0 or sum(cur) == 0:  # nothing to compare (an empty window): no test
        return MixDrift(name, categories, ref, cur, 1.0, 0.0, False)
    table = np.array([ref, cur])
    chi2, pvalue, _, _ = stats.chi2_contingency(table)
    cramers_v = float(np.sqrt(chi2 / table.sum() / (min(table.shape) - 1)))
    alert = bool(pvalue < MIX_ALPHA and cramers_v >= MIX_MIN_CRAMERS_V)
    return MixDrift(name, categories, ref, cur, float(pvalue), cramers_v, alert)


def _rate(name: str, reference: list[bool], current: list[bool]) -> RateDrift:
    ref_rate = float(np.mean(reference)) if reference else 0.0
    cur_rate = float(np.mean(current)) if current else 0.0
    table = np.array([[sum(reference), len(reference) - sum(reference)], [sum(current), len(current) - sum(current)]])
    # An empty window or a rate of 0 or 1 in both leaves a zero margin: no test (chi-squared is undefined there).
    degenerate = (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any()
    pvalue = 1.0 if degenerate else float(stats.chi2_contingency(table)[1])
    alert = pvalue < RATE_ALPHA and abs(cur_rate - ref_rate) >= RATE_MIN_CHANGE
    return RateDrift(name, ref_rate, cur_rate, pvalue, alert)


def compare(reference: Sequence[AuditRecord], current: Sequence[AuditRecord], *, min_records: int = 30) -> DriftReport:
    """The drift of ``current`` against ``reference`` (answered predictions; refusals count in no statistic
    but the OOD rate, where a rejected image is an OOD image)."""
    ref_ok = [r for r in reference if r.status == 200]
    cur_ok = [r for r in current if r.status == 200]
    label_names = sorted(
        {label for r in ref_ok for label in r.findings} & {label for r in cur_ok for label in r.findings}
    )
    labels: list[LabelDrift] = []
    for label in label_names:
        ref = np.array([r.findings[label].conf for r in ref_ok if label in r.findings])
        cur = np.array([r.findings[label].conf for r in cur_ok if label in r.findings])
        test = stats.ks_2samp(ref, cur)
        statistic, pvalue = float(test.statistic), float(test.pvalue)
        alert = pvalue < KS_ALPHA / max(1, len(label_names)) and statistic >= KS_MIN_STATISTIC
        labels.append(LabelDrift(label, float(ref.mean()), float(cur.mean()), statistic, pvalue, psi(ref, cur), alert))
    gated_ref = [r for r in reference if r.ood is not None]
    gated_cur = [r for r in current if r.ood is not None]
    rates = [
        _rate(
            "ood",
            [not r.ood.in_distribution for r in gated_ref if r.ood],
            [not r.ood.in_distribution for r in gated_cur if r.ood],
        ),
        _rate(
            "referral",
            [bool(r.referral and r.referral.refer) for r in ref_ok],
            [bool(r.referral and r.referral.refer) for r in cur_ok],
        ),
    ]
    mixes = [
        _mix(
            "input format", [r.input_format or "unknown" for r in ref_ok], [r.input_format or "unknown" for r in cur_ok]
        ),
        _mix("image size", [_size_bucket(r) for r in ref_ok], [_size_bucket(r) for r in cur_ok]),
    ]
    enough = len(ref_ok) >= min_records and len(cur_ok) >= min_records
    return DriftReport(len(ref_ok), len(cur_ok), labels, rates, mixes, enough)


def format_report(report: DriftReport, *, current: str, reference: str) -> str:
    lines = [
        f"drift report: current {current} ({report.current_n} answered) vs reference {reference} "
        f"({report.reference_n} answered)",
        "",
        f"{'label':<28} {'ref mean':>8} {'cur mean':>8} {'KS D':>6} {'KS p':>9} {'PSI':>6}  alert",
    ]
    for d in report.labels:
        lines.append(
            f"{d.label:<28} {d.reference_mean:8.3f} {d.current_mean:8.3f} {d.ks_statistic:6.3f} {d.ks_pvalue:9.2e} "
            f"{d.psi:6.3f}  {'DRIFT' if d.alert else '-'}"
        )
    lines.append("")
    for r in report.rates:
        lines.append(
            f"{r.name + ' rate':<28} {r.reference:8.3f} {r.current:8.3f} p={r.pvalue:.2e}  "
            f"{'DRIFT' if r.alert else '-'}"
        )
    for m in report.mixes:
        mix = ", ".join(f"{c} {a}->{b}" for c, a, b in zip(m.categories, m.reference, m.current, strict=True))
        lines.append(
            f"{m.name + ' mix':<28} {mix}  p={m.pvalue:.2e} V={m.cramers_v:.2f}  {'DRIFT' if m.alert else '-'}"
        )
    lines.append("")
    if not report.enough_data:
        lines.append("verdict: not enough data to judge (fewer answered predictions than --min-records in a window)")
    else:
        lines.append("verdict: DRIFT (see the rows marked DRIFT)" if report.alert else "verdict: no drift")
    return "\n".join(lines)


def plot(report: DriftReport, reference: Sequence[AuditRecord], current: Sequence[AuditRecord], path: Path) -> None:
    """One panel per label (reference vs current confidence histograms), one for the rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(report.labels) + 1
    columns = 4
    rows = (panels + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for axis, drift in zip(axes.flat, report.labels, strict=False):
        ref = [r.findings[drift.label].conf for r in reference if r.status == 200 and drift.label in r.findings]
        cur = [r.findings[drift.label].conf for r in current if r.status == 200 and drift.label in r.findings]
        axis.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
        axis.hist(cur, bins=bins, density=True, alpha=0.5, label="current")
        axis.set_title(
            f"{drift.label}{' DRIFT' if drift.alert else ''}\nKS D={drift.ks_statistic:.2f} PSI={drift.psi:.2f}",
            fontsize=8,
        )
    if report.labels:
        axes.flat[0].legend(fontsize=7)
    rate_axis = axes.flat[len(report.labels)]
    x = np.arange(len(report.rates))
    rate_axis.bar(x - 0.2, [r.reference for r in report.rates], 0.4, label="reference")
    rate_axis.bar(x + 0.2, [r.current for r in report.rates], 0.4, label="current")
    rate_axis.set_xticks(x, [r.name for r in report.rates])
    rate_axis.set_title("rates", fontsize=8)
    rate_axis.legend(fontsize=7)
    for axis in list(axes.flat)[panels:]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--since", type=parse_duration, default=parse_duration("7d"), help="current window (7d)")
    parser.add_argument(
        "--reference", type=parse_duration, default=parse_duration("30d"), help="reference window before it (30d)"
    )
    parser.add_argument("--url", help="audit database URL (default: CXR_AUDIT_URL, else the service's default)")
    parser.add_argument("--model", help="only this model name")
    parser.add_argument("--plot", type=Path, default=Path("drift.png"), help="PNG to write (drift.png)")
    parser.add_argument("--min-records", type=int, default=30)
    parser.add_argument(
        "--guarantee",
        type=Path,
        metavar="MODEL_DIR",
        help="instead of drift: watch the referral rule of this model directory against the radiologists' verdicts "
        "in the trail (docs/guarantee.md); --since bounds the watch, --plot gets its chart; exit 3 when broken",
    )
    args = parser.parse_args(argv)
    if args.url is None:
        from service.settings import InvalidSettingsError, load_settings

        try:
            args.url = load_settings().audit.url
        except InvalidSettingsError as err:
            parser.error(str(err))  # one line, exit 2
    now = datetime.now(timezone.utc)
    if args.guarantee is not None:
        return _guarantee(args.guarantee, args.url, since=now - args.since, plot_path=args.plot, parser=parser)
    split = now - args.since
    store = AuditStore.open(args.url)
    try:
        reference = list(store.iter_records(AuditQuery(since=split - args.reference, until=split, model=args.model)))
        current = list(store.iter_records(AuditQuery(since=split, until=now, model=args.model)))
    finally:
        store.close()
    report = compare(reference, current, min_records=args.min_records)
    print(
        format_report(
            report,
            current=f"last {format_duration(args.since)}",
            reference=f"{format_duration(args.reference)} before that",
        )
    )
    plot(report, reference, current, args.plot)
    print(f"plot: {args.plot}")
    return EXIT_DRIFT if report.alert else 0


def _guarantee(model_dir: Path, url: str, *, since: datetime, plot_path: Path, parser: argparse.ArgumentParser) -> int:
    from bayesnet.checkpoint import load_spec, read_checkpoint_document
    from bayesnet.errors import CheckpointError
    from service.guarantee.watch import format_watch, plot_watch, watch, watch_paths

    try:
        spec = load_spec(model_dir)
        sha256 = str(read_checkpoint_document(model_dir)["weights_sha256"])
    except (CheckpointError, KeyError) as err:
        parser.error(f"--guarantee {model_dir}: {err}")
    if spec.referral is None:
        parser.error(f"--guarantee {model_dir}: the model has no referral rule, so there is no guarantee to watch")
    store = AuditStore.open(url)
    try:
        report = watch(store, spec.referral, spec.trained_labels, model_sha256=sha256, since=since)
        paths = watch_paths(store, spec.referral, spec.trained_labels, model_sha256=sha256, since=since)
    finally:
        store.close()
    print(format_watch(report))
    plot_watch(report, plot_path, paths)
    print(f"plot: {plot_path}")
    return EXIT_DRIFT if report.exceeded else 0


if __name__ == "__main__":
    sys.exit(main())
