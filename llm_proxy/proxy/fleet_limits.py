"""Fleet-wide limits on Redis: `rate_limit_per_hour` and `max_requests` for N processes.

One Lua script (`lease_script.LEASE_SCRIPT`, run by digest) takes units of a token's
budget from its hourly GCRA and its lifetime cap in one atomic step, with the time
from Redis `TIME`, on keys hash-tagged per token (`llm-proxy:{t:<id>}:...`, one
Cluster slot). `FleetLimiter` keeps a `Lease` per token, spends it synchronously on
the request path, refills it in the background once half of it is spent (sized to
the token's demand, so a refill lands before the rest is gone), and returns what is
unused when it idles or the process stops. While Redis is unreachable it says so
(`down`) and the stage falls back to in-process limits (or refuses,
REDIS_FAILURE_MODE=closed); a reconnect loop with backoff brings it back.
docs/fleet-limits.md has the reasoning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..backoff import NO_JITTER, RetryPolicy
from ..clock import Clock
from ..ids import process_name
from .lease_script import LEASE_SCRIPT
from .leases import DEFAULT_LEASE_MAX, Grant, Lease, Refusal
from .ratelimit import WINDOW_S

log = logging.getLogger(__name__)

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
RECONNECT: Final = RetryPolicy(
    base_s=RECONNECT_FIRST_S, max_s=RECONNECT_MAX_S, jitter=NO_JITTER
)
# A waiting request whose refill could not cover everyone waiting by then (more came
# while it flew) asks again while the fleet has room (each grant takes at least one
# unit, so room only shrinks), but at most this many times: past it, a hot token's
# call is refused with Retry-After 1.
MAX_REFILLS_PER_REQUEST: Final = 10


def token_keys(token_id: str) -> list[str]:
    """The script's keys for one token: one hash tag, so one Redis Cluster slot."""
    tag = f"{KEY_PREFIX}:{{t:{token_id}}}"
    return [f"{tag}:rate", f"{tag}:quota", f"{tag}:holders"]


@dataclass(slots=True)
class FleetStats:
    """Counters for /metrics; read at scrape time."""

    down: bool = False
    lease_calls: int = 0  # script runs that took units
    waits: int = 0  # requests that awaited a script run (their lease was empty)
    lease_failures: int = 0  # script runs that failed (Redis unreachable, timeout)
    releases: int = 0  # script runs that gave units back
    local_decisions: int = 0  # requests decided by the in-process fallback
    closed_refusals: int = 0  # 503s of REDIS_FAILURE_MODE=closed
    units_held: int = 0


class FleetLimiter:
    """Leases of every token this process serves, over one Redis connection pool.

    Request path: `lease_for`, `take` and `give_back` are synchronous dict and int
    work; `refill` is the only await, made only when a lease is empty (at most one
    Redis round trip, shared by every request waiting on that token): the first
    call of a token, or demand outgrowing the lease. Background: the refill once
    half a lease is spent, idle release, the reconnect loop.
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
        self.worker = process_name()
        self._leases: dict[str, Lease] = {}
        self.stats = FleetStats()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed = False
        self._closing = False  # no refill ahead of need once `close` began

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
        if lease.wants_prefetch() and self._asks_ahead():
            self._start_refill(token_id, lease)
        return True

    def _asks_ahead(self) -> bool:
        """Refills ahead of need: not while Redis is down, nor once `close` began
        (a grant landing after the final release would stay with a stopped process)."""
        return not (self.stats.down or self._closing)

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
        self.stats.waits += 1
        try:
            for _ in range(MAX_REFILLS_PER_REQUEST):
                if lease.refill is None:
                    self._start_refill(token_id, lease)
                pending = lease.refill
                assert pending is not None
                # shielded: one client leaving must not cancel the others' call
                await asyncio.shield(pending)
                if lease.claim(self._clock()) or self.take(token_id, lease):
                    return True
                if self.stats.down or lease.room <= 0:
                    return False
            return False
        finally:
            lease.stop_waiting()

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
        lease.asked_at = lease.taken
        task = asyncio.create_task(self._run_refill(token_id, lease, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_refill(
        self, token_id: str, lease: Lease, future: asyncio.Future[None]
    ) -> None:
        debt = lease.debt
        try:
            reply = await self._call(token_id, lease, debt=debt)
            if reply is not None:
                lease.debt -= debt
                lease.apply(Grant.from_reply(reply), self._clock(), self.lease_max)
                self.stats.lease_calls += 1
        finally:
            lease.refill = None
            future.set_result(None)
        # what the waiters took may leave the lease half spent already: ask again now
        if lease.wants_prefetch() and self._asks_ahead():
            self._start_refill(token_id, lease)

    def _args(
        self, token_id: str, lease: Lease, *, want: int, give_back: int, debt: int
    ) -> list[int | str]:
        """The script's ARGV; `want` 0 is a release (takes nothing)."""
        basis = self._quota_basis(token_id)
        used, expires_at = basis if basis is not None else (0, 0.0)
        ttl = max(int(expires_at - self._wall_clock()), 0) + QUOTA_TTL_GRACE_S
        cap = lease.max_requests
        return [
            self.worker,
            max(lease.waiting - lease.reserved, 0) if want else 0,  # unserved
            give_back,
            debt,
            max(lease.limit, 1),
            self._window_us,
            -1 if cap is None else cap,
            used,
            ttl,
            HOLDER_TTL_MS,
            want,
        ]

    async def _call(
        self, token_id: str, lease: Lease, *, debt: int
    ) -> list[int] | None:
        """Take units for the waiting requests and the next `lease.want`; None, Redis
        marked down, on failure."""
        want = lease.want(self.lease_max)
        args = self._args(token_id, lease, want=want, give_back=0, debt=debt)
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
                            token_id, lease, want=0, give_back=units, debt=debt
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
        attempt = 0
        while not self._closed:
            await asyncio.sleep(RECONNECT.delay_s(attempt))
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self.redis.ping()
            except (RedisError, OSError, TimeoutError):
                attempt += 1
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
        self._closed = self._closing = False
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
        self._closing = True
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
