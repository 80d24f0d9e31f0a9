"""The guarantee in the running service: the rule's operating state (mode, suspension) loaded from the audit trail
and pushed to the pipeline, the watch (``service.guarantee.watch``) recomputed every ``refresh_s`` and as soon as
verdicts arrive, the automatic stop (a broken promise, missing verdicts in supervised mode, an input drift alert),
and what ``GET /v1/model``, ``/v1/guarantee`` and ``/metrics`` show of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bayesnet.spec import ReferralSpec
from service.audit.store import AuditStore
from service.guarantee import state
from service.guarantee.watch import RateWatch, WatchReport, watch
from service.runtime.operating import Mode, Operating, OperatingSwitch
from service.schemas import GuaranteeStatus, PromiseStatus
from service.settings import GuaranteeSettings

log = logging.getLogger("service.guarantee")


class GuaranteeMonitor:
    """The rule's promise in operation for one model on one trail: the operating state (loaded from and recorded
    in the trail, pushed to the pipeline's :class:`OperatingSwitch`) and the latest :class:`WatchReport`, with the
    automatic stop. Its blocking methods touch the database: call them off the event loop."""

    def __init__(
        self,
        store: AuditStore,
        rule: ReferralSpec,
        labels: Sequence[str],
        *,
        model_sha256: str,
        switch: OperatingSwitch,
        settings: GuaranteeSettings,
    ) -> None:
        self.store, self.rule, self.labels, self.model_sha256 = store, rule, tuple(labels), model_sha256
        self.switch, self.settings = switch, settings
        self.refresh_s = settings.refresh_s
        self.report: WatchReport | None = None
        self.checked_at: datetime | None = None
        self.current: state.Transition | None = None
        self.drift_checked_at: datetime | None = None
        self._lock = threading.Lock()  # one transition at a time (refresh thread, admin requests)
        self._poked = asyncio.Event()

    def _record(self, *, mode: Mode, suspended: bool, reason: str, actor: str, detail: str) -> state.Transition:
        previous = self.current.state if self.current is not None else None
        self.current = state.record(
            self.store,
            at=datetime.now(timezone.utc),
            model_sha256=self.model_sha256,
            mode=mode,
            state=state.SUSPENDED if suspended else state.ACTIVE,
            previous_state=previous,
            reason=reason,
            actor=actor,
            detail=detail,
        )
        self.switch.set(Operating(mode=mode, suspended=suspended))
        log.warning("guarantee state: %s, %s (%s by %s: %s)", mode, self.current.state, reason, actor, detail)
        return self.current

    def load_state(self) -> state.Transition:
        """At start-up: the state the trail last recorded for this model, with the mode setting applied (a
        suspension survives a restart and a mode change; only a person lifts it)."""
        with self._lock:
            self.current = state.latest(self.store, self.model_sha256)
            mode = self.settings.mode
            if self.current is None:
                return self._record(
                    mode=mode, suspended=False, reason="first_start", actor="settings", detail="CXR_GUARANTEE_MODE"
                )
            if self.current.mode != mode:
                return self._record(
                    mode=mode,
                    suspended=self.current.suspended,
                    reason="mode_set",
                    actor="settings",
                    detail=f"CXR_GUARANTEE_MODE changed from {self.current.mode} to {mode}",
                )
            self.switch.set(Operating(mode=mode, suspended=self.current.suspended))
            return self.current

    def suspend(self, *, reason: str, actor: str, detail: str) -> state.Transition:
        with self._lock:
            assert self.current is not None, "load_state first"
            return self._record(mode=self.current.mode, suspended=True, reason=reason, actor=actor, detail=detail)

    def resume(self, *, actor: str, detail: str) -> state.Transition:
        """A person re-enables the rule: its watch starts afresh from now."""
        with self._lock:
            assert self.current is not None, "load_state first"
            return self._record(mode=self.current.mode, suspended=False, reason="resumed", actor=actor, detail=detail)

    def set_mode(self, mode: Mode, *, actor: str, detail: str) -> state.Transition:
        with self._lock:
            assert self.current is not None, "load_state first"
            return self._record(
                mode=mode, suspended=self.current.suspended, reason="mode_set", actor=actor, detail=detail
            )

    def refresh(self) -> WatchReport:
        """Recompute the watch from the trail (since the last resumption) and stop the rule if it must stop."""
        now = datetime.now(timezone.utc)
        report = watch(
            self.store,
            self.rule,
            self.labels,
            model_sha256=self.model_sha256,
            since=state.watch_start(self.store, self.model_sha256),
            due_before=now - timedelta(hours=self.settings.verdict_delay_h),
        )
        self.report, self.checked_at = report, now
        why = self._stop_reason(report) or self._drift_reason(now)
        if why is not None and self.current is not None and not self.current.suspended:
            self.suspend(reason=why[0], actor="service", detail=why[1])
        return report

    def _stop_reason(self, report: WatchReport) -> tuple[str, str] | None:
        if report.exceeded:
            parts = []
            for name in report.exceeded:
                rate = report.study if name == "study" else report.findings[name].miss_rate
                assert rate is not None
                b = rate.bounds
                parts.append(f"{name}: {b.events} of {b.trials} missed, bound [{b.lower:.3f}, {b.upper:.3f}]")
            return (
                "miss_rate_exceeded",
                "the verdicts show the miss rate above alpha (" + "; ".join(parts) + ")",
            )
        mode = self.current.mode if self.current is not None else self.settings.mode
        coverage = report.coverage_due
        if (
            mode == "supervised"
            and coverage is not None
            and report.cleared_due >= self.settings.min_cleared
            and coverage < self.settings.min_coverage
        ):
            return (
                "coverage_below",
                f"{report.cleared_due_with_verdict} of {report.cleared_due} cleared films due a verdict have one "
                f"({coverage:.1%} < {self.settings.min_coverage:.0%})",
            )
        return None

    def _drift_reason(self, now: datetime) -> tuple[str, str] | None:
        """The input drift check (``service.monitor.compare``) when it is due: every ``drift_every_s``."""
        every = self.settings.drift_every_s
        if every <= 0 or (self.drift_checked_at is not None and (now - self.drift_checked_at).total_seconds() < every):
            return None
        self.drift_checked_at = now
        try:
            return self._drift_check(now)
        except Exception as err:  # the check must never stop the watch or the start-up; it is retried next period
            log.warning("input drift check failed: %s", err)
            return None

    def _drift_check(self, now: datetime) -> tuple[str, str] | None:
        from service.audit import AuditQuery
        from service.monitor import compare

        split = now - timedelta(hours=self.settings.drift_window_h)
        start = split - timedelta(hours=self.settings.drift_reference_h)
        reference = list(self.store.iter_records(AuditQuery(since=start, until=split)))
        current = list(self.store.iter_records(AuditQuery(since=split, until=now)))
        report = compare(
            [r for r in reference if r.model.sha256 == self.model_sha256],
            [r for r in current if r.model.sha256 == self.model_sha256],
        )
        if not report.alert:
            return None
        drifted = [label.label for label in report.labels if label.alert]
        drifted += [rate.name for rate in report.rates if rate.alert]
        drifted += [mix.name for mix in report.mixes if mix.alert]
        return (
            "drift_alert",
            f"the input drift check alerted on {', '.join(drifted) or 'the inputs'} (last "
            f"{self.settings.drift_window_h:g} h against the {self.settings.drift_reference_h:g} h before; "
            "python -m service.monitor shows the report)",
        )

    def poke(self) -> None:
        """Verdicts arrived: refresh now rather than at the next period."""
        self._poked.set()

    async def run(self) -> None:
        """Refresh every ``refresh_s`` seconds, or when poked, until cancelled; a failed refresh is logged and
        retried at the next period (the last report stays, with its time)."""
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as err:  # a database hiccup must not end the watch
                log.warning("guarantee watch refresh failed: %s", err)
            self._poked.clear()
            with contextlib.suppress(TimeoutError):  # the period ended without a poke
                await asyncio.wait_for(self._poked.wait(), timeout=self.refresh_s)


def guarantee_status(monitor: GuaranteeMonitor | None) -> GuaranteeStatus | None:
    """What ``/v1/model`` says of the rule's promise on the site's verdicts (None: no watch, or none computed yet)."""
    if monitor is None or monitor.report is None or monitor.checked_at is None or monitor.current is None:
        return None
    report, current = monitor.report, monitor.current

    def promise(rate: RateWatch) -> PromiseStatus:
        bounds = rate.bounds
        return PromiseStatus(
            limit=rate.limit,
            judged_films=bounds.trials,
            misses=bounds.events,
            observed=bounds.estimate,
            lower=bounds.lower,
            upper=bounds.upper,
            broken=rate.exceeded,
        )

    return GuaranteeStatus(
        mode=current.mode,
        state=current.state,  # type: ignore[arg-type]
        changed_at=current.at,
        change_reason=current.reason,
        checked_at=monitor.checked_at,
        confidence=1.0 - report.delta,
        films=report.films,
        referral_rate=report.referral_rate,
        expected_referral_rate=report.expected_referral_rate,
        cleared=report.cleared,
        cleared_with_verdict=report.cleared_with_verdict,
        coverage=report.coverage,
        findings={label: promise(f.miss_rate) for label, f in report.findings.items()},
        study=promise(report.study) if report.study is not None else None,
        broken=report.exceeded,
    )


class GuaranteeCollector(Collector):
    """``cxr_guarantee_*``: the latest watch, read at each scrape (nothing is computed in the scrape)."""

    def __init__(self, monitor: GuaranteeMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        report = self.monitor.report
        if report is None:
            return
        families = {
            name: GaugeMetricFamily(f"cxr_guarantee_{name}", text, labels=["promise"])
            for name, text in (
                ("miss_rate_lower", "Lower bound of the miss rate's anytime-valid confidence sequence"),
                ("miss_rate_upper", "Upper bound of the miss rate's anytime-valid confidence sequence"),
                ("miss_rate_limit", "The promised miss rate (the rule's alpha, or study_alpha for study)"),
                ("judged_films", "Films with the finding (study: abnormal films) by the radiologists' verdicts"),
                ("misses", "Of those, films the rule reported negative (study: cleared as normal)"),
                ("broken", "1 when the whole confidence sequence is above the limit: the promise is broken"),
            )
        }
        rates: list[tuple[str, RateWatch]] = [(label, f.miss_rate) for label, f in report.findings.items()]
        if report.study is not None:
            rates.append(("study", report.study))
        for promise, rate in rates:
            families["miss_rate_lower"].add_metric([promise], rate.bounds.lower)
            families["miss_rate_upper"].add_metric([promise], rate.bounds.upper)
            families["miss_rate_limit"].add_metric([promise], rate.limit)
            families["judged_films"].add_metric([promise], rate.bounds.trials)
            families["misses"].add_metric([promise], rate.bounds.events)
            families["broken"].add_metric([promise], float(rate.exceeded))
        yield from families.values()
        yield GaugeMetricFamily(
            "cxr_guarantee_outcome_coverage",
            "Fraction of the films the rule cleared that have a radiologist's verdict",
            report.coverage if report.coverage is not None else float("nan"),
        )
        yield GaugeMetricFamily(
            "cxr_guarantee_referral_rate",
            "Fraction of scored films the rule referred (compare cxr_guarantee_expected_referral_rate)",
            report.referral_rate if report.referral_rate is not None else float("nan"),
        )
        yield GaugeMetricFamily(
            "cxr_guarantee_expected_referral_rate",
            "The referral rate the rule showed on its calibration films",
            report.expected_referral_rate,
        )
