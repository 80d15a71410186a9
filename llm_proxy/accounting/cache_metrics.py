"""Metrics of the response cache (RESPONSE_CACHE=on): outcomes, writes, Redis trouble.

Read from the cache's counters at scrape time; the request path updates nothing
here. `llm_proxy_response_cache_down` is 1 while Redis is away and calls skip it.
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
    from ..proxy.cache import CacheStats


class ResponseCacheCollector(Collector):
    """Gauges and counters of one process's `ResponseCache`."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "llm_proxy_response_cache_down",
            "1 while Redis is unreachable and calls go upstream without the cache.",
            value=1 if stats.down else 0,
        )
        yield counter_by(
            "llm_proxy_response_cache_calls",
            "Calls by what the cache did: hit, miss (looked up, forwarded), bypass.",
            "outcome",
            [("hit", stats.hits), ("miss", stats.misses), ("bypass", stats.bypasses)],
        )
        yield counter_by(
            "llm_proxy_response_cache_answers",
            "Answers to keep: stored, too_large (over RESPONSE_CACHE_MAX_BYTES),"
            " dropped (writer queue full or Redis failed).",
            "outcome",
            [
                ("stored", stats.stored),
                ("too_large", stats.too_large),
                ("dropped", stats.dropped),
            ],
        )
        yield CounterMetricFamily(
            "llm_proxy_response_cache_errors",
            "Redis calls of the cache that failed (timeout, connection, error reply).",
            value=stats.errors,
        )
