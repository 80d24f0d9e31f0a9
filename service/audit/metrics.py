"""What /metrics exports of the audit trail: its state and the rolling output rates, read at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class AuditSnapshot:
    """The audit trail's numbers at one scrape (``service.audit.snapshot`` fills it)."""

    lag_s: float
    queued: int
    spool_depth: int
    written: int
    commits: int
    failures: int
    spooled: int
    replayed: int
    purged: int
    window: int
    referred: int
    ood: int
    positives: dict[str, int] = field(default_factory=dict)
    conf_sum: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


class AuditCollector(Collector):
    def __init__(self, source: Callable[[], AuditSnapshot | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        if snap is None:
            return
        yield GaugeMetricFamily("cxr_audit_lag_seconds", "Age of the oldest audit record not yet durable", snap.lag_s)
        yield GaugeMetricFamily("cxr_audit_queue_records", "Audit records waiting for the writer", snap.queued)
        yield GaugeMetricFamily(
            "cxr_audit_spool_records", "Audit records in the on-disk spool (buffer policy)", snap.spool_depth
        )
        for name, text, value in (
            ("cxr_audit_records_written", "Audit records committed to the database", snap.written),
            (
                "cxr_audit_commits",
                "Database transactions that committed audit records (records written / commits: the group size)",
                snap.commits,
            ),
            ("cxr_audit_write_failures", "Audit write batches the database refused", snap.failures),
            ("cxr_audit_records_spooled", "Audit records written to the spool", snap.spooled),
            ("cxr_audit_records_replayed", "Spooled audit records replayed into the database", snap.replayed),
            ("cxr_audit_records_purged", "Audit records deleted past the retention period", snap.purged),
        ):
            yield CounterMetricFamily(name, text, value)
        window = max(snap.window, 1)
        yield GaugeMetricFamily(
            "cxr_rolling_window_predictions", "Answered predictions behind the rolling rates", snap.window
        )
        yield GaugeMetricFamily(
            "cxr_rolling_referral_rate", "Share of recent predictions referred", snap.referred / window
        )
        yield GaugeMetricFamily(
            "cxr_rolling_ood_rate", "Share of recent images the OOD gate flagged", snap.ood / window
        )
        positive = GaugeMetricFamily(
            "cxr_rolling_positive_rate", "Share of recent predictions decided positive, per label", labels=["label"]
        )
        mean_conf = GaugeMetricFamily("cxr_rolling_mean_conf", "Mean recent confidence, per label", labels=["label"])
        for label, count in sorted(snap.counts.items()):
            if count > 0:
                positive.add_metric([label], snap.positives.get(label, 0) / count)
                mean_conf.add_metric([label], snap.conf_sum.get(label, 0.0) / count)
        yield positive
        yield mean_conf
