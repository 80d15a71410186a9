"""Prometheus metrics: one `CollectorRegistry` per app, and the `GET /metrics` handler.

Counters and histograms are updated off the request path (by the instrumentation
consumer and the dispatchers); gauges of live state (in-flight requests, bus
counters, breaker state) are read only when scraped. Every label a client can choose
is bounded here: unknown values share one `other` label.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Final, Generic, TypeVar

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..audit.trail import auth_failed, bearer_refusal
from ..auth.bearer import bearer_matches
from ..auth.errors import AuthError
from ..auth.invalidation import InvalidationStats
from ..errors import api_error
from ..events.model import BusStats
from ..proxy.allowlist import KNOWN_METHODS
from ..proxy.breaker import BreakerState, CircuitBreaker

# Latency buckets from 1 ms (the proxy's own overhead) to 10 min (long generations).
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# The label value of everything beyond a label's bound.
OTHER: Final = "other"
# Distinct client-chosen models a process gives labels of their own: each one is a
# series per project, kind and source, and 20,000 made /metrics 10 MB.
MAX_MODEL_LABELS: Final = 100
_STATUS_LABELS: Final = tuple(str(status) for status in range(600))
BREAKER_STATE_VALUES: Final = {
    BreakerState.CLOSED: 0.0,
    BreakerState.HALF_OPEN: 1.0,
    BreakerState.OPEN: 2.0,
}


def method_label(method: str) -> str:
    """The method itself when it is a standard one, else `other`."""
    return method if method in KNOWN_METHODS else OTHER


def status_label(status: int) -> str:
    """The status code as text when it is a real one (100-599), else `other`."""
    return _STATUS_LABELS[status] if 100 <= status < 600 else OTHER


class BoundedLabel:
    """Client-chosen values as labels: the first `limit` distinct ones, then `other`.

    Values the configuration names (`named`) never count against the limit, so a
    flood of junk cannot push them into `other`. For one thread (the event loop).
    """

    __slots__ = ("limit", "_seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str, named: Container[str] = ()) -> str:
        if value in self._seen or value in named:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class _HistogramChild:
    """One label set's bucket counts and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound is >= it."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


Child = TypeVar("Child")


class _OneThreadFamily(Collector, Generic[Child]):
    """Named children per label set, updated without locks: for one thread only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        """The child of one label set (created on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child


class FastHistogram(_OneThreadFamily[_HistogramChild]):
    """A Prometheus histogram for one thread: `observe` is a bisect and two adds.

    prometheus-client's `Histogram` takes a lock and walks the buckets per
    observation, and its `labels()` takes a lock and a `str()` of every value. The
    event consumer observes four histograms and counts four counters per call, all
    on the event loop. benchmarks/callgrind_metrics.py measured (instructions,
    CPython 3.11, prometheus-client 0.26): a labelled observe 3,700 here against
    17,700; one call's metrics 31,000 against 133,000; the whole proxy's main
    thread per call, at one connection, 1.09 M against 1.20 M: prometheus-client's
    classes would cost about 9.5% of throughput, so these stay.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(float(bound) for bound in buckets)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        """Observe on the histogram without labels."""
        self.labels().observe(value)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )
        les = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for values, child in self._children.items():
            cumulative = list(itertools.accumulate(child.counts))
            family.add_metric(
                list(values), list(zip(les, cumulative, strict=True)), child.sum
            )
        return [family]


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class FastCounter(_OneThreadFamily[_CounterChild]):
    """A Prometheus counter for one thread, without prometheus-client's lock.

    `labels(...).inc()` is 2,800 instructions here against 14,400 with
    prometheus-client's `Counter` (benchmarks/callgrind_metrics.py; the per-call
    numbers are in `FastHistogram`).
    """

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        return [family]


def counter_by(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    """A scrape-time counter with one label: a sample per (label value, count)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


class _LiveState(Collector):
    """Reads live values at scrape time, so the request path never updates them."""

    def __init__(self) -> None:
        self.in_flight: Callable[[], int] = lambda: 0
        self.bus_stats: Callable[[], BusStats] | None = None
        self.accounting_dropped: Callable[[], int] = lambda: 0
        self.breaker: CircuitBreaker | None = None
        self.invalidation: Callable[[], InvalidationStats] | None = None

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "llm_proxy_in_flight_requests",
            "Proxied requests being handled now.",
            value=self.in_flight(),
        )
        yield from self._bus()
        if self.breaker is not None:
            yield GaugeMetricFamily(
                "llm_proxy_breaker_state",
                "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
                value=BREAKER_STATE_VALUES[self.breaker.state],
            )
        if self.invalidation is not None:
            yield from _invalidation(self.invalidation())

    def _bus(self) -> Iterable[Metric]:
        stats = self.bus_stats() if self.bus_stats is not None else BusStats()
        yield CounterMetricFamily(
            "llm_proxy_events_published",
            "Events handed to the event bus.",
            value=stats.published,
        )
        subscribers = sorted(stats.dropped.items())
        yield counter_by(
            "llm_proxy_events_dropped",
            "Events lost before a consumer got them, by stage.",
            "stage",
            [
                ("accounting", self.accounting_dropped()),
                ("bus_buffer", stats.buffer_dropped),
                *((f"subscriber:{name}", count) for name, count in subscribers),
            ],
        )
        yield GaugeMetricFamily(
            "llm_proxy_events_buffered",
            "Events held in this process by the bus.",
            value=stats.buffered,
        )
        yield GaugeMetricFamily(
            "llm_proxy_events_spooled",
            "Events waiting in the local spool file for Redis.",
            value=stats.spooled,
        )


def _invalidation(stats: InvalidationStats) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        "llm_proxy_token_invalidation_subscribed",
        "1 while this process hears other processes' token changes over Redis.",
        value=int(stats.subscribed),
    )
    yield counter_by(
        "llm_proxy_token_invalidation_messages",
        "Token invalidation messages, by direction (received, published, failed).",
        "direction",
        [
            ("received", stats.received),
            ("published", stats.published),
            ("failed", stats.publish_failures),
        ],
    )
    yield CounterMetricFamily(
        "llm_proxy_token_invalidation_reconnects",
        "Times the invalidation subscriber came back after an outage.",
        value=stats.reconnects,
    )


class Metrics:
    """Every metric of one process, in its own registry (tests never collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.live = _LiveState()
        registry.register(self.live)
        # Updated per proxied call by the event consumer: the lock-free kinds.
        self.requests = FastCounter(
            "llm_proxy_requests",
            "Proxied requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.duration = FastHistogram(
            "llm_proxy_request_duration_seconds",
            "End-to-end time of proxied requests.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = FastHistogram(
            "llm_proxy_upstream_duration_seconds",
            "Time from sending upstream to the end of the relayed answer.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pre_upstream = FastHistogram(
            "llm_proxy_pre_upstream_seconds",
            "The proxy's own time before the upstream call (auth, limits, body).",
            [],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = FastHistogram(
            "llm_proxy_time_to_first_byte_seconds",
            "Time to the first body byte sent to the client.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = FastCounter(
            "llm_proxy_tokens",
            "Tokens used, by project, model, kind and usage source.",
            ["project_id", "model", "kind", "source"],
            registry=registry,
        )
        self.model_label = BoundedLabel(MAX_MODEL_LABELS)
        self.policy_refusals = FastCounter(
            "llm_proxy_policy_refusals",
            "Calls refused before the upstream by their token's policy, by code"
            " (model_not_allowed counts the allowlist's model rules too).",
            ["code"],
            registry=registry,
        )
        self.dispatched = Counter(
            "llm_proxy_dispatcher_events",
            "Events a dispatcher handled, by outcome (delivered, dead_lettered).",
            ["service", "outcome"],
            registry=registry,
        )
        self.dispatch_failures = Counter(
            "llm_proxy_dispatcher_failures",
            "Failed delivery attempts, by kind (transient, permanent).",
            ["service", "kind"],
            registry=registry,
        )
        self.dispatcher_lag = Gauge(
            "llm_proxy_dispatcher_lag_seconds",
            "Age of the newest event a dispatcher delivered.",
            ["service"],
            registry=registry,
        )
        self.dispatcher_healthy = Gauge(
            "llm_proxy_dispatcher_healthy",
            "1 when the last delivery attempt succeeded, else 0.",
            ["service"],
            registry=registry,
        )
        self.purge_runs = Counter(
            "llm_proxy_retention_purge_runs",
            "Scheduled retention purges, by outcome (done, partial: stopped at its "
            "time bound, skipped: another process held the lock, failed).",
            ["outcome"],
            registry=registry,
        )
        self.purged_rows = Counter(
            "llm_proxy_retention_purged_rows",
            "Rows deleted by retention purges, by table (tokens, usage_events, "
            "audit_events).",
            ["table"],
            registry=registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


METRICS_KEY: Final = web.AppKey("metrics", Metrics)


def metrics_handler_for(token: str | None) -> Handler:
    """`GET /metrics`, behind `Authorization: Bearer <METRICS_TOKEN>` when set."""
    expected = token.encode() if token else None

    async def metrics_handler(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get(hdrs.AUTHORIZATION)
            if not bearer_matches(given, expected):
                auth_failed(
                    request,
                    surface="metrics",
                    actor="metrics",
                    reason=bearer_refusal(given),
                )
                raise api_error(
                    AuthError(
                        "Metrics need 'Authorization: Bearer <METRICS_TOKEN>'.",
                        code="invalid_metrics_token",
                    )
                )
        body = request.app[METRICS_KEY].render()
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    return metrics_handler
