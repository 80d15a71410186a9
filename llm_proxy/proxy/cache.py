"""The response cache's store: entries in Redis, one GET per lookup, writes off the
response path, and what happens while Redis is away.

`ResponseCache` is handed its Redis client (app.py builds it from
RESPONSE_CACHE_REDIS_URL, else REDIS_URL). A lookup is one GET bounded by
RESPONSE_CACHE_TIMEOUT. A failed call marks Redis away: for `RETRY_AFTER_S` the cache
is skipped without calling it, then the next lookup tries again, so a dead Redis
costs one timeout a second, never an error to a client. Answers to keep wait in a
bounded queue that one background task writes in pipelined SETs with their TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from typing import Final

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..clock import Clock

log = logging.getLogger(__name__)

RETRY_AFTER_S: Final = 1.0
# Answers waiting to be written, at most (each is at most RESPONSE_CACHE_MAX_BYTES).
PENDING_BYTES_MAX: Final = 16 * 1024 * 1024
WRITE_BATCH: Final = 64  # SETs per pipeline
WRITE_TIMEOUT_S: Final = 2.0  # a whole pipeline; off the response path
CLOSE_TIMEOUT_S: Final = 5.0


class CacheUnavailable(Exception):
    """Redis did not answer the lookup, or is known to be away."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: status, headers as the client got them, the exact body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # Unix time
    ttl_s: int = 0  # what it was stored for


def encode_entry(entry: Entry) -> bytes:
    """One line of JSON (status, headers, times), a newline, then the body's bytes."""
    head = {
        "s": entry.status,
        "h": entry.headers,
        "t": entry.stored_at,
        "l": entry.ttl_s,
    }
    return orjson.dumps(head) + b"\n" + entry.body


def decode_entry(raw: bytes) -> Entry | None:
    """The entry `encode_entry` wrote; None for anything else."""
    head, newline, body = raw.partition(b"\n")
    try:
        meta = orjson.loads(head) if newline else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    status, headers, stored_at = meta.get("s"), meta.get("h"), meta.get("t")
    ttl_s = meta.get("l", 0)
    if not (
        isinstance(status, int)
        and isinstance(headers, list)
        and isinstance(stored_at, int | float)
        and isinstance(ttl_s, int)
    ):
        return None
    try:
        pairs = tuple((str(name), str(value)) for name, value in headers)
    except (TypeError, ValueError):
        return None
    return Entry(status, pairs, body, float(stored_at), ttl_s)


@dataclass(slots=True)
class CacheStats:
    """Counters for /metrics; read at scrape time."""

    lookups: int = 0  # Redis GETs made
    hits: int = 0
    misses: int = 0  # looked up: nothing usable stored
    bypasses: int = 0  # the cache did not answer and was not asked
    stored: int = 0  # entries written
    too_large: int = 0  # answers over RESPONSE_CACHE_MAX_BYTES, not kept
    dropped: int = 0  # answers not written: the queue was full or Redis failed
    errors: int = 0  # failed Redis calls
    down: bool = False  # Redis is away (the cache is skipped)


class ResponseCache:
    """Stored answers of every project, on one Redis client, and their writer."""

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_max_s: int,
        max_bytes: int,
        timeout_s: float,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._redis = redis
        self.ttl_max_s = ttl_max_s
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self.wall_clock = wall_clock
        self.stats = CacheStats()
        self._retry_at = 0.0
        self._pending: deque[tuple[str, bytes, int]] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._settled = asyncio.Event()  # set while nothing waits to be written
        self._settled.set()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    # -- the request path ---------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while Redis is away and its retry time has not come."""
        return not self.stats.down or self._clock() >= self._retry_at

    async def get(self, key: str) -> Entry | None:
        """The stored entry, None if there is none; `CacheUnavailable` on failure."""
        if not self.available:
            raise CacheUnavailable()
        self.stats.lookups += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._redis.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise CacheUnavailable() from exc
        self._answered()
        if raw is None:
            return None
        # bytes: the client is made without decode_responses
        entry = decode_entry(raw if isinstance(raw, bytes) else raw.encode())
        if entry is None:
            log.warning("ignoring a response cache entry that does not decode")
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Queue an entry for the writer (synchronous); dropped, counted, when the
        queue is full or Redis is away."""
        raw = encode_entry(entry)
        if not self.available or self._pending_bytes + len(raw) > PENDING_BYTES_MAX:
            self.stats.dropped += 1
            return
        self._pending.append((key, raw, entry.ttl_s))
        self._pending_bytes += len(raw)
        self._settled.clear()
        self._wakeup.set()

    # -- the writer ---------------------------------------------------------------

    def start(self) -> None:
        """Start the writer task (in the app's startup)."""
        self._writer = asyncio.create_task(self._write_loop(), name="response-cache")

    async def drain(self) -> None:
        """Wait until every entry handed to `put` is written or dropped."""
        await self._settled.wait()

    async def close(self) -> None:
        """Write what is queued (bounded in time), stop the writer, close Redis."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._writer
            except TimeoutError:
                log.warning(
                    "response cache: %d entries not written", len(self._pending)
                )
                self._writer.cancel()
                with suppress(asyncio.CancelledError):
                    await self._writer
        await self._redis.aclose()

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                self._settled.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [
                self._pending.popleft()
                for _ in range(min(WRITE_BATCH, len(self._pending)))
            ]
            self._pending_bytes -= sum(len(raw) for _, raw, _ in batch)
            await self._write(batch)

    async def _write(self, batch: list[tuple[str, bytes, int]]) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, raw, ttl_s in batch:
                        pipe.set(key, raw, ex=ttl_s)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.dropped += len(batch)
            self._failed(exc)
            return
        self._answered()
        self.stats.stored += len(batch)

    # -- Redis away, and back -------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        if not self.stats.down:
            log.warning(
                "Redis unreachable for the response cache (%s: %s); calls go to the"
                " upstream until it answers",
                type(exc).__name__,
                exc,
            )
        self.stats.down = True
        self._retry_at = self._clock() + RETRY_AFTER_S

    def _answered(self) -> None:
        if self.stats.down:
            log.warning("Redis answers again: the response cache is back")
            self.stats.down = False
