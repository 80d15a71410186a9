"""The audit trail's metrics, read at scrape time: records made, refused sign-ins held
back by the throttle, records the audit bus lost."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .publisher import BusAuditTrail


class AuditCollector(Collector):
    """`llm_proxy_audit_*` of one process."""

    def __init__(self, trail: BusAuditTrail) -> None:
        self._trail = trail

    def collect(self) -> Iterable[Metric]:
        trail = self._trail
        yield CounterMetricFamily(
            "llm_proxy_audit_records",
            "Audit records this process put on the audit bus.",
            value=trail.recorded,
        )
        yield CounterMetricFamily(
            "llm_proxy_audit_suppressed",
            "Refused sign-ins not written to the audit trail (over the rate cap).",
            value=trail.throttle.suppressed,
        )
        yield CounterMetricFamily(
            "llm_proxy_audit_dropped",
            "Audit records the audit bus lost (buffer full, or published after close).",
            value=trail.bus.stats.dropped_total,
        )
