"""Event types, their JSON form, and what every bus shares: the `EventBus` protocol,
its stats, its size checks and its rate-limited warnings.

This module owns what an event is; it knows nothing about who produces events or what
consumers do with them. The buses implement the protocol: `memory_bus.py` (in one
process) and `redis_bus.py` (Redis Streams). A bus carries one event type (`EventT`):
the per-call `RequestCompleted` by default, the audit trail's records on a bus of their
own (`audit.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol, Self, TypeAlias

import orjson
from typing_extensions import TypeVar  # PEP 696 defaults; `typing` has them from 3.13

from ..clock import Clock, utc_now_iso
from ..ids import id_sequence

DEFAULT_BUFFER_SIZE: Final = 10_000
DEFAULT_BATCH_SIZE: Final = 100
DEFAULT_FLUSH_INTERVAL_S: Final = 1.0
DEFAULT_DROP_LOG_INTERVAL_S: Final = 10.0

# A fresh event id (32 hex digits: 64 random bits per process, then a counter), used
# by consumers to deduplicate.
new_event_id: Final = id_sequence(prefix_bytes=8, counter_digits=16)


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
    # RESPONSE_CACHE: "hit" (answered from the cache, no upstream usage), "miss" or
    # "bypass"; None while the cache is off.
    cache: str | None = None


# The event of the request bus; a bus of another kind names its own (`EventT`).
Event: TypeAlias = RequestCompleted

# What one bus carries; a bus named without it carries `RequestCompleted`.
EventT = TypeVar("EventT", bound=BaseEvent, default=RequestCompleted)


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_event(event: BaseEvent) -> bytes:
    """Serialise an event to compact JSON bytes (one JSONL line without newline)."""
    return orjson.dumps(event.to_json_dict(), default=_json_default)


def decode_event(data: bytes | str) -> Event:
    """Parse `encode_event()` output of a request event; raise `ValueError` for
    anything else."""
    return decode_event_as(data, RequestCompleted)


def decode_event_as(data: bytes | str, cls: type[EventT]) -> EventT:
    """Parse `encode_event()` output of an event of type `cls`; else `ValueError`."""
    obj = _json_object(data)
    if obj.get("type") != cls.type_tag:
        raise ValueError(f"not a {cls.type_tag} event: {obj.get('type')!r}")
    return cls.from_json_dict(obj)


def _json_object(data: bytes | str) -> dict[str, Any]:
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("event JSON must be an object")
    return obj


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


class Subscription(Protocol[EventT]):
    """An async iterator of event batches for one named subscriber (consumer group)."""

    @property
    def name(self) -> str: ...

    def __aiter__(self) -> Subscription[EventT]: ...

    async def __anext__(self) -> list[EventT]: ...

    async def ack(self, batch: Sequence[EventT]) -> None:
        """Confirm that `batch` was handled; call it after the backend accepted it."""
        ...

    async def close(self) -> None:
        """Stop this consumer after its current batch; unacked events come back."""
        ...


class EventBus(Protocol[EventT]):
    """Carries events from the request path to subscribers without slowing it."""

    def publish(self, event: EventT) -> None:
        """Hand over an event; never blocks, never raises (drops are counted)."""
        ...

    def subscribe(
        self, name: str, *, max_queue: int | None = None
    ) -> Subscription[EventT]:
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
        clock: Clock = time.monotonic,
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


def check_bus_sizes(buffer_size: int, batch_size: int, flush_interval_s: float) -> None:
    """Refuse sizes no bus can work with."""
    if buffer_size < 1 or batch_size < 1 or flush_interval_s <= 0:
        raise ValueError(
            "buffer_size and batch_size must be >= 1 and flush_interval_s > 0"
        )
