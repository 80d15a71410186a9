"""The Redis Streams event bus: batched background XADD, consumer groups, a local spool.

`publish()` only appends to a bounded in-process buffer. A writer task XADDs it in
pipelined batches, and while Redis is unreachable it appends to a JSONL spool file
that it replays when Redis answers again. Subscribers read through consumer groups
(one group per backend is fan-out; several consumers of one group share the load)
with at-least-once delivery: an entry leaves the group's pending list only when
`ack()` is called, and entries left pending by a dead consumer are re-claimed with
XAUTOCLAIM. Events carry `event_id`, so consumers deduplicate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..private_files import open_private_append
from .model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_DROP_LOG_INTERVAL_S,
    DEFAULT_FLUSH_INTERVAL_S,
    BusStats,
    Event,
    RateLimitedLog,
    check_bus_sizes,
    decode_event,
    encode_event,
)

log = logging.getLogger(__name__)

DEFAULT_STREAM_KEY: Final = "llm-proxy:events"
DATA_FIELD: Final = b"data"
# Every failure that means "Redis cannot take this now": keep the events, retry later.
_REDIS_DOWN: Final = (RedisError, OSError)
_Entries = list[tuple[bytes, dict[bytes, bytes] | None]]


class _Spool:
    """Append-only JSONL file of encoded events waiting for Redis.

    Methods are blocking and run in a worker thread; only the writer task calls
    them, so they need no lock. `offset` is how far the file has been replayed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def count(self) -> int:
        """Count complete lines, first ending a line a crash may have cut short."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("ab") as f:
                f.write(b"\n")
        return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append one line per payload and fsync, so a crash keeps them."""
        with open_private_append(self.path) as f:  # 0600: it holds whole events
            f.write(b"".join(p + b"\n" for p in payloads))
            f.flush()
            os.fsync(f.fileno())

    def read(self, max_lines: int) -> tuple[list[bytes], int, int]:
        """Return (valid payloads, lines consumed, new offset) from `offset` on."""
        payloads: list[bytes] = []
        consumed = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            end = self.offset
            while consumed < max_lines:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                consumed += 1
                end += len(line)
                if _is_json_object(line):
                    payloads.append(line.rstrip(b"\n"))
                else:
                    log.warning("skipping a corrupt line in spool %s", self.path)
        return payloads, consumed, end

    def truncate(self) -> None:
        """Remove the spool once everything in it reached Redis."""
        self.path.unlink(missing_ok=True)
        self.offset = 0


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


class _RedisSubscription:
    """One consumer of consumer group `name`: yields batches, XACKs on `ack()`."""

    def __init__(self, bus: RedisEventBus, name: str, consumer: str) -> None:
        self._bus = bus
        self._name = name
        self.consumer = consumer
        self._group_ready = False
        self._own_cursor: bytes | None = b"0"  # own pending entries, read once
        self._claim_cursor: bytes = b"0-0"
        self._next_claim_at = 0.0
        self._unacked: dict[str, list[bytes]] = {}
        self._in_flight: set[bytes] = set()
        self._stop = asyncio.Event()
        self.started = False
        self.finished = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    def __aiter__(self) -> _RedisSubscription:
        return self

    async def __anext__(self) -> list[Event]:
        self.started = True
        batch = await self._next_batch() if not self._stop.is_set() else []
        if batch:
            self._bus.delivered += len(batch)
            return batch
        self.finished.set()
        raise StopAsyncIteration

    async def _next_batch(self) -> list[Event]:
        """Collect up to batch_size events; [] means iteration is over."""
        bus = self._bus
        loop = asyncio.get_running_loop()
        batch: list[Event] = []
        deadline: float | None = None
        while not self._stop.is_set():
            if deadline is not None and loop.time() >= deadline:
                return batch
            try:
                await self._ensure_group()
                if not batch:
                    batch = await self._recover()
                    if batch:
                        return batch
                draining = bus.draining
                block = self._block_ms(loop.time(), deadline, draining)
                count = bus.batch_size - len(batch)
                entries = await self._read(b">", count, block)
                batch += await self._accept(entries)
            except _REDIS_DOWN as exc:
                if batch or bus.draining or self._stop.is_set():
                    return batch
                self._on_error(exc)
                await self._pause(bus.retry_interval_s)
                continue
            if len(batch) >= bus.batch_size or (draining and not entries):
                return batch
            if batch and deadline is None:
                deadline = loop.time() + bus.flush_interval_s
        return batch

    def _block_ms(
        self, now: float, deadline: float | None, draining: bool
    ) -> int | None:
        """How long XREADGROUP may block: never while draining, else bounded."""
        if draining:
            return None
        until = self._next_claim_at if deadline is None else deadline
        return max(1, min(self._bus.block_ms, int((until - now) * 1000)))

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._bus.redis.xgroup_create(
                self._bus.stream_key, self._name, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _recover(self) -> list[Event]:
        """Deliver our own pending entries (a restart), then idle ones of others."""
        bus = self._bus
        if self._own_cursor is not None:
            entries = await self._read(self._own_cursor, bus.batch_size, None)
            self._own_cursor = entries[-1][0] if entries else None
            return await self._accept(entries)
        now = asyncio.get_running_loop().time()
        if now < self._next_claim_at:
            return []
        cursor, entries, *_ = await bus.redis.xautoclaim(
            bus.stream_key,
            self._name,
            self.consumer,
            min_idle_time=bus.claim_idle_ms,
            start_id=self._claim_cursor,
            count=bus.batch_size,
        )
        self._claim_cursor = cursor
        if cursor == b"0-0":  # scan finished: look again after another idle period
            self._next_claim_at = now + bus.claim_idle_ms / 1000
        if entries:
            log.info("claimed %d idle entries for %s", len(entries), self._name)
        return await self._accept(entries)

    async def _read(self, cursor: bytes, count: int, block: int | None) -> _Entries:
        bus = self._bus
        reply: Any = await bus.redis.xreadgroup(
            self._name,
            self.consumer,
            {bus.stream_key: cursor},
            count=count,
            block=block,
        )
        if not reply:
            return []
        entries: _Entries = reply[0][1]
        return entries

    async def _accept(self, entries: _Entries) -> list[Event]:
        """Decode entries, remember their ids for `ack()`; XACK undecodable ones."""
        events: list[Event] = []
        poison: list[bytes] = []
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue  # re-claimed from ourselves while still being handled
            try:
                event = decode_event((fields or {}).get(DATA_FIELD, b""))
            except ValueError:
                log.warning("acking undecodable entry %s in %s", entry_id, self._name)
                poison.append(entry_id)
                continue
            self._unacked.setdefault(event.event_id, []).append(entry_id)
            self._in_flight.add(entry_id)
            events.append(event)
        if poison:
            await self._xack(poison)
        return events

    async def ack(self, batch: Sequence[Event]) -> None:
        """XACK the entries behind `batch`; if Redis is down they are redelivered."""
        ids = [i for e in batch for i in self._unacked.pop(e.event_id, ())]
        if ids:
            self._in_flight.difference_update(ids)
            await self._xack(ids)

    async def _xack(self, ids: list[bytes]) -> None:
        try:
            await self._bus.redis.xack(self._bus.stream_key, self._name, *ids)
        except _REDIS_DOWN as exc:
            log.warning(
                "XACK failed for %s (%s); entries will be redelivered", self._name, exc
            )

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            self._group_ready = False
        self._bus.error_log.warning("reading %s failed: %s", self._name, exc)

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def close(self) -> None:
        self._stop.set()
        self.finished.set()
        self._bus.forget(self)


class RedisEventBus:
    """Event bus on a Redis stream; see the module docstring for the guarantees.

    `maxlen=None` (the default) never trims the stream, so no undelivered event is
    trimmed away; trim with XTRIM MINID from operations, or set `maxlen` to a large
    approximate cap knowing that a group lagging further behind loses events.
    `max_queue` in `subscribe()` is ignored: the stream is the queue.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        spool_path: Path,
        stream_key: str = DEFAULT_STREAM_KEY,
        maxlen: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        consumer_name: str | None = None,
        retry_interval_s: float = 1.0,
        timeout_s: float = 5.0,
        drain_timeout_s: float = 5.0,
        drop_log_interval_s: float = DEFAULT_DROP_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_bus_sizes(buffer_size, batch_size, flush_interval_s)
        self.stream_key = stream_key
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.retry_interval_s = retry_interval_s
        self._maxlen = maxlen
        self._buffer_size = buffer_size
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        # One quick reconnect covers a pooled connection that Redis closed; anything
        # longer is the spool's job, so the writer never stalls in redis-py retries.
        self.redis: Redis = Redis.from_url(
            redis_url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s + block_ms / 1000,
            retry=Retry(NoBackoff(), 1),
        )
        self._spool = _Spool(spool_path)
        self._buffer: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._subs: set[_RedisSubscription] = set()
        self._consumers: dict[str, int] = {}
        self._closed = False
        self._down = False
        self._retry_at = 0.0
        self.draining = False
        self.drop_log = RateLimitedLog(log, drop_log_interval_s, clock)
        self.error_log = RateLimitedLog(log, drop_log_interval_s, clock)
        self.published = 0
        self.delivered = 0
        self._buffer_dropped = 0
        self._spooled = 0

    # -- producer side -------------------------------------------------------------

    def publish(self, event: Event) -> None:
        if self._closed:
            self._buffer_dropped += 1
            self.drop_log.warning("event bus is closed; dropped %s", event.event_id)
            return
        self.published += 1
        if len(self._buffer) >= self._buffer_size:
            self._buffer_dropped += 1
            self.drop_log.warning(
                "Redis publish buffer is full (%d events); dropping events",
                self._buffer_size,
            )
            return
        self._buffer.append(event)
        if len(self._buffer) == 1:
            self._wakeup.set()

    async def start(self) -> None:
        """Start the writer task, which first replays any spool a past run left."""
        if self._writer is not None:
            return
        self._spooled = await asyncio.to_thread(self._spool.count)
        if self._spooled:
            log.info(
                "%d spooled events to replay from %s", self._spooled, self._spool.path
            )
        self._writer = asyncio.create_task(self._run_writer(), name="redis-bus-writer")

    async def _run_writer(self) -> None:
        while True:
            await self._wait_for_work()
            try:
                if self._spooled and self._clock() >= self._retry_at:
                    await self._replay_spool()
                if self._buffer:
                    await self._write(self._take())
                elif self._closed:
                    return
            except Exception:
                log.exception("event bus writer failed; retrying")
                await asyncio.sleep(self.retry_interval_s)

    async def _wait_for_work(self) -> None:
        if self._buffer or self._closed:
            return
        self._wakeup.clear()
        timeout = None
        if self._spooled:
            timeout = max(0.0, self._retry_at - self._clock())
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _take(self) -> list[Event]:
        count = min(self.batch_size, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    def _encode(self, batch: list[Event]) -> list[bytes]:
        payloads: list[bytes] = []
        for event in batch:
            try:
                payloads.append(encode_event(event))
            except TypeError:
                self._buffer_dropped += 1
                log.exception("cannot serialise event %s; dropped", event.event_id)
        return payloads

    async def _write(self, batch: list[Event]) -> None:
        """XADD a batch; while Redis is down (or a spool is pending) spool it."""
        payloads = self._encode(batch)
        if not self._spooled and self._clock() >= self._retry_at:
            try:
                await self._xadd(payloads)
                return
            except _REDIS_DOWN as exc:
                self._mark_down(exc)
        await self._append_spool(payloads)

    async def _xadd(self, payloads: Sequence[bytes]) -> None:
        # A pipeline cut mid-way may have added some entries already; spooling the
        # whole batch then duplicates them, which event_id deduplication absorbs.
        async with self.redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.xadd(
                    self.stream_key,
                    {DATA_FIELD: payload},
                    maxlen=self._maxlen,
                    approximate=True,
                )
            await pipe.execute()
        if self._down:
            self._down = False
            log.info("Redis is reachable again at stream %s", self.stream_key)

    def _mark_down(self, exc: BaseException) -> None:
        self._retry_at = self._clock() + self.retry_interval_s
        if not self._down:
            self._down = True
            log.warning(
                "Redis unreachable (%s); spooling events to %s", exc, self._spool.path
            )

    async def _append_spool(self, payloads: list[bytes]) -> None:
        try:
            await asyncio.to_thread(self._spool.append, payloads)
        except OSError:
            self._buffer_dropped += len(payloads)
            log.exception("cannot spool %d events; dropped", len(payloads))
            return
        self._spooled += len(payloads)

    async def _replay_spool(self) -> None:
        """XADD the spool chunk by chunk from its offset, then delete it."""
        spool = self._spool
        while True:
            if self._buffer:  # keep order: newer events queue behind the spool
                await self._append_spool(self._encode(self._take()))
            payloads, consumed, end = await asyncio.to_thread(
                spool.read, self.batch_size
            )
            if not consumed:
                break
            try:
                if payloads:
                    await self._xadd(payloads)
            except _REDIS_DOWN as exc:
                self._mark_down(exc)
                return
            spool.offset = end
            self._spooled = max(0, self._spooled - consumed)
        await asyncio.to_thread(spool.truncate)
        self._spooled = 0
        log.info("replayed the event spool %s into Redis", spool.path)

    # -- consumer side -------------------------------------------------------------

    def subscribe(
        self, name: str, *, max_queue: int | None = None
    ) -> _RedisSubscription:
        if self._closed:
            raise RuntimeError("subscribe() after close(): the event bus is closed")
        # A second consumer of one group in this process needs its own name, or it
        # would read the first one's pending entries as its own.
        n = self._consumers[name] = self._consumers.get(name, 0) + 1
        consumer = self.consumer_name if n == 1 else f"{self.consumer_name}-{n}"
        sub = _RedisSubscription(self, name, consumer)
        self._subs.add(sub)
        return sub

    def forget(self, sub: _RedisSubscription) -> None:
        """Drop a closed subscription from the set `close()` waits for."""
        self._subs.discard(sub)

    async def close(self) -> None:
        """Flush, let subscribers drain, then close the Redis connections.

        Buffered events are written (or spooled if Redis is down). Subscriptions
        that have begun iterating then read the stream without blocking until it
        has nothing new for their group, so they receive everything published
        before close(). close() waits for them to reach that end or to be closed
        (`Subscription.close()` is how a consumer leaves early), at most
        `drain_timeout_s`. Nothing is lost either way: what was not read or acked
        stays in Redis for the group's next consumer.
        """
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        elif self._buffer:  # never started: still write (or spool) what was published
            await self._run_writer()
        self.draining = True
        waiting = [s.finished.wait() for s in self._subs if s.started]
        try:
            async with asyncio.timeout(self._drain_timeout_s):
                await asyncio.gather(*waiting)
        except TimeoutError:
            log.warning("subscribers did not drain within %.1fs", self._drain_timeout_s)
        for sub in list(self._subs):
            await sub.close()
        await self.redis.aclose()

    @property
    def stats(self) -> BusStats:
        return BusStats(
            published=self.published,
            delivered=self.delivered,
            buffer_dropped=self._buffer_dropped,
            buffered=len(self._buffer),
            spooled=self._spooled,
        )
