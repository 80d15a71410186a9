"""The in-memory event bus: fan-out to one bounded queue per subscriber name.

The default bus, for one process; `redis_bus.py` is the one for a fleet. Both
implement `model.EventBus`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Generic

from ..clock import Clock
from .model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_DROP_LOG_INTERVAL_S,
    DEFAULT_FLUSH_INTERVAL_S,
    BusStats,
    EventT,
    RateLimitedLog,
    check_bus_sizes,
)

log = logging.getLogger(__name__)


class _MemoryGroup(Generic[EventT]):
    """One bounded queue shared by the consumers of one subscriber name."""

    __slots__ = ("closing", "consumers", "maxlen", "name", "queue", "wakeup")

    def __init__(self, name: str, maxlen: int) -> None:
        self.name = name
        self.maxlen = maxlen
        self.queue: deque[EventT] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        self.consumers = 0


class _MemorySubscription(Generic[EventT]):
    """A consumer of an in-memory group: batches by size or by interval."""

    __slots__ = ("_batch_size", "_bus", "_flush_interval_s", "_group", "_stopped")

    def __init__(
        self, bus: InMemoryEventBus[EventT], group: _MemoryGroup[EventT]
    ) -> None:
        self._bus = bus
        self._group = group
        self._batch_size = bus.batch_size
        self._flush_interval_s = bus.flush_interval_s
        self._stopped = False

    @property
    def name(self) -> str:
        return self._group.name

    def __aiter__(self) -> _MemorySubscription[EventT]:
        return self

    async def __anext__(self) -> list[EventT]:
        group = self._group
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while not self._stopped:
            queued = len(group.queue)
            if queued >= self._batch_size or (queued and group.closing):
                return self._take()
            if group.closing:
                break
            if queued and deadline is None:
                deadline = loop.time() + self._flush_interval_s
            group.wakeup.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await group.wakeup.wait()
            except TimeoutError:
                return self._take()
        raise StopAsyncIteration

    def _take(self) -> list[EventT]:
        queue = self._group.queue
        batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
        self._bus.delivered += len(batch)
        return batch

    async def ack(self, batch: Sequence[EventT]) -> None:
        """Nothing to confirm in memory: a batch is gone once it was yielded."""

    async def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._group.wakeup.set()
        self._bus.leave(self._group)


class InMemoryEventBus(Generic[EventT]):
    """The default bus: fan-out to one bounded queue per subscriber name.

    A full queue drops the new event for that subscriber only, counts it in
    `stats.dropped[name]` and logs a rate-limited warning, so a stalled consumer
    costs at most `max_queue` events of memory and never slows `publish()`.
    Subscribing twice with one name shares that queue (load sharing), like a
    Redis consumer group.
    """

    def __init__(
        self,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        drop_log_interval_s: float = DEFAULT_DROP_LOG_INTERVAL_S,
        clock: Clock = time.monotonic,
    ) -> None:
        check_bus_sizes(buffer_size, batch_size, flush_interval_s)
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._groups: dict[str, _MemoryGroup[EventT]] = {}
        self._dropped: dict[str, int] = {}
        self._closed = False
        self._drop_log = RateLimitedLog(log, drop_log_interval_s, clock)
        self.published = 0
        self.delivered = 0
        self._buffer_dropped = 0

    def publish(self, event: EventT) -> None:
        if self._closed:
            self._buffer_dropped += 1
            self._drop_log.warning("event bus is closed; dropped %s", event.event_id)
            return
        self.published += 1
        for group in self._groups.values():
            queue = group.queue
            if len(queue) >= group.maxlen:
                self._dropped[group.name] = self._dropped.get(group.name, 0) + 1
                self._drop_log.warning(
                    "subscriber %s is full (%d events); dropping events",
                    group.name,
                    group.maxlen,
                )
                continue
            queue.append(event)
            if len(queue) == 1 or len(queue) == self.batch_size:
                group.wakeup.set()

    def subscribe(
        self, name: str, *, max_queue: int | None = None
    ) -> _MemorySubscription[EventT]:
        if self._closed:
            raise RuntimeError("subscribe() after close(): the event bus is closed")
        group = self._groups.get(name)
        if group is None:
            group = _MemoryGroup(name, max_queue or self.buffer_size)
            self._groups[name] = group
        group.consumers += 1
        return _MemorySubscription(self, group)

    def leave(self, group: _MemoryGroup[EventT]) -> None:
        """Forget a group once its last consumer has closed."""
        group.consumers -= 1
        if group.consumers <= 0 and self._groups.get(group.name) is group:
            del self._groups[group.name]

    async def start(self) -> None:
        """Nothing to connect; present for the `EventBus` protocol."""

    async def close(self) -> None:
        """Stop accepting events; subscribers drain what is queued, then stop.

        Consumers get every event published before this call, in batches that no
        longer wait for `flush_interval_s`; their iteration then ends.
        """
        self._closed = True
        for group in self._groups.values():
            group.closing = True
            group.wakeup.set()

    @property
    def stats(self) -> BusStats:
        groups = self._groups.values()
        return BusStats(
            published=self.published,
            delivered=self.delivered,
            dropped=dict(self._dropped),
            buffer_dropped=self._buffer_dropped,
            buffered=sum(len(g.queue) for g in groups),
        )
