"""One consumer of a Redis Streams consumer group: reads, re-claims, acknowledges.

A subscription first reads its own pending entries (left by an earlier run of the same
consumer), then new ones, and now and then XAUTOCLAIMs entries another consumer left
pending too long. An entry leaves the group's pending list only on `ack()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Generic

from redis.exceptions import RedisError, ResponseError

from .model import EventT, decode_event_as

if TYPE_CHECKING:
    from .redis_bus import RedisEventBus

log = logging.getLogger(__name__)

DATA_FIELD: Final = b"data"
# Every failure that means "Redis cannot take this now": keep the events, retry later.
REDIS_DOWN: Final = (RedisError, OSError)
_Entries = list[tuple[bytes, dict[bytes, bytes] | None]]


class RedisSubscription(Generic[EventT]):
    """One consumer of consumer group `name`: yields batches, XACKs on `ack()`."""

    def __init__(self, bus: RedisEventBus[EventT], name: str, consumer: str) -> None:
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

    def __aiter__(self) -> RedisSubscription[EventT]:
        return self

    async def __anext__(self) -> list[EventT]:
        self.started = True
        batch = await self._next_batch() if not self._stop.is_set() else []
        if batch:
            self._bus.delivered += len(batch)
            return batch
        self.finished.set()
        raise StopAsyncIteration

    async def _next_batch(self) -> list[EventT]:
        """Collect up to batch_size events; [] means iteration is over."""
        bus = self._bus
        loop = asyncio.get_running_loop()
        batch: list[EventT] = []
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
            except REDIS_DOWN as exc:
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

    async def _recover(self) -> list[EventT]:
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

    async def _accept(self, entries: _Entries) -> list[EventT]:
        """Decode entries, remember their ids for `ack()`; XACK undecodable ones."""
        events: list[EventT] = []
        poison: list[bytes] = []
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue  # re-claimed from ourselves while still being handled
            try:
                data = (fields or {}).get(DATA_FIELD, b"")
                event = decode_event_as(data, self._bus.event_type)
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

    async def ack(self, batch: Sequence[EventT]) -> None:
        """XACK the entries behind `batch`; if Redis is down they are redelivered."""
        ids = [i for e in batch for i in self._unacked.pop(e.event_id, ())]
        if ids:
            self._in_flight.difference_update(ids)
            await self._xack(ids)

    async def _xack(self, ids: list[bytes]) -> None:
        try:
            await self._bus.redis.xack(self._bus.stream_key, self._name, *ids)
        except REDIS_DOWN as exc:
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
