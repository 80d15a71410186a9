"""Fleet-wide limits on Redis: `rate_limit_per_hour` and `max_requests` for N processes.

One Lua script (`LEASE_SCRIPT`, run by digest) takes units of a token's budget from
its hourly GCRA and its lifetime cap in one atomic step, with the time from Redis
`TIME`, on keys hash-tagged per token (`llm-proxy:{t:<id>}:...`, one Cluster slot).
`FleetLimiter` keeps a `Lease` per token, spends it synchronously on the request
path, refills it ahead of time in the background, and returns what is unused when it
idles or the process stops. While Redis is unreachable it says so (`down`) and the
stage falls back to in-process limits (or refuses, REDIS_FAILURE_MODE=closed); a
reconnect loop with backoff brings it back. docs/fleet-limits.md has the reasoning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .leases import DEFAULT_LEASE_MAX, Grant, Lease, Refusal
from .ratelimit import WINDOW_S

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# token id -> (requests counted so far, expiry as a Unix time), or None if unknown
QuotaBasis = Callable[[str], "tuple[int, float] | None"]

KEY_PREFIX: Final = "llm-proxy"
DEFAULT_TIMEOUT_S: Final = 0.25
# A lease holder that has not asked for this long no longer counts in lease sizes.
HOLDER_TTL_MS: Final = 10_000
# Unused units of a lease nobody spent for this long go back to the fleet.
LEASE_IDLE_S: Final = 2.0
# An empty lease unused this long is forgotten (memory stays bounded by active tokens).
LEASE_FORGET_S: Final = 60.0
# The lifetime counter outlives the token by this much (a later reseed from the
# database could only count requests twice, never mint any, but why risk it).
QUOTA_TTL_GRACE_S: Final = 86_400
RECONNECT_FIRST_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0
# A request that finds its refill's units taken by others asks again while the fleet
# has room (each grant takes at least one unit, so room only shrinks), but at most
# this many times: past it, a hot token's call is refused with Retry-After 1.
MAX_REFILLS_PER_REQUEST: Final = 10

LEASE_SCRIPT: Final = """
-- KEYS[1] rate hash {tat, lim}, KEYS[2] lifetime counter (granted), KEYS[3] holders
-- ARGV: worker, demand, give_back, debt, limit per window, window µs,
--       max_requests (-1: none), seed (counted so far), quota ttl s, holder ttl ms,
--       lease max (0: take nothing, a release)
-- Grants min(room, max(demand, policy size)) units of both limits at once, the size
-- as `leases.lease_size` computes it; give_back returns unused units; debt charges
-- requests admitted while Redis was away. Times are microseconds of Redis TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local demand = tonumber(ARGV[2])
local give_back = tonumber(ARGV[3])
local debt = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local max_requests = tonumber(ARGV[7])
local holder_ttl = tonumber(ARGV[10])
local lease_max = tonumber(ARGV[11])

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if lease_max > 0 then
  redis.call('ZADD', KEYS[3], now + holder_ttl * 1000, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local holders = redis.call('ZCARD', KEYS[3])
if holders > 0 then redis.call('PEXPIRE', KEYS[3], holder_ttl) end

local interval = window / limit
local state = redis.call('HMGET', KEYS[1], 'tat', 'lim')
local tat = tonumber(state[1]) or now
local old = tonumber(state[2]) or limit
if tat < now then tat = now end
if old ~= limit then
  -- requests still counted carry over to the new limit, capped at it
  tat = now + math.min((tat - now) * old / window, limit) * interval
end
tat = math.max(tat - give_back * interval, now)
tat = math.min(tat + debt * interval, now + window)
-- one µs of slack: the stored tat is rounded to whole µs
local rate_room = math.floor((now + window - tat + 1) / interval)

local granted = 0
local quota_room = -1
if max_requests >= 0 then
  granted = tonumber(redis.call('GET', KEYS[2]) or ARGV[8])
  granted = math.max(granted - give_back, 0) + debt
  quota_room = math.max(max_requests - granted, 0)
end
local room = rate_room
if quota_room >= 0 and quota_room < room then room = quota_room end
local g = 0
if lease_max > 0 and room > 0 then
  local size = math.floor(room / (2 * math.max(holders, 1)))
  size = math.max(1, math.min(lease_max, size))
  g = math.min(room, math.max(demand, size))
end
tat = tat + g * interval
local retry = 0
if rate_room - g <= 0 then retry = tat + interval - window - now end
if tat > now then
  redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat), 'lim', limit)
  redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
if max_requests >= 0 then
  redis.call('SET', KEYS[2], granted + g, 'EX', ARGV[9])
  quota_room = quota_room - g
end
return {g, rate_room - g, quota_room, holders, math.ceil(retry), math.ceil(tat - now)}
"""


def token_keys(token_id: str) -> list[str]:
    """The script's keys for one token: one hash tag, so one Redis Cluster slot."""
    tag = f"{KEY_PREFIX}:{{t:{token_id}}}"
    return [f"{tag}:rate", f"{tag}:quota", f"{tag}:holders"]


@dataclass(slots=True)
class FleetStats:
    """Counters for /metrics; read at scrape time."""

    down: bool = False
    lease_calls: int = 0  # script runs that took units
    lease_failures: int = 0  # script runs that failed (Redis unreachable, timeout)
    releases: int = 0  # script runs that gave units back
    local_decisions: int = 0  # requests decided by the in-process fallback
    closed_refusals: int = 0  # 503s of REDIS_FAILURE_MODE=closed
    units_held: int = 0


class FleetLimiter:
    """Leases of every token this process serves, over one Redis connection pool.

    Request path: `lease_for`, `take` and `give_back` are synchronous dict and int
    work; `refill` is the only await, made only when a lease is empty (at most one
    Redis round trip, shared by every request waiting on that token). Background:
    prefetch when a lease runs low, idle release, the reconnect loop.
    """

    def __init__(
        self,
        redis_url: str,
        quota_basis: QuotaBasis,
        *,
        lease_max: int = DEFAULT_LEASE_MAX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fail_closed: bool = False,
        window_s: float = WINDOW_S,
        idle_s: float = LEASE_IDLE_S,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.redis: Redis = Redis.from_url(
            redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # one quick retry covers a pooled connection Redis closed; a dead Redis
            # is the fallback's job, never a wait in redis-py's backoff
            retry=Retry(NoBackoff(), 1),
        )
        self._script = self.redis.register_script(LEASE_SCRIPT)
        self._quota_basis = quota_basis
        self.lease_max = lease_max
        self.timeout_s = timeout_s
        self.fail_closed = fail_closed
        self._window_us = int(window_s * 1_000_000)
        self._idle_s = idle_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._leases: dict[str, Lease] = {}
        self.stats = FleetStats()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def down(self) -> bool:
        """True while Redis is unreachable (the fallback decides)."""
        return self.stats.down

    # -- the request path ---------------------------------------------------------

    def lease_for(self, token_id: str, limit: int, max_requests: int | None) -> Lease:
        """The token's lease (created empty), with the token's current limits."""
        lease = self._leases.get(token_id)
        if lease is None:
            lease = self._leases[token_id] = Lease(limit, max_requests)
            lease.last_used = self._clock()  # new, not idle
        elif lease.limit != limit or lease.max_requests != max_requests:
            lease.limit = limit
            lease.max_requests = max_requests
            lease.forget_room()
        return lease

    def take(self, token_id: str, lease: Lease) -> bool:
        """Spend one unit of `lease`; prefetch in the background when it runs low."""
        if not lease.take(self._clock()):
            return False
        if lease.wants_prefetch() and not self.stats.down:
            self._start_refill(token_id, lease)
        return True

    def give_back(self, token_id: str) -> None:
        """A unit taken for a call that never reached upstream returns to its lease."""
        lease = self._leases.get(token_id)
        if lease is not None:
            lease.give_back()

    def cached_refusal(self, lease: Lease) -> Refusal | None:
        """The lease's last refusal while it holds (no Redis call needed)."""
        return lease.cached_refusal(self._clock())

    def now(self) -> float:
        """The limiter's monotonic clock (for Retry-After arithmetic)."""
        return self._clock()

    async def refill(self, token_id: str, lease: Lease) -> bool:
        """Wait for units (one coalesced Redis call); True when one was taken.

        False means: refused (see `cached_refusal`) or Redis is down (see `down`).
        """
        lease.waiting += 1
        try:
            for _ in range(MAX_REFILLS_PER_REQUEST):
                if lease.refill is None:
                    self._start_refill(token_id, lease)
                pending = lease.refill
                assert pending is not None
                # shielded: one client leaving must not cancel the others' call
                await asyncio.shield(pending)
                if self.take(token_id, lease):
                    return True
                if self.stats.down or lease.room <= 0:
                    return False
            return False
        finally:
            lease.waiting -= 1

    def count_local(self, token_id: str, lease: Lease) -> None:
        """A request the fallback admitted: charged to Redis when it is back."""
        lease.debt += 1
        lease.last_used = self._clock()
        self.stats.local_decisions += 1

    def uncount_local(self, token_id: str) -> None:
        """A fallback-admitted request that never reached upstream."""
        lease = self._leases.get(token_id)
        if lease is not None and lease.debt > 0:
            lease.debt -= 1

    # -- Redis calls ----------------------------------------------------------------

    def _start_refill(self, token_id: str, lease: Lease) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.refill = future
        task = asyncio.create_task(self._run_refill(token_id, lease, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_refill(
        self, token_id: str, lease: Lease, future: asyncio.Future[None]
    ) -> None:
        debt = lease.debt
        try:
            reply = await self._call(token_id, lease, demand=lease.waiting, debt=debt)
            if reply is not None:
                lease.debt -= debt
                lease.apply(Grant.from_reply(reply), self._clock(), self.lease_max)
                self.stats.lease_calls += 1
        finally:
            lease.refill = None
            future.set_result(None)

    def _args(
        self, token_id: str, lease: Lease, *, demand: int, give_back: int, debt: int
    ) -> list[int | str]:
        """The script's ARGV; `demand` < 0 is a release (takes nothing)."""
        basis = self._quota_basis(token_id)
        used, expires_at = basis if basis is not None else (0, 0.0)
        ttl = max(int(expires_at - self._wall_clock()), 0) + QUOTA_TTL_GRACE_S
        cap = lease.max_requests
        return [
            self.worker,
            max(demand, 0),
            give_back,
            debt,
            max(lease.limit, 1),
            self._window_us,
            -1 if cap is None else cap,
            used,
            ttl,
            HOLDER_TTL_MS,
            self.lease_max if demand >= 0 else 0,
        ]

    async def _call(
        self,
        token_id: str,
        lease: Lease,
        *,
        demand: int,
        debt: int,
    ) -> list[int] | None:
        """Take units (the script sizes the lease); None, Redis marked down, on failure."""
        args = self._args(token_id, lease, demand=demand, give_back=0, debt=debt)
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                reply: list[int] = await self._script(
                    keys=token_keys(token_id), args=args
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.lease_failures += 1
            self._mark_down(exc)
            return None
        return reply

    async def _release(
        self, leases: Iterable[tuple[str, Lease]], *, keep_units: bool = False
    ) -> None:
        """Give back the unused units and charge the debts of `leases`, pipelined.

        With `keep_units` only the debts are charged (Redis came back while leases
        still held units, which stay valid grants).
        """
        batch: list[tuple[str, Lease, int, int]] = []
        for token_id, lease in leases:
            units = 0 if keep_units else lease.units
            if units or lease.debt:
                # zeroed before the call: a unit is spent here or returned, not both
                batch.append((token_id, lease, units, lease.debt))
                lease.units -= units
                lease.debt = 0
        if not batch:
            return
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for token_id, lease, units, debt in batch:
                        args = self._args(
                            token_id, lease, demand=-1, give_back=units, debt=debt
                        )
                        await self._script(
                            keys=token_keys(token_id), args=args, client=pipe
                        )
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # the units are lost (safe: the fleet under-serves); debts are kept
            for _, lease, _, debt in batch:
                lease.debt += debt
            self.stats.lease_failures += 1
            self._mark_down(exc)
            return
        self.stats.releases += len(batch)

    # -- down, back up --------------------------------------------------------------

    def _mark_down(self, exc: BaseException) -> None:
        if self._closed:
            return
        if not self.stats.down:
            log.warning(
                "Redis unreachable for fleet limits (%s: %s); limits are per process"
                " until it answers%s",
                type(exc).__name__,
                exc,
                " (REDIS_FAILURE_MODE=closed: calls without a lease get 503)"
                if self.fail_closed
                else "",
            )
        self.stats.down = True
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self.redis.ping()
            except (RedisError, OSError, TimeoutError):
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self._back_up()
            return

    def _back_up(self) -> None:
        log.warning("Redis answers again: fleet limits are shared again")
        self.stats.down = False
        for lease in self._leases.values():
            lease.forget_room()
        owing = [(t, lease) for t, lease in self._leases.items() if lease.debt]
        if owing:
            task = asyncio.create_task(self._release(owing, keep_units=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def readiness(self) -> str:
        """`ok` when Redis answers a PING now, else `degraded: <why>`."""
        if not self.stats.down:
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await self.redis.ping()
            except (RedisError, OSError, TimeoutError) as exc:
                self._mark_down(exc)
        if not self.stats.down:
            return "ok"
        if self.fail_closed:
            return (
                "degraded: Redis unreachable; REDIS_FAILURE_MODE=closed, so /v1 calls"
                " without a lease answer 503 until it is back"
            )
        return (
            "degraded: Redis unreachable; rate limits and max_requests are enforced per"
            " process until it is back"
        )

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load the script and start housekeeping; a dead Redis only means `down`."""
        self._closed = False
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                await self._script.registered_client.script_load(LEASE_SCRIPT)
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
        self._housekeeping = asyncio.create_task(self._housekeeping_loop())

    async def _housekeeping_loop(self) -> None:
        """Return idle units to the fleet; forget idle empty leases."""
        while True:
            await asyncio.sleep(self._idle_s / 2)
            try:
                await self._housekeep()
            except Exception:
                log.exception("fleet lease housekeeping failed; retrying")

    async def _housekeep(self) -> None:
        now = self._clock()
        idle = [
            (token_id, lease)
            for token_id, lease in self._leases.items()
            if lease.refill is None and now - lease.last_used >= self._idle_s
        ]
        if not self.stats.down:
            await self._release(idle)
        for token_id, lease in idle:
            if (
                not lease.units
                and not lease.debt
                and lease.refill is None
                and now - lease.last_used >= LEASE_FORGET_S
            ):
                self._leases.pop(token_id, None)
        self.stats.units_held = sum(lease.units for lease in self._leases.values())

    async def close(self) -> None:
        """Give every unused unit back (graceful stop), then close the pool."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout_s * 4)
        if not self.stats.down:
            await self._release(list(self._leases.items()))
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with suppress(asyncio.CancelledError):
                await self._reconnect
        for task in set(self._tasks):
            task.cancel()
        await self.redis.aclose()

    def leases(self) -> dict[str, Lease]:
        """The live leases by token id (for tests and metrics)."""
        return self._leases
