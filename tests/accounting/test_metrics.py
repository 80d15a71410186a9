"""`GET /metrics`: Prometheus text, per-app registry, optional bearer protection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from llm_proxy.accounting.instrumentation import INSTRUMENTATION_KEY
from llm_proxy.accounting.metrics import OTHER, BoundedLabel, FastCounter, FastHistogram

from ..support import bearer, proxy_token

Client = TestClient[Any, Any]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def scrape(client: Client, headers: dict[str, str] | None = None) -> str:
    response = await client.get("/metrics", headers=headers or {})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def settle(client: Client, count: int) -> None:
    """Wait until the instrumentation has processed `count` calls."""
    instrumentation = client.app[INSTRUMENTATION_KEY]
    async with asyncio.timeout(5):
        while True:
            if instrumentation.processed >= count:
                return
            await asyncio.sleep(0.01)


async def test_metrics_count_requests_latency_tokens_and_events(proxy: Client) -> None:
    project_id, token = await proxy_token(proxy)
    await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    await proxy.get("/v1/models")
    await settle(proxy, 2)
    text = await scrape(proxy)
    expected = (
        'llm_proxy_requests_total{endpoint="/v1/chat/completions",method="POST",'
        'status="200"} 1.0',
        'llm_proxy_requests_total{endpoint="/v1/models",method="GET",status="401"} 1.0',
        'llm_proxy_tokens_total{kind="prompt",model="gpt-4o-mini",'
        f'project_id="{project_id}",source="upstream"}} 11.0',
        'llm_proxy_tokens_total{kind="reasoning",model="gpt-4o-mini",'
        f'project_id="{project_id}",source="upstream"}} 128.0',
        "llm_proxy_events_published_total 2.0",
        'llm_proxy_events_dropped_total{stage="accounting"} 0.0',
        "llm_proxy_breaker_state 0.0",
        "llm_proxy_in_flight_requests 0.0",
        'llm_proxy_upstream_duration_seconds_count{endpoint="/v1/chat/completions"} 1.0',
        "llm_proxy_pre_upstream_seconds_count 1.0",
    )
    for line in expected:
        assert line in text, line
    assert "llm_proxy_request_duration_seconds_bucket" in text
    assert token not in text


async def test_the_whole_scrape_parses_as_prometheus_text(proxy: Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, token = await proxy_token(proxy)
    await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    await settle(proxy, 1)
    families = {f.name: f for f in text_string_to_metric_families(await scrape(proxy))}
    assert families["llm_proxy_requests"].type == "counter"
    duration = families["llm_proxy_request_duration_seconds"]
    assert duration.type == "histogram"
    assert {s.name for s in duration.samples} == {
        "llm_proxy_request_duration_seconds_bucket",
        "llm_proxy_request_duration_seconds_count",
        "llm_proxy_request_duration_seconds_sum",
    }
    dropped = families["llm_proxy_events_dropped"].samples
    assert {s.labels["stage"] for s in dropped} >= {"accounting", "bus_buffer"}


async def test_each_app_has_its_own_registry(start_proxy: Callable[..., Any]) -> None:
    first: Client = await start_proxy()
    second: Client = await start_proxy()
    await first.get("/v1/models")
    await settle(first, 1)
    assert 'status="401"} 1.0' in await scrape(first)
    assert 'status="401"}' not in await scrape(second)


async def test_metrics_token_protects_the_endpoint(
    start_proxy: Callable[..., Any],
) -> None:
    client: Client = await start_proxy(METRICS_TOKEN="metrics-secret-123")
    refused = await client.get("/metrics")
    assert refused.status == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
    wrong = await client.get("/metrics", headers=bearer("nope"))
    assert wrong.status == 401
    assert "llm_proxy_in_flight_requests" in await scrape(
        client, bearer("metrics-secret-123")
    )


async def test_metrics_token_scheme_is_matched_in_any_case(
    start_proxy: Callable[..., Any],
) -> None:
    """RFC 7235: the scheme is case-insensitive, as on /v1 and /manage."""
    client: Client = await start_proxy(METRICS_TOKEN="metrics-secret-123")
    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} metrics-secret-123"}
        assert "llm_proxy_in_flight_requests" in await scrape(client, headers)
    wrong = await client.get("/metrics", headers={"Authorization": "bearer nope"})
    assert wrong.status == 401


def test_fast_histogram_matches_prometheus_bucket_semantics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    histogram = FastHistogram(
        "demo_seconds", "Demo.", ["endpoint"], buckets=(0.1, 1.0), registry=registry
    )
    child = histogram.labels("/v1/a")
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):  # a bound itself falls in its bucket
        child.observe(value)
    assert histogram.labels("/v1/a") is child
    text = generate_latest(registry).decode()
    assert 'demo_seconds_bucket{endpoint="/v1/a",le="0.1"} 2.0' in text
    assert 'demo_seconds_bucket{endpoint="/v1/a",le="1.0"} 4.0' in text
    assert 'demo_seconds_bucket{endpoint="/v1/a",le="+Inf"} 5.0' in text
    assert 'demo_seconds_count{endpoint="/v1/a"} 5.0' in text
    assert 'demo_seconds_sum{endpoint="/v1/a"} 4.65' in text


def test_fast_histogram_without_labels_and_fast_counter() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    plain = FastHistogram(
        "plain_seconds", "Plain.", [], buckets=(1.0,), registry=registry
    )
    plain.observe(0.5)
    counter = FastCounter("demo", "Demo.", ["kind"], registry=registry)
    counter.labels("a").inc()
    counter.labels("a").inc(41)
    text = generate_latest(registry).decode()
    assert 'plain_seconds_bucket{le="1.0"} 1.0' in text
    assert 'demo_total{kind="a"} 42.0' in text
    assert "# TYPE demo_total counter" in text


def test_bounded_label_keeps_named_values_outside_its_limit() -> None:
    label = BoundedLabel(2)
    assert [label(value) for value in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert label("named", ("named",)) == "named"  # named: no slot needed
    assert label("c", ("named",)) == OTHER
    assert label("named") == OTHER  # without its name in the config it is junk


def test_labelled_counters_of_the_scrape_time_collectors() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from llm_proxy.accounting.fleet_metrics import FleetLimitsCollector
    from llm_proxy.accounting.metrics import counter_by
    from llm_proxy.proxy.fleet_limits import FleetStats

    registry = CollectorRegistry()
    stats = FleetStats(lease_calls=3, releases=2, lease_failures=1)
    registry.register(FleetLimitsCollector(lambda: stats))
    text = generate_latest(registry).decode()
    assert 'llm_proxy_fleet_lease_calls_total{outcome="granted"} 3.0' in text
    assert 'llm_proxy_fleet_lease_calls_total{outcome="released"} 2.0' in text
    assert 'llm_proxy_fleet_lease_calls_total{outcome="failed"} 1.0' in text
    family = counter_by("demo", "Demo.", "kind", [("a", 1), ("b", 2.5)])
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("demo_total", {"kind": "a"}, 1.0),
        ("demo_total", {"kind": "b"}, 2.5),
    ]
