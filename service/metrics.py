"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.batcher import BatchStats

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    queue_wait: Histogram
    batch_size: Histogram
    inference: Histogram
    images: Counter
    errors: Counter
    queue_depth: Gauge
    model_info: Gauge
    dimse_stores: Counter
    connection_refusals: Counter

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "cxr_http_requests",
                "HTTP requests by route template, method and status",
                ["route", "method", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "cxr_http_request_duration_seconds",
                "HTTP request latency by route template and status",
                ["route", "status"],
                buckets=_LATENCY_BUCKETS_S,
                registry=registry,
            ),
            queue_wait=Histogram(
                "cxr_queue_wait_seconds",
                "Time an image waits in the queue before its batch starts",
                buckets=_LATENCY_BUCKETS_S,
                registry=registry,
            ),
            batch_size=Histogram(
                "cxr_batch_size_images", "Images per inference batch", buckets=_BATCH_BUCKETS, registry=registry
            ),
            inference=Histogram(
                "cxr_batch_inference_seconds",
                "Model time per batch (trunk, MC head, Grad-CAM)",
                buckets=_LATENCY_BUCKETS_S,
                registry=registry,
            ),
            images=Counter("cxr_images_processed", "Images run through the model", registry=registry),
            errors=Counter("cxr_errors", "Errors by type", ["type"], registry=registry),
            queue_depth=Gauge("cxr_queue_depth_images", "Images waiting for a batch", registry=registry),
            model_info=Gauge("cxr_model_info", "The loaded model (value 1)", ["name", "version"], registry=registry),
            dimse_stores=Counter(
                "cxr_dimse_stores",
                "C-STORE requests the DIMSE listener answered, by DIMSE status (0x0000 scored)",
                ["status"],
                registry=registry,
            ),
            connection_refusals=Counter(
                "cxr_http_connection_refusals",
                "Connections the server cut before their request reached the app, by reason: header_timeout "
                "(408), headers_too_large (431), body_after_answer_timeout (an unread body still trickling in "
                "after its answer)",
                ["reason"],
                registry=registry,
            ),
        )

    def watch_audit(self, source: Callable[[], AuditSnapshot | None]) -> None:
        """Export the audit trail's state and rolling output rates, read from ``source`` at each scrape."""
        self.registry.register(AuditCollector(source))

    def watch_outbox(self, source: Callable[[], OutboxSnapshot | None]) -> None:
        """Export the DICOMweb forwarding outbox (service.dicom.outbox), read from ``source`` at each scrape."""
        self.registry.register(OutboxCollector(source))

    def count_connection_refusal(self, reason: str) -> None:
        """Called by the server's protocol (service.server) for each connection it cut."""
        self.connection_refusals.labels(reason=reason).inc()

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.inference.observe(stats.process_s)
        for wait in stats.queue_wait_s:
            self.queue_wait.observe(wait)
        if stats.failed:
            self.errors.labels(type="BatchFailed").inc()
        else:
            self.images.inc(stats.size)


@dataclass(frozen=True)
class AuditSnapshot:
    """The audit trail's numbers at one scrape (service.audit fills it; this module knows nothing of databases)."""

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


@dataclass(frozen=True)
class OutboxSnapshot:
    """The forwarding outbox at one scrape (service.dicom.outbox fills it)."""

    depth: int
    forwarded: int
    failures: int
    rejected: int


class OutboxCollector(Collector):
    def __init__(self, source: Callable[[], OutboxSnapshot | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        if snap is None:
            return
        yield GaugeMetricFamily("cxr_dicomweb_outbox_instances", "SRs waiting in the outbox for the PACS", snap.depth)
        for name, text, value in (
            ("cxr_dicomweb_forwarded", "SRs the PACS acknowledged (STOW-RS)", snap.forwarded),
            ("cxr_dicomweb_forward_failures", "Failed store attempts to the PACS (retried)", snap.failures),
            ("cxr_dicomweb_rejected", "SRs the PACS refused outright (moved to rejected/)", snap.rejected),
        ):
            yield CounterMetricFamily(name, text, value)
