"""The Redis Streams event bus: batched background XADD, consumer groups, a local spool.

`publish()` only appends to a bounded in-process buffer. A writer task XADDs it in
pipelined batches, and while Redis is unreachable it appends to a JSONL spool file
that it replays when Redis answers again. Subscribers read through consumer groups
(one group per backend is fan-out; several consumers of one group share the load)
with at-least-once delivery: an entry leaves the group's pending list only when
`ack()` is called, and entries left pending by a dead consumer are re-claimed with
XAUTOCLAIM. Events carry `event_id`, so consumers deduplicate.
The reader is `redis_subscription.py`, the spool file `redis_spool.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Generic

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..clock import Clock
from .model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_DROP_LOG_INTERVAL_S,
    DEFAULT_FLUSH_INTERVAL_S,
    BusStats,
    EventT,
    RateLimitedLog,
    RequestCompleted,
    check_bus_sizes,
    encode_event,
)
from .redis_spool import Spool
from .redis_subscription import DATA_FIELD, REDIS_DOWN, RedisSubscription

log = logging.getLogger(__name__)

DEFAULT_STREAM_KEY: Final = "llm-proxy:events"


class RedisEventBus(Generic[EventT]):
    """Event bus on a Redis stream; see the module docstring for the guarantees.

    `maxlen=None` (the default) never trims the stream, so no undelivered event is
    trimmed away; trim with XTRIM MINID from operations, or set `maxlen` to a large
    approximate cap knowing that a group lagging further behind loses events.
    `max_queue` in `subscribe()` is ignored: the stream is the queue. The stream
    carries events of `event_type` only; an entry of another type is acked unread.
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
        clock: Clock = time.monotonic,
        # mypy cannot check a default against a TypeVar's default (both RequestCompleted)
        event_type: type[EventT] = RequestCompleted,  # type: ignore[assignment]
    ) -> None:
        check_bus_sizes(buffer_size, batch_size, flush_interval_s)
        self.event_type = event_type
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
        self._spool = Spool(spool_path)
        self._buffer: deque[EventT] = deque()
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._subs: set[RedisSubscription[EventT]] = set()
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

    def publish(self, event: EventT) -> None:
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

    def _take(self) -> list[EventT]:
        count = min(self.batch_size, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    def _encode(self, batch: list[EventT]) -> list[bytes]:
        payloads: list[bytes] = []
        for event in batch:
            try:
                payloads.append(encode_event(event))
            except TypeError:
                self._buffer_dropped += 1
                log.exception("cannot serialise event %s; dropped", event.event_id)
        return payloads

    async def _write(self, batch: list[EventT]) -> None:
        """XADD a batch; while Redis is down (or a spool is pending) spool it."""
        payloads = self._encode(batch)
        if not self._spooled and self._clock() >= self._retry_at:
            try:
                await self._xadd(payloads)
                return
            except REDIS_DOWN as exc:
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
            except REDIS_DOWN as exc:
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
    ) -> RedisSubscription[EventT]:
        if self._closed:
            raise RuntimeError("subscribe() after close(): the event bus is closed")
        # A second consumer of one group in this process needs its own name, or it
        # would read the first one's pending entries as its own.
        n = self._consumers[name] = self._consumers.get(name, 0) + 1
        consumer = self.consumer_name if n == 1 else f"{self.consumer_name}-{n}"
        sub = RedisSubscription(self, name, consumer)
        self._subs.add(sub)
        return sub

    def forget(self, sub: RedisSubscription[EventT]) -> None:
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
