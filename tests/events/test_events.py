"""Event types, and one bus test suite run against the in-memory and Redis buses."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.events.model import (
    BusStats,
    Event,
    EventBus,
    RateLimitedLog,
    RequestCompleted,
    Subscription,
    decode_event,
    encode_event,
)
from llm_proxy.events.redis_bus import DATA_FIELD, RedisEventBus

from ..support import REDIS_URL, FakeClock, require_redis

TIMEOUT_S = 5.0

MakeBus = Callable[..., Awaitable[EventBus]]


def _event(n: int = 0, **overrides: Any) -> RequestCompleted:
    fields: dict[str, Any] = {
        "request_id": f"req-{n}",
        "project_id": "proj-1",
        "token_id": "tok-1",
        "method": "POST",
        "endpoint": "/v1/chat/completions",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "duration_ms": 12.5,
    }
    return RequestCompleted(**(fields | overrides))


def _ids(batches: list[list[Event]]) -> list[str]:
    return [e.event_id for batch in batches for e in batch]


async def _collect(sub: Subscription) -> list[list[Event]]:
    batches = []
    async for batch in sub:
        batches.append(batch)
        await sub.ack(batch)
    return batches


async def _next(sub: Subscription, *, ack: bool = True) -> list[Event]:
    async with asyncio.timeout(TIMEOUT_S):
        batch = await anext(sub)
    if ack:
        await sub.ack(batch)
    return batch


async def _first_batch(bus: EventBus, name: str) -> list[Event]:
    """Read and ack one batch as consumer of `name`, then leave."""
    sub = bus.subscribe(name)
    try:
        return await _next(sub)
    finally:
        await sub.close()


async def _eventually(check: Callable[[], bool], what: str) -> None:
    """Wait for an outside process (a Redis server) to reach a state."""
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _eventually_async(probe: Callable[[], Awaitable[object]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            await probe()
            return
        except Exception:
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
async def redis_keys() -> AsyncIterator[list[str]]:
    """Stream keys a test used; deleted afterwards."""
    keys: list[str] = []
    yield keys
    if keys:
        client = Redis.from_url(REDIS_URL)
        await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def make_bus(
    backend: str, tmp_path: Path, redis_keys: list[str]
) -> AsyncIterator[MakeBus]:
    """Build started buses of the current backend; all closed after the test."""
    buses: list[EventBus] = []
    if backend == "redis":
        await require_redis()

    async def make(**kwargs: Any) -> EventBus:
        bus: EventBus
        if backend == "memory":
            bus = InMemoryEventBus(**kwargs)
        else:
            key = f"llm-proxy-test:{uuid.uuid4().hex}"
            redis_keys.append(key)
            kwargs.setdefault("block_ms", 50)
            bus = RedisEventBus(
                REDIS_URL, stream_key=key, spool_path=tmp_path / "spool.jsonl", **kwargs
            )
        await bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.fixture
async def bus(make_bus: MakeBus) -> EventBus:
    return await make_bus(flush_interval_s=0.05)


# -- event types -------------------------------------------------------------------


def test_request_completed_round_trips_through_json() -> None:
    event = _event(
        ttfb_ms=3.25,
        stream=True,
        model="gpt-4o",
        usage={"prompt_tokens": 3, "completion_tokens": 5},
        extra={"usage_source": "upstream"},
    )
    assert RequestCompleted.from_json_dict(event.to_json_dict()) == event
    assert decode_event(encode_event(event)) == event
    assert orjson.loads(encode_event(event))["type"] == "request_completed"


def test_request_completed_gets_a_unique_id_and_utc_timestamp() -> None:
    first, second = _event(), _event()
    assert first.event_id != second.event_id
    assert len(first.event_id) == 32 and int(first.event_id, 16) >= 0
    assert first.timestamp.endswith("Z")
    assert datetime.fromisoformat(first.timestamp).utcoffset() is not None


def test_decode_event_keeps_unknown_fields_in_extra() -> None:
    data = _event(extra={"a": 1}).to_json_dict() | {"usage_source": "estimated"}
    event = decode_event(orjson.dumps(data))
    assert event.extra == {"usage_source": "estimated", "a": 1}


@pytest.mark.parametrize(
    "payload",
    [b"[1]", b'{"type": "nope"}', b'{"type": "request_completed"}', b"not json"],
)
def test_decode_event_rejects_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_event(payload)


def test_encode_event_serialises_nested_mappings() -> None:
    from types import MappingProxyType

    event = _event(extra={"nested": MappingProxyType({"k": "v"})})
    assert orjson.loads(encode_event(event))["extra"] == {"nested": {"k": "v"}}
    with pytest.raises(TypeError):
        encode_event(_event(extra={"bad": object()}))


def test_bus_stats_total_adds_every_stage() -> None:
    stats = BusStats(dropped={"a": 2, "b": 3}, buffer_dropped=4)
    assert stats.dropped_total == 9


def test_rate_limited_log_warns_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(100.0)
    limited = RateLimitedLog(logging.getLogger("test"), 10.0, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            limited.warning("dropped %s", "x")
        clock.advance(10.0)
        limited.warning("dropped %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "dropped x (0 similar suppressed)",
        "dropped y (49 similar suppressed)",
    ]


@pytest.mark.parametrize("kwargs", [{"buffer_size": 0}, {"flush_interval_s": 0}])
def test_buses_reject_nonsense_sizes(kwargs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        InMemoryEventBus(**kwargs)
    with pytest.raises(ValueError):
        RedisEventBus(REDIS_URL, spool_path=tmp_path / "s.jsonl", **kwargs)


# -- the shared bus suite ------------------------------------------------------------


async def test_bus_fans_out_every_event_to_each_subscriber(bus: EventBus) -> None:
    tasks = [asyncio.create_task(_collect(bus.subscribe(n))) for n in ("a", "b")]
    events = [_event(i) for i in range(30)]
    for event in events:
        bus.publish(event)
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
        results = await asyncio.gather(*tasks)
    for batches in results:
        assert _ids(batches) == [e.event_id for e in events]
    assert bus.stats.published == 30
    assert bus.stats.delivered == 60


async def test_bus_yields_a_batch_as_soon_as_it_is_full(make_bus: MakeBus) -> None:
    bus = await make_bus(batch_size=10, flush_interval_s=60)
    sub = bus.subscribe("a")
    for i in range(25):
        bus.publish(_event(i))
    assert [len(await _next(sub)) for _ in range(2)] == [10, 10]
    rest = asyncio.create_task(_collect(sub))
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
        assert [len(batch) for batch in await rest] == [5]


async def test_bus_yields_a_partial_batch_after_the_flush_interval(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus(batch_size=100, flush_interval_s=0.1)
    sub = bus.subscribe("a")
    for i in range(3):
        bus.publish(_event(i))
    started = time.monotonic()
    batch = await _next(sub)
    assert len(batch) == 3
    assert time.monotonic() - started >= 0.09
    await sub.close()


async def test_bus_publish_drops_and_counts_when_a_subscriber_stalls(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus(buffer_size=100)
    task = asyncio.create_task(_collect(bus.subscribe("stalled", max_queue=100)))
    events = [_event(i) for i in range(10_000)]
    started = time.monotonic()
    for event in events:  # no await: the consumer cannot run, it is stalled
        bus.publish(event)
    assert time.monotonic() - started < 1.0
    stats = bus.stats
    assert (stats.published, stats.dropped_total) == (10_000, 9_900)
    assert stats.buffered <= 100
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
        kept = _ids(await task)
    assert kept == [e.event_id for e in events[:100]]


async def test_bus_close_drains_everything_published_before_it(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus(batch_size=100, flush_interval_s=60)
    task = asyncio.create_task(_collect(bus.subscribe("a")))
    events = [_event(i) for i in range(250)]
    for event in events:
        bus.publish(event)
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
        batches = await task
    assert _ids(batches) == [e.event_id for e in events]
    assert [len(b) for b in batches] == [100, 100, 50]


async def test_bus_counts_events_published_without_subscribers(bus: EventBus) -> None:
    for i in range(5):
        bus.publish(_event(i))
    assert bus.stats.published == 5
    assert bus.stats.dropped_total == 0


async def test_bus_drops_and_counts_events_published_after_close(
    bus: EventBus,
) -> None:
    await bus.close()
    bus.publish(_event())
    assert bus.stats.buffer_dropped == 1
    assert bus.stats.published == 0
    with pytest.raises(RuntimeError, match="closed"):
        bus.subscribe("late")
    await bus.close()  # idempotent


async def test_subscription_close_ends_its_iteration(bus: EventBus) -> None:
    sub = bus.subscribe("a")
    assert sub.name == "a"
    task = asyncio.create_task(_collect(sub))
    await asyncio.sleep(0.01)
    await sub.close()
    await sub.close()
    async with asyncio.timeout(TIMEOUT_S):
        assert await task == []


async def test_bus_consumers_sharing_a_name_split_the_events(bus: EventBus) -> None:
    tasks = [asyncio.create_task(_collect(bus.subscribe("shared"))) for _ in range(2)]
    events = [_event(i) for i in range(50)]
    for event in events:
        bus.publish(event)
        await asyncio.sleep(0)
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
        first, second = (set(_ids(b)) for b in await asyncio.gather(*tasks))
    assert first | second == {e.event_id for e in events}
    assert not first & second


# -- in-memory specifics --------------------------------------------------------------


async def test_memory_bus_forgets_a_group_when_its_last_consumer_leaves() -> None:
    bus = InMemoryEventBus()
    sub = bus.subscribe("a", max_queue=1)
    bus.publish(_event(1))
    bus.publish(_event(2))
    await sub.close()
    bus.publish(_event(3))
    assert bus.stats.dropped == {"a": 1}
    assert bus.stats.buffered == 0
    await bus.close()


# -- Redis specifics ------------------------------------------------------------------


@pytest.fixture
async def redis_stream(redis_keys: list[str]) -> str:
    await require_redis()
    key = f"llm-proxy-test:{uuid.uuid4().hex}"
    redis_keys.append(key)
    return key


@pytest.fixture
async def make_redis_bus(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[RedisEventBus]]]:
    buses: list[RedisEventBus] = []

    async def make(url: str = REDIS_URL, **kwargs: Any) -> RedisEventBus:
        kwargs.setdefault("spool_path", tmp_path / "spool.jsonl")
        kwargs.setdefault("block_ms", 20)
        kwargs.setdefault("flush_interval_s", 0.05)
        bus = RedisEventBus(url, **kwargs)
        await bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


async def _pending(stream: str, group: str) -> int:
    client = Redis.from_url(REDIS_URL)
    try:
        summary = await client.xpending(stream, group)
        count: int = summary["pending"]
        return count
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_bus_redelivers_what_a_dead_consumer_left_unacked(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]], redis_stream: str
) -> None:
    opts: dict[str, Any] = {"stream_key": redis_stream, "claim_idle_ms": 100}
    first = await make_redis_bus(consumer_name="c1", **opts)
    second = await make_redis_bus(consumer_name="c2", **opts)
    events = [_event(i) for i in range(5)]
    for event in events:
        first.publish(event)
    doomed = first.subscribe("dispatcher")
    taken = await _next(doomed, ack=False)
    await doomed.close()  # dies without ack
    assert await _pending(redis_stream, "dispatcher") == 5

    survivor = second.subscribe("dispatcher")
    redelivered = await _next(survivor)
    assert [e.event_id for e in redelivered] == [e.event_id for e in taken]
    assert await _pending(redis_stream, "dispatcher") == 0
    await survivor.close()


@pytest.mark.redis
async def test_redis_bus_restarted_consumer_gets_its_own_pending_entries(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]], redis_stream: str
) -> None:
    opts: dict[str, Any] = {"stream_key": redis_stream, "consumer_name": "c1"}
    before = await make_redis_bus(**opts)
    event = _event()
    before.publish(event)
    dying = before.subscribe("g")
    taken = await _next(dying, ack=False)
    await dying.close()  # the process ends without acking
    await before.close()

    after = await make_redis_bus(**opts)  # claim_idle_ms is still a minute away
    again = await _first_batch(after, "g")
    assert [e.event_id for e in again] == [e.event_id for e in taken]


@pytest.mark.redis
async def test_redis_bus_acks_undecodable_entries_and_goes_on(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]], redis_stream: str
) -> None:
    bus = await make_redis_bus(stream_key=redis_stream)
    client = Redis.from_url(REDIS_URL)
    await client.xadd(redis_stream, {DATA_FIELD: b"garbage"})
    await client.aclose()
    event = _event()
    bus.publish(event)
    sub = bus.subscribe("g")
    batch = await _next(sub)
    assert [e.event_id for e in batch] == [event.event_id]
    await sub.ack(batch)  # already acked: nothing to do
    assert await _pending(redis_stream, "g") == 0
    await sub.close()


@pytest.mark.redis
async def test_redis_bus_drops_an_unserialisable_event_without_raising(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]],
    redis_stream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await make_redis_bus(stream_key=redis_stream)
    bus.publish(_event(extra={"bad": object()}))
    good = _event()
    bus.publish(good)
    batch = await _first_batch(bus, "g")
    assert [e.event_id for e in batch] == [good.event_id]
    assert bus.stats.buffer_dropped == 1
    assert "cannot serialise event" in caplog.text


@pytest.mark.redis
async def test_redis_bus_close_writes_what_was_published_before_start(
    tmp_path: Path, redis_stream: str
) -> None:
    bus = RedisEventBus(REDIS_URL, stream_key=redis_stream, spool_path=tmp_path / "s")
    bus.publish(_event())
    await bus.close()
    client = Redis.from_url(REDIS_URL)
    assert await client.xlen(redis_stream) == 1
    await client.aclose()


class SpareRedis:
    """A second real redis-server on a free port that a test starts and stops."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            await _eventually_async(client.ping, "redis-server to start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            await self._proc.wait()
            self._proc = None


@pytest.fixture
async def spare_redis() -> AsyncIterator[SpareRedis]:
    if shutil.which("redis-server") is None:
        reason = "redis-server is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = SpareRedis()
    yield server
    await server.stop()


@pytest.mark.redis
async def test_redis_bus_spools_while_redis_is_down_and_replays_when_it_returns(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]],
    spare_redis: SpareRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool = tmp_path / "down.jsonl"
    bus = await make_redis_bus(
        spare_redis.url, spool_path=spool, retry_interval_s=0.05, timeout_s=1.0
    )
    sub = bus.subscribe("g")
    reader = asyncio.create_task(anext(sub))  # keeps retrying through the outage
    events = [_event(i) for i in range(10)]
    for event in events:
        bus.publish(event)
    await _eventually(lambda: bus.stats.spooled == 10, "the spool")
    lines = spool.read_bytes().splitlines()
    assert [decode_event(line) for line in lines] == events
    bus.publish(extra := _event(10))  # Redis still down: queued behind the spool
    events.append(extra)

    await spare_redis.start()
    await _eventually(lambda: not spool.exists(), "the replay")
    assert bus.stats.spooled == 0
    async with asyncio.timeout(TIMEOUT_S):
        batches = [await reader]
        while len(_ids(batches)) < len(events):
            batches.append(await anext(sub))
    assert _ids(batches) == [e.event_id for e in events]
    assert "reading g failed" in caplog.text

    await spare_redis.stop()  # an ack that cannot reach Redis is logged, not raised
    for batch in batches:
        await sub.ack(batch)
    assert "entries will be redelivered" in caplog.text
    await sub.close()


@pytest.mark.redis
async def test_redis_bus_replays_a_spool_left_by_an_earlier_run(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]],
    spare_redis: SpareRedis,
    tmp_path: Path,
) -> None:
    spool = tmp_path / "left.jsonl"
    down = await make_redis_bus(spare_redis.url, spool_path=spool, timeout_s=1.0)
    event = _event()
    down.publish(event)
    await down.close()  # Redis never answered: the event waits in the spool
    with spool.open("ab") as f:
        f.write(b'{"cut short by a cra')

    await spare_redis.start()
    up = await make_redis_bus(spare_redis.url, spool_path=spool, retry_interval_s=0.05)
    await _eventually(lambda: not spool.exists(), "the replay")
    assert [e.event_id for e in await _first_batch(up, "g")] == [event.event_id]


@pytest.mark.redis
async def test_redis_bus_counts_events_it_can_neither_send_nor_spool(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]],
    spare_redis: SpareRedis,
    tmp_path: Path,
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    bus = await make_redis_bus(
        spare_redis.url, spool_path=not_a_dir / "spool.jsonl", timeout_s=1.0
    )
    bus.publish(_event())  # Redis is down and the spool cannot be created
    await _eventually(lambda: bus.stats.buffer_dropped == 1, "the drop")
    assert bus.stats.spooled == 0


@pytest.mark.redis
async def test_redis_bus_close_stops_waiting_for_a_stalled_subscriber(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]],
    redis_stream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await make_redis_bus(stream_key=redis_stream, drain_timeout_s=0.1)
    bus.publish(_event())
    sub = bus.subscribe("g")
    await _next(sub, ack=False)  # holds its batch and never comes back
    async with asyncio.timeout(TIMEOUT_S):
        await bus.close()
    assert "did not drain" in caplog.text
    assert await _pending(redis_stream, "g") == 1  # still there for the next run


@pytest.mark.redis
async def test_redis_bus_does_not_reclaim_a_batch_its_consumer_still_holds(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]], redis_stream: str
) -> None:
    bus = await make_redis_bus(stream_key=redis_stream, claim_idle_ms=30)
    sub = bus.subscribe("g")
    bus.publish(_event(1))
    held = await _next(sub, ack=False)
    await asyncio.sleep(0.1)  # held entries are now idle longer than claim_idle_ms
    bus.publish(later := _event(2))
    assert [e.event_id for e in await _next(sub)] == [later.event_id]
    await sub.ack(held)
    await sub.close()


@pytest.mark.redis
async def test_redis_subscription_recreates_its_group_when_the_stream_is_deleted(
    make_redis_bus: Callable[..., Awaitable[RedisEventBus]], redis_stream: str
) -> None:
    bus = await make_redis_bus(stream_key=redis_stream, retry_interval_s=0.01)
    sub = bus.subscribe("g")
    assert sub.name == "g"
    bus.publish(_event(1))
    await _next(sub)
    client = Redis.from_url(REDIS_URL)
    await client.delete(redis_stream)
    await client.aclose()
    bus.publish(after := _event(2))
    assert [e.event_id for e in await _next(sub)] == [after.event_id]
    await sub.close()


def test_to_json_dict_copies_mappings_and_keeps_malformed_values() -> None:
    """A producer's odd `usage` (not an object) is carried, not a consumer crash."""
    usage = {"prompt_tokens": 1}
    event = _event(usage=usage)
    data = event.to_json_dict()
    assert data["usage"] == usage and data["usage"] is not usage
    odd = decode_event(orjson.dumps(data | {"usage": [1, 2]}))
    assert odd.to_json_dict()["usage"] == [1, 2]


def test_file_record_of_an_event_with_a_malformed_usage() -> None:
    from llm_proxy.dispatchers.records import event_record

    odd = decode_event(orjson.dumps(_event().to_json_dict() | {"usage": "n/a"}))
    record = event_record(odd)
    assert record["usage"] == "n/a"
    assert record["metadata"]["prompt_tokens"] is None


def test_usage_row_of_an_event_with_a_malformed_usage() -> None:
    from llm_proxy.dispatchers.usage import usage_row

    odd = decode_event(orjson.dumps(_event().to_json_dict() | {"usage": [3]}))
    row = usage_row(odd)
    assert (row.prompt_tokens, row.total_tokens) == (None, None)
    assert row.event_id == odd.event_id


def test_helicone_and_lunary_payloads_of_an_event_with_a_malformed_usage() -> None:
    from llm_proxy.dispatchers.helicone import helicone_log
    from llm_proxy.dispatchers.lunary import lunary_runs

    odd = decode_event(orjson.dumps(_event().to_json_dict() | {"usage": "n/a"}))
    assert "usage" not in orjson.dumps(helicone_log(odd, 1.0)).decode()
    assert all("tokensUsage" not in run for run in lunary_runs(odd))


@pytest.mark.redis
async def test_event_stream_maxlen_setting_bounds_the_redis_stream(
    redis_stream: str, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    from llm_proxy.config import Settings
    from llm_proxy.events.lifecycle import create_event_bus

    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": "0123456789abcdef",
            "LLM_PROXY_EVENT_BUS": "redis",
            "REDIS_URL": REDIS_URL,
            "EVENT_STREAM_KEY": redis_stream,
            "EVENT_STREAM_MAXLEN": "10",
            "EVENT_SPOOL_PATH": str(tmp_path / "spool.jsonl"),
            "EVENT_FLUSH_INTERVAL": "0.01",
        }
    )
    bus = create_event_bus(settings)
    await bus.start()
    for n in range(1000):
        bus.publish(_event(n))
    await bus.close()
    client = Redis.from_url(REDIS_URL)
    try:
        length = await client.xlen(redis_stream)
    finally:
        await client.aclose()
    # Trimming is approximate (whole stream nodes of 100 entries), never unbounded.
    assert 0 < length <= 200
