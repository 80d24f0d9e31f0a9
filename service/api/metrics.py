"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from service.runtime.batcher import BatchStats

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

    def watch(self, collector: Collector) -> None:
        """Export what ``collector`` reads at each scrape (the audit trail's and the outbox's own collectors)."""
        self.registry.register(collector)

    def count_connection_refusal(self, reason: str) -> None:
        """Called by the server's protocol (service.process.server) for each connection it cut."""
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
