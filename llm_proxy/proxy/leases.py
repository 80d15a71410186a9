"""Fleet-limit leases: one process's slice of a token's shared budget, and its policy.

A unit of a lease is one request the fleet's Redis admitted for this process: taken
from the token's hourly GCRA and its lifetime cap in one atomic step, so spending it
needs no further check. This module is the arithmetic only (how much to ask for, when
to ask again, when to refuse without asking); `fleet_limits.py` does the Redis calls.
No I/O and no clock of its own: callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal

# Most units of a token one process holds (FLEET_LEASE_MAX): what a SIGKILL can
# strand per token at most. 256: four times the 64 calls that 64 busy connections
# bring in one loop turn (`LEASE_HEADROOM`).
DEFAULT_LEASE_MAX: Final = 256
# Smallest lease asked for away from the limits: at most one Redis call (about
# 500,000 instructions with redis-py, half a proxied call) per this many requests.
LEASE_FLOOR: Final = 20
# A lease is sized to this many times the requests spent while its last refill was
# in flight, so a refill asked for at half the lease lands before the rest is spent.
LEASE_HEADROOM: Final = 4
# With less demand a lease shrinks by at most 1/this per refill (bursts come back).
LEASE_SHRINK: Final = 16
# A refused lease is remembered this long, so a spent token costs no Redis call per
# request; units released elsewhere become visible after at most this.
REFUSAL_CACHE_S: Final = 1.0

Limit = Literal["rate", "quota"]


def lease_size(room: int, holders: int, lease_max: int) -> int:
    """The most a lease may take: a share of what is left, 1 near the limit.

    `room` is what the fleet has unleased and `holders` the processes holding leases
    of the token: taking at most half of an equal share leaves the rest to the
    others, and the size falls to 1 as the budget runs out, so no process can hold
    more than one unit the others are refused for. The lease script applies the same
    rule atomically, with the room and holders of the moment (a grant is never
    smaller than the number of requests waiting for it, all spent at once); here it
    caps the size the next refill asks for.
    """
    share = room // (2 * max(holders, 1))
    return max(1, min(lease_max, share))


def next_size(size: int, in_flight: int, share: int, lease_max: int) -> tuple[int, int]:
    """(size, low-water mark) of a lease after a grant.

    The size is `LEASE_HEADROOM` times the requests spent while the refill was in
    flight (`in_flight`, counting those that waited), at least `LEASE_FLOOR`, shrinking
    slowly, never above `lease_max` nor the fair `share` (half of an equal share of
    the room). Far from the limits the next refill is asked for once half of it is
    spent; when the share caps the size, only once it is empty, so that no process
    holds more than one unit the others are refused for.
    """
    wanted = max(LEASE_FLOOR, LEASE_HEADROOM * in_flight, size - size // LEASE_SHRINK)
    new = max(1, min(wanted, share, lease_max))
    return new, new // 2 if share >= wanted else 0


@dataclass(frozen=True, slots=True)
class Grant:
    """One answer of the lease script (see `fleet_limits.LEASE_SCRIPT`)."""

    granted: int
    rate_room: int  # rate cells still free fleet-wide after the grant
    quota_room: int | None  # lifetime requests still unleased; None: no cap
    holders: int  # processes holding a lease of this token
    retry_after_s: float  # until the next rate cell, when rate_room is 0
    reset_after_s: float  # until the whole hourly allowance is back

    @property
    def room(self) -> int:
        """Requests the fleet could still lease right now."""
        if self.quota_room is None:
            return self.rate_room
        return min(self.rate_room, self.quota_room)

    @property
    def limited_by(self) -> Limit:
        """Which limit is spent when `room` is 0 (the lifetime cap wins: it is final)."""
        return "quota" if self.quota_room == 0 else "rate"

    @classmethod
    def from_reply(cls, reply: list[int]) -> Grant:
        """Read the script's reply: six integers, times in microseconds."""
        granted, rate_room, quota_room, holders, retry_us, reset_us = reply[:6]
        return cls(
            int(granted),
            max(int(rate_room), 0),
            None if int(quota_room) < 0 else int(quota_room),
            int(holders),
            max(int(retry_us), 0) / 1e6,
            max(int(reset_us), 0) / 1e6,
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A spent limit, remembered until `until` so that asking again is not needed."""

    limit: Limit
    retry_at: float  # when the next rate cell frees (monotonic); quota: never
    until: float  # stop trusting this refusal (ask Redis again) after this

    def retry_after_s(self, now: float) -> float:
        """Seconds a client should wait (at least 1 s is sent in the header)."""
        return max(self.retry_at - now, 0.0)


class Lease:
    """This process's units of one token, and what it knows of the fleet's rest.

    Spent synchronously on the request path (`take`, `give_back`); refilled by
    `fleet_limits.FleetLimiter` through `apply`, in the background once half of
    `size` is spent. `refill` is the one call in flight for the token, which every
    request that finds the lease empty awaits (coalescing); `apply` sets aside a unit
    for each of them (`reserved`, taken with `claim`) before newcomers can spend it.
    """

    __slots__ = (
        "asked_at",
        "debt",
        "last_used",
        "limit",
        "low_water",
        "max_requests",
        "refill",
        "refusal",
        "reserved",
        "reset_after_s",
        "room",
        "size",
        "taken",
        "units",
        "waiting",
    )

    def __init__(self, limit: int, max_requests: int | None) -> None:
        self.limit = limit
        self.max_requests = max_requests
        self.units = 0
        self.room = 1  # unknown: assume there is some, so the first call asks
        self.size = LEASE_FLOOR
        self.low_water = LEASE_FLOOR // 2
        self.taken = 0  # units spent so far (sizes the lease to its demand)
        self.asked_at = 0  # `taken` when the refill in flight was asked for
        self.refusal: Refusal | None = None
        self.reset_after_s = 0.0
        self.last_used = 0.0
        self.waiting = 0  # requests awaiting `refill`
        self.reserved = 0  # units set aside for them
        self.refill: asyncio.Future[None] | None = None
        self.debt = 0  # admitted by the local fallback while Redis was away

    def take(self, now: float) -> bool:
        """Spend one unit if there is one."""
        if self.units:
            self.units -= 1
            self.taken += 1
            self.last_used = now
            return True
        return False

    def give_back(self) -> None:
        """A spent unit was not used after all (the call never reached upstream)."""
        self.units += 1

    def wants_prefetch(self) -> bool:
        """Half spent, nothing in flight, and the fleet still has room: ask ahead."""
        return self.units <= self.low_water and self.refill is None and self.room > 0

    def want(self, lease_max: int) -> int:
        """Units the next refill asks for: `size`, never holding above `lease_max`."""
        return max(1, min(self.size, lease_max - self.units))

    def claim(self, now: float) -> bool:
        """A waiting request takes the unit its refill set aside, if there is one."""
        if not self.reserved:
            return False
        self.reserved -= 1
        self.units += 1
        return self.take(now)

    def stop_waiting(self) -> None:
        """A request stops waiting; units set aside for nobody return to the lease."""
        self.waiting -= 1
        spare = self.reserved - self.waiting
        if spare > 0:
            self.reserved -= spare
            self.units += spare

    def cached_refusal(self, now: float) -> Refusal | None:
        """The last refusal, while it may still be trusted."""
        refusal = self.refusal
        if refusal is not None and now < refusal.until:
            return refusal
        return None

    def apply(self, grant: Grant, now: float, lease_max: int) -> None:
        """Add a grant, serve the waiting requests first, resize to the demand, and
        note what the grant says of the fleet's remaining budget."""
        self.units += grant.granted
        waiters = min(self.units, self.waiting - self.reserved)
        if waiters > 0:
            self.units -= waiters
            self.reserved += waiters
        room = grant.room
        self.room = room
        self.reset_after_s = grant.reset_after_s
        in_flight = self.taken - self.asked_at + self.waiting
        share = room // (2 * max(grant.holders, 1))
        self.size, self.low_water = next_size(self.size, in_flight, share, lease_max)
        if room > 0:
            self.refusal = None
            return
        limit = grant.limited_by
        retry = grant.retry_after_s if limit == "rate" else float("inf")
        self.refusal = Refusal(limit, now + retry, now + min(retry, REFUSAL_CACHE_S))

    def forget_room(self) -> None:
        """Redis was away: what it said of the fleet's budget is stale."""
        self.room = 1
        self.refusal = None
