"""Event types, their JSON form, the `EventBus` protocol and the in-memory bus.

This module owns what an event is and how it travels inside one process; it knows
nothing about who produces events or what consumers do with them. The Redis Streams
bus lives in `redis_bus.py` and implements the same protocol.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Final, Protocol, Self, TypeAlias

import orjson

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE: Final = 10_000
DEFAULT_BATCH_SIZE: Final = 100
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
DEFAULT_DROP_LOG_INTERVAL_S: Final = 10.0


# 64 random bits per process, then a counter: as unique as consumers need for
# deduplication, without a uuid4 (an os.urandom syscall) per event.
_EVENT_ID_PREFIX: Final = os.urandom(8).hex()
_event_ids = itertools.count(1)


def new_event_id() -> str:
    """A fresh event id (32 hex digits), used by consumers to deduplicate."""
    return f"{_EVENT_ID_PREFIX}{next(_event_ids):016x}"


@functools.lru_cache(maxsize=8)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


@functools.lru_cache(maxsize=8)
def _second_epoch(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def utc_iso_at(epoch_s: float) -> str:
    """`epoch_s` as ISO-8601 UTC with milliseconds and a `Z` (like 2026-11-27T10:49:19.123Z).

    Every event gets one; the date and time part is formatted once per second, which
    makes this about five times cheaper than `datetime.isoformat`.
    """
    second = int(epoch_s)
    return f"{_second_text(second)}.{int((epoch_s - second) * 1000):03d}Z"


def utc_now_iso() -> str:
    """The current UTC time as ISO-8601 with milliseconds and a `Z` suffix."""
    return utc_iso_at(time.time())


def iso_epoch_s(stamp: str) -> float:
    """Epoch seconds of an ISO-8601 time; raises `ValueError` when it is not one.

    Our own form (`utc_iso_at`) is read with one cached conversion per second; any
    other ISO form goes through `datetime.fromisoformat`.
    """
    millis = stamp[20:23]
    if len(stamp) == 24 and stamp[19] == "." and stamp[23] == "Z" and millis.isdigit():
        return _second_epoch(stamp[:19]) + int(millis) / 1000
    return datetime.fromisoformat(stamp).timestamp()


_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _fields_of(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """An event class's field names, and those holding mappings (computed once)."""
    known = _FIELDS.get(cls)
    if known is None:
        fields = dataclasses.fields(cls)
        known = _FIELDS[cls] = (
            tuple(f.name for f in fields),
            tuple(f.name for f in fields if "Mapping" in str(f.type)),
        )
    return known


@dataclass(slots=True, kw_only=True)
class BaseEvent:
    """Fields and JSON (de)serialisation shared by every event type.

    Fields are keyword-only, so new ones (with defaults) can be added in any order.
    Unknown keys met while decoding (an event from a newer producer) are kept in
    `extra` instead of failing the consumer.
    """

    type_tag: ClassVar[str] = ""

    event_id: str = field(default_factory=new_event_id)
    timestamp: str = field(default_factory=utc_now_iso)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field plus the `type` tag."""
        names, mappings = _fields_of(type(self))
        data: dict[str, Any] = {"type": self.type_tag}
        for name in names:
            data[name] = getattr(self, name)
        for name in mappings:  # a Mapping becomes a plain dict (a copy)
            value = data[name]
            if type(value) is dict or isinstance(value, Mapping):
                data[name] = dict(value)
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build an event from `to_json_dict()` output; unknown keys go to `extra`."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names and k != "type"}
        if unknown:
            known["extra"] = {**unknown, **known.get("extra", {})}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ValueError(f"invalid {cls.__name__} event: {exc}") from exc


@dataclass(slots=True, kw_only=True)
class RequestCompleted(BaseEvent):
    """One proxied call: who made it, what it was, how long it took, what it used."""

    type_tag: ClassVar[str] = "request_completed"

    request_id: str
    project_id: str | None
    token_id: str | None
    method: str
    endpoint: str
    path: str
    status_code: int
    duration_ms: float
    ttfb_ms: float | None = None
    stream: bool = False
    model: str | None = None  # the model that answered (upstream's), else the asked
    error: str | None = None
    usage: Mapping[str, Any] | None = None
    requested_model: str | None = None  # the model the client asked for
    created: int | None = None  # upstream's creation time of the answer (epoch s)


# Widen to a union (`RequestCompleted | TokenRevoked | ...`) as event types are added,
# and list each new class in _EVENT_TYPES.
Event: TypeAlias = RequestCompleted

_EVENT_TYPES: Final[Mapping[str, type[Event]]] = {
    cls.type_tag: cls for cls in (RequestCompleted,)
}


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_event(event: Event) -> bytes:
    """Serialise an event to compact JSON bytes (one JSONL line without newline)."""
    return orjson.dumps(event.to_json_dict(), default=_json_default)


def decode_event(data: bytes | str) -> Event:
    """Parse `encode_event()` output; raise `ValueError` for anything else."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("event JSON must be an object")
    cls = _EVENT_TYPES.get(obj.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown event type: {obj.get('type')!r}")
    return cls.from_json_dict(obj)


@dataclass(frozen=True, slots=True)
class BusStats:
    """A snapshot of a bus's counters, for logs and metrics.

    `dropped` counts events a subscriber never got because its queue was full;
    `buffer_dropped` counts events dropped before reaching any subscriber (Redis
    publish buffer full, or published after close). `buffered` is how many events
    the process holds right now, `spooled` how many wait in a local spool file.
    """

    published: int = 0
    delivered: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    buffer_dropped: int = 0
    buffered: int = 0
    spooled: int = 0

    @property
    def dropped_total(self) -> int:
        """Every event lost, whichever stage dropped it."""
        return self.buffer_dropped + sum(self.dropped.values())


class Subscription(Protocol):
    """An async iterator of event batches for one named subscriber (consumer group)."""

    @property
    def name(self) -> str: ...

    def __aiter__(self) -> Subscription: ...

    async def __anext__(self) -> list[Event]: ...

    async def ack(self, batch: Sequence[Event]) -> None:
        """Confirm that `batch` was handled; call it after the backend accepted it."""
        ...

    async def close(self) -> None:
        """Stop this consumer after its current batch; unacked events come back."""
        ...


class EventBus(Protocol):
    """Carries events from the request path to subscribers without slowing it."""

    def publish(self, event: Event) -> None:
        """Hand over an event; never blocks, never raises (drops are counted)."""
        ...

    def subscribe(self, name: str, *, max_queue: int | None = None) -> Subscription:
        """Return a consumer of group `name`; each group sees every event."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def stats(self) -> BusStats: ...


class RateLimitedLog:
    """Logs a warning at most once per `interval_s`, counting what it suppressed."""

    __slots__ = ("_clock", "_interval_s", "_last", "_logger", "_suppressed")

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_DROP_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        """Log `msg % args` unless a warning went out less than `interval_s` ago."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self._suppressed += 1
            return
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        self._logger.warning(msg + " (%d similar suppressed)", *args, suppressed)


class _MemoryGroup:
    """One bounded queue shared by the consumers of one subscriber name."""

    __slots__ = ("closing", "consumers", "maxlen", "name", "queue", "wakeup")

    def __init__(self, name: str, maxlen: int) -> None:
        self.name = name
        self.maxlen = maxlen
        self.queue: deque[Event] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        self.consumers = 0


class _MemorySubscription:
    """A consumer of an in-memory group: batches by size or by interval."""

    __slots__ = ("_batch_size", "_bus", "_flush_interval_s", "_group", "_stopped")

    def __init__(self, bus: InMemoryEventBus, group: _MemoryGroup) -> None:
        self._bus = bus
        self._group = group
        self._batch_size = bus.batch_size
        self._flush_interval_s = bus.flush_interval_s
        self._stopped = False

    @property
    def name(self) -> str:
        return self._group.name

    def __aiter__(self) -> _MemorySubscription:
        return self

    async def __anext__(self) -> list[Event]:
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

    def _take(self) -> list[Event]:
        queue = self._group.queue
        batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
        self._bus.delivered += len(batch)
        return batch

    async def ack(self, batch: Sequence[Event]) -> None:
        """Nothing to confirm in memory: a batch is gone once it was yielded."""

    async def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._group.wakeup.set()
        self._bus.leave(self._group)


def check_bus_sizes(buffer_size: int, batch_size: int, flush_interval_s: float) -> None:
    """Refuse sizes no bus can work with."""
    if buffer_size < 1 or batch_size < 1 or flush_interval_s <= 0:
        raise ValueError(
            "buffer_size and batch_size must be >= 1 and flush_interval_s > 0"
        )


class InMemoryEventBus:
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_bus_sizes(buffer_size, batch_size, flush_interval_s)
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._groups: dict[str, _MemoryGroup] = {}
        self._dropped: dict[str, int] = {}
        self._closed = False
        self._drop_log = RateLimitedLog(log, drop_log_interval_s, clock)
        self.published = 0
        self.delivered = 0
        self._buffer_dropped = 0

    def publish(self, event: Event) -> None:
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
    ) -> _MemorySubscription:
        if self._closed:
            raise RuntimeError("subscribe() after close(): the event bus is closed")
        group = self._groups.get(name)
        if group is None:
            group = _MemoryGroup(name, max_queue or self.buffer_size)
            self._groups[name] = group
        group.consumers += 1
        return _MemorySubscription(self, group)

    def leave(self, group: _MemoryGroup) -> None:
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
