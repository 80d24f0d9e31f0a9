"""The referral rule's guarantee, watched on the site's own films: what the radiologists' verdicts say about it.

The rule promises (``bayesnet.referral.describe``): of films that have a finding, at most ``alpha`` are reported
negative for it; of abnormal films, at most ``study_alpha`` are cleared as normal; each with confidence
``1 - delta`` while the films resemble the calibration films. From the scored films that have verdicts
(``POST /v1/outcomes``) this module counts, per finding, the films with the finding and how many of them the rule
reported negative (the miss rate the promise is about), and at study level the abnormal films and how many were
cleared; each rate gets an anytime-valid confidence sequence (``bayesnet.sequential``), whose bounds stay valid
however often they are read. ``exceeded`` is the evidence the promise is broken: the whole sequence above its
alpha. Also counted: how many cleared films got a verdict at all (outcome coverage; a watch without verdicts on
cleared films sees no misses), the miss rate among cleared films (what a reader of cleared films meets), and the
observed referral rate against the rule's expectation.

Only answered records of the model in use (its weights' sha256) count, since ``since``: a recalibrated model starts
a new watch.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, select

from bayesnet.sequential import MixturePrior, RateBounds, confidence_sequence, exceeds
from bayesnet.spec import ReferralSpec
from service.audit.models import AuditEvent, AuditFinding, AuditOutcome
from service.audit.store import AuditStore, as_utc

#: How strongly the mixture prior sits at the promised rate (Beta with mean alpha, a + b = this): tightest where the
#: decision is. bench/guarantee_watch.py measures the films it takes to detect a broken promise with it.
PRIOR_STRENGTH = 10.0
#: Referral reasons that the operating state adds (shadow mode, a suspended guarantee): a film referred only for
#: them is one the rule itself cleared.
STATE_REASONS = frozenset({"shadow_mode", "guarantee_suspended"})


@dataclass(frozen=True)
class RateWatch:
    """One promised rate on the site's films: its limit and its confidence sequence."""

    limit: float
    bounds: RateBounds
    exceeded: bool


@dataclass(frozen=True)
class FindingWatch:
    label: str
    #: Films with a verdict "present" for the finding, and the rule's misses among them.
    miss_rate: RateWatch
    #: Films the rule reported negative that got a verdict for the finding, and how many were present.
    cleared_with_verdict: int
    present_among_cleared: int


@dataclass(frozen=True)
class WatchReport:
    model_sha256: str
    since: datetime | None
    delta: float
    films: int
    referred: int
    expected_referral_rate: float
    cleared: int
    cleared_with_verdict: int
    #: The same for the cleared films old enough for their verdicts to be due (``due_before``).
    cleared_due: int
    cleared_due_with_verdict: int
    findings: dict[str, FindingWatch]
    study: RateWatch | None

    @property
    def referral_rate(self) -> float | None:
        return self.referred / self.films if self.films else None

    @property
    def coverage(self) -> float | None:
        """Fraction of the films the rule cleared that got a verdict (None before the first cleared film)."""
        return self.cleared_with_verdict / self.cleared if self.cleared else None

    @property
    def coverage_due(self) -> float | None:
        """Coverage among the cleared films whose verdicts are due (None before the first)."""
        return self.cleared_due_with_verdict / self.cleared_due if self.cleared_due else None

    @property
    def exceeded(self) -> list[str]:
        """Which promises the verdicts show broken: finding labels, and "study" for clearing abnormal films."""
        broken = [label for label, watch in self.findings.items() if watch.miss_rate.exceeded]
        return [*broken, "study"] if self.study is not None and self.study.exceeded else broken


def promise_prior(limit: float) -> MixturePrior:
    """The mixture prior of a promise's sequence: centred on its limit (kept inside (0, 1))."""
    return MixturePrior(mean=min(max(limit, 1e-3), 0.999), strength=PRIOR_STRENGTH)


def _rate(events: int, trials: int, limit: float, delta: float) -> RateWatch:
    prior = promise_prior(limit)
    return RateWatch(
        limit=limit,
        bounds=confidence_sequence(events, trials, delta, prior),
        exceeded=exceeds(events, trials, limit, delta, prior),
    )


def rule_cleared(refer: bool | None, reasons: Iterable[str]) -> bool:
    """Whether the rule itself cleared the film: not referred, or referred only because of the operating state."""
    return refer is False or (refer is True and set(reasons) <= STATE_REASONS and bool(set(reasons)))


def _trail(store: AuditStore, model_sha256: str, since: datetime | None) -> tuple[Sequence[Any], Sequence[Any]]:
    """The answered films of the model since ``since`` (id, refer, reasons, when) and their verdicts (verdict id,
    film id, label, present, the rule's decision), verdicts in the order they arrived."""
    where = and_(AuditEvent.status == 200, AuditEvent.model_sha256 == model_sha256)
    if since is not None:
        where = and_(where, AuditEvent.occurred_at >= since)
    with store.engine.connect() as connection:
        events = connection.execute(
            select(AuditEvent.id, AuditEvent.refer, AuditEvent.referral_reasons, AuditEvent.occurred_at).where(where)
        ).all()
        verdicts = connection.execute(
            select(
                AuditOutcome.id, AuditOutcome.event_pk, AuditOutcome.label, AuditOutcome.present, AuditFinding.decision
            )
            .join(
                AuditFinding,
                and_(AuditFinding.event_pk == AuditOutcome.event_pk, AuditFinding.label == AuditOutcome.label),
            )
            .join(AuditEvent, AuditEvent.id == AuditOutcome.event_pk)
            .where(where)
            .order_by(AuditOutcome.id)
        ).all()
    return events, verdicts


def watch(
    store: AuditStore,
    rule: ReferralSpec,
    labels: Sequence[str],
    *,
    model_sha256: str,
    since: datetime | None = None,
    delta: float | None = None,
    due_before: datetime | None = None,
) -> WatchReport:
    """The guarantee's live status for the model whose weights have ``model_sha256`` (reads the trail; blocking).

    ``labels``: the trained findings; ``delta``: the watch's own error budget (default: the rule's delta);
    ``due_before``: cleared films scored before this have their verdicts due (default: all of them).
    """
    budget = rule.delta if delta is None else delta
    events, verdicts = _trail(store, model_sha256, since)
    cleared_films = {pk for pk, refer, reasons, _ in events if rule_cleared(refer, reasons or [])}
    due = {pk for pk, _, _, at in events if due_before is None or as_utc(at) < due_before} & cleared_films
    judged = {pk for _, pk, _, _, _ in verdicts}
    positives: dict[str, int] = defaultdict(int)
    misses: dict[str, int] = defaultdict(int)
    cleared_judged: dict[str, int] = defaultdict(int)
    cleared_present: dict[str, int] = defaultdict(int)
    abnormal: set[int] = set()
    study_labels = set(rule.study_labels)
    for _, pk, label, present, decision in verdicts:
        if present:
            positives[label] += 1
            misses[label] += decision == "negative"
            if label in study_labels:
                abnormal.add(pk)
        if decision == "negative":
            cleared_judged[label] += 1
            cleared_present[label] += bool(present)
    findings = {
        label: FindingWatch(
            label=label,
            miss_rate=_rate(misses[label], positives[label], rule.alpha, budget),
            cleared_with_verdict=cleared_judged[label],
            present_among_cleared=cleared_present[label],
        )
        for label in labels
    }
    study = None
    if rule.study_threshold is not None:
        study = _rate(len(abnormal & cleared_films), len(abnormal), rule.study_alpha, budget)
    return WatchReport(
        model_sha256=model_sha256,
        since=since,
        delta=budget,
        films=len(events),
        referred=sum(1 for pk, refer, _, _ in events if refer and pk not in cleared_films),
        expected_referral_rate=rule.expected_study_referral_rate,
        cleared=len(cleared_films),
        cleared_with_verdict=len(cleared_films & judged),
        cleared_due=len(due),
        cleared_due_with_verdict=len(due & judged),
        findings=findings,
        study=study,
    )


@dataclass(frozen=True)
class WatchPath:
    """One promise's confidence sequence as the verdicts arrived: after ``trials[i]`` films it counts (films with
    the finding; for the study promise, abnormal films), ``misses[i]`` missed and the bounds then."""

    name: str
    limit: float
    trials: list[int]
    misses: list[int]
    lower: list[float]
    upper: list[float]


def watch_paths(
    store: AuditStore,
    rule: ReferralSpec,
    labels: Sequence[str],
    *,
    model_sha256: str,
    since: datetime | None = None,
    delta: float | None = None,
    points: int = 200,
) -> dict[str, WatchPath]:
    """Each promise's sequence over the verdicts in the order they arrived (the plot's history; reads the trail).

    The same counts as :func:`watch` at the end of each path. A film counts for a finding when its "present"
    verdict arrives, and for the study promise when its first "present" verdict for a study label does. At most
    ``points`` points per promise (every film while fewer, then evenly spaced, always the last)."""
    budget = rule.delta if delta is None else delta
    events, verdicts = _trail(store, model_sha256, since)
    cleared_films = {pk for pk, refer, reasons, _ in events if rule_cleared(refer, reasons or [])}
    outcomes: dict[str, list[bool]] = {label: [] for label in labels}
    study: list[bool] = []
    counted: set[int] = set()
    study_labels = set(rule.study_labels)
    for _, pk, label, present, decision in verdicts:
        if not present:
            continue
        if label in outcomes:
            outcomes[label].append(decision == "negative")
        if label in study_labels and pk not in counted:
            counted.add(pk)
            study.append(pk in cleared_films)
    limits = dict.fromkeys(labels, rule.alpha)
    if rule.study_threshold is not None:
        outcomes["study"], limits["study"] = study, rule.study_alpha
    paths = {}
    for name, missed in outcomes.items():
        n = len(missed)
        spaced = {round(1 + i * (n - 1) / (points - 1)) for i in range(points)}
        steps = list(range(1, n + 1)) if n <= points else sorted(spaced)
        running = [0, *itertools.accumulate(missed)]
        bounds = [confidence_sequence(running[t], t, budget, promise_prior(limits[name])) for t in steps]
        paths[name] = WatchPath(
            name=name,
            limit=limits[name],
            trials=steps,
            misses=[running[t] for t in steps],
            lower=[b.lower for b in bounds],
            upper=[b.upper for b in bounds],
        )
    return paths


def _line(name: str, rate: RateWatch) -> str:
    b = rate.bounds
    observed = "-" if b.estimate is None else f"{b.estimate:.3f}"
    status = "BROKEN" if rate.exceeded else ("no verdicts" if b.trials == 0 else "holds so far")
    return (
        f"  {name:<28} {b.events:>6} / {b.trials:<6} {observed:>8}  [{b.lower:.3f}, {b.upper:.3f}]"
        f"  {rate.limit:>5.3f}  {status}"
    )


def format_watch(report: WatchReport) -> str:
    """The report as text for a terminal or a cron mail."""
    coverage = "-" if report.coverage is None else f"{report.coverage:.1%}"
    referral = "-" if report.referral_rate is None else f"{report.referral_rate:.1%}"
    lines = [
        f"Guarantee watch for weights sha256 {report.model_sha256[:16]}..."
        + (f" since {report.since:%Y-%m-%d %H:%M} UTC" if report.since else ""),
        f"films scored: {report.films}; referred by the rule: {referral} "
        f"(expected {report.expected_referral_rate:.1%})",
        f"cleared by the rule: {report.cleared}; with a radiologist's verdict: {report.cleared_with_verdict} "
        f"(coverage {coverage})",
        f"confidence sequences at {1 - report.delta:.0%} (anytime-valid: read them as often as you like)",
        f"  {'promise':<28} {'misses / films':>15} {'observed':>8}  {'sequence':<16}  {'alpha':>5}  status",
    ]
    for label, finding in report.findings.items():
        lines.append(_line(f"{label} reported negative", finding.miss_rate))
    if report.study is not None:
        lines.append(_line("abnormal film cleared", report.study))
    broken = report.exceeded
    lines.append(
        f"BROKEN: {', '.join(broken)}: the verdicts show the miss rate above alpha; stop clearing and recalibrate."
        if broken
        else "No promise is shown broken by the verdicts so far."
    )
    return "\n".join(lines)


def plot_watch(report: WatchReport, path: Path, paths: dict[str, WatchPath] | None = None) -> None:
    """Each promise's confidence sequence now (a bar from lower to upper bound) against its alpha, and with
    ``paths`` (:func:`watch_paths`) beside it each promise's upper bound as the verdicts arrived, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{label}", f.miss_rate) for label, f in report.findings.items()]
    if report.study is not None:
        rows.append(("abnormal cleared (study)", report.study))
    shown = {name: p for name, p in (paths or {}).items() if p.trials}
    height = 0.45 * len(rows) + 1.5
    if shown:
        figure, (axis, history) = plt.subplots(1, 2, figsize=(16, max(height, 5.0)), width_ratios=(1, 1.2))
    else:
        figure, axis = plt.subplots(figsize=(8, height))
    for y, (_, rate) in enumerate(rows):
        colour = "tab:red" if rate.exceeded else ("lightgray" if rate.bounds.trials == 0 else "tab:blue")
        axis.plot([rate.bounds.lower, rate.bounds.upper], [y, y], color=colour, linewidth=6, solid_capstyle="butt")
        if rate.bounds.estimate is not None:
            axis.plot([rate.bounds.estimate], [y], "k|", markersize=14)
        axis.plot([rate.limit], [y], "kv", markersize=7)
    axis.set_yticks(range(len(rows)), [name for name, _ in rows])
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel(f"miss rate: {1 - report.delta:.0%} confidence sequence (bar), observed (|), alpha (v)")
    axis.set_title(f"Guarantee watch, {report.films} films, coverage of cleared films {report.coverage or 0:.0%}")
    if shown:
        broken = set(report.exceeded)
        for name, p in shown.items():
            style = {"linewidth": 2.2, "color": "tab:red"} if name in broken else {"linewidth": 0.9, "alpha": 0.7}
            history.plot(p.trials, p.upper, label=name, **style)
            history.plot(p.trials, p.lower, linestyle=":", **style)
        for limit in sorted({p.limit for p in shown.values()}):
            history.axhline(limit, color="black", linestyle="--", linewidth=1)
        history.set_xscale("log")
        history.set_ylim(0, 1)
        history.set_xlabel("films with the finding (study: abnormal films) with verdicts, in order of arrival")
        history.set_ylabel("miss rate: upper (line) and lower (dotted) bounds")
        history.set_title("The sequences as verdicts arrived; alpha dashed; a broken promise in red")
        history.legend(fontsize=7, ncols=2, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
