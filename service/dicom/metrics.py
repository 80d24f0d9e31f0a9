"""What /metrics exports of the DICOMweb forwarding outbox, read at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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
