"""Metrics of the fleet limits (REDIS_URL): Redis reachability and lease traffic.

Read from the limiter's counters at scrape time; the request path updates nothing
here. `llm_proxy_fleet_limits_degraded` is 1 while limits are per process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .metrics import counter_by

if TYPE_CHECKING:
    from ..proxy.fleet_limits import FleetStats


class FleetLimitsCollector(Collector):
    """Gauges and counters of one process's `FleetLimiter`."""

    def __init__(self, stats: Callable[[], FleetStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "llm_proxy_fleet_limits_degraded",
            "1 while Redis is unreachable and limits are enforced per process.",
            value=1 if stats.down else 0,
        )
        yield counter_by(
            "llm_proxy_fleet_lease_calls",
            "Redis lease script runs, by outcome.",
            "outcome",
            [
                ("granted", stats.lease_calls),
                ("released", stats.releases),
                ("failed", stats.lease_failures),
            ],
        )
        yield CounterMetricFamily(
            "llm_proxy_fleet_lease_waits",
            "Requests that waited for a Redis round trip: their token's lease was empty.",
            value=stats.waits,
        )
        yield CounterMetricFamily(
            "llm_proxy_fleet_fallback_decisions",
            "Requests decided by the in-process limits while Redis was unreachable.",
            value=stats.local_decisions,
        )
        yield CounterMetricFamily(
            "llm_proxy_fleet_closed_refusals",
            "Requests refused with 503 (REDIS_FAILURE_MODE=closed, Redis unreachable).",
            value=stats.closed_refusals,
        )
        yield GaugeMetricFamily(
            "llm_proxy_fleet_lease_units_held",
            "Units of token budgets this process holds, unspent (last housekeeping).",
            value=stats.units_held,
        )
