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

# Largest lease one process takes at a time (FLEET_LEASE_MAX). With 20 a Redis call
# (~110 µs CPU measured here) costs ~6 µs per request; a SIGKILL strands at most this
# many requests per token the killed process was serving.
DEFAULT_LEASE_MAX: Final = 20
# A refused lease is remembered this long, so a spent token costs no Redis call per
# request; units released elsewhere become visible after at most this.
REFUSAL_CACHE_S: Final = 1.0

Limit = Literal["rate", "quota"]


def lease_size(room: int, holders: int, lease_max: int) -> int:
    """How many units a lease takes: a share of what is left, 1 near the limit.

    `room` is what the fleet has unleased and `holders` the processes holding leases
    of the token: taking at most half of an equal share leaves the rest to the
    others, and the size falls to 1 as the budget runs out, so no process can hold
    more than one unit the others are refused for. The lease script applies the same
    rule atomically, with the room and holders of the moment (a grant is never
    smaller than the number of requests waiting for it, all spent at once); here it
    sets the low-water mark for the next prefetch.
    """
    share = room // (2 * max(holders, 1))
    return max(1, min(lease_max, share))


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
    `fleet_limits.FleetLimiter` through `apply`. `refill` is the one call in flight for
    the token, which every request that finds the lease empty awaits (coalescing).
    """

    __slots__ = (
        "debt",
        "last_used",
        "limit",
        "low_water",
        "max_requests",
        "next_want",
        "refill",
        "refusal",
        "reset_after_s",
        "room",
        "units",
        "waiting",
    )

    def __init__(self, limit: int, max_requests: int | None) -> None:
        self.limit = limit
        self.max_requests = max_requests
        self.units = 0
        self.room = 1  # unknown: assume there is some, so the first call asks
        self.next_want = 1
        self.low_water = 0
        self.refusal: Refusal | None = None
        self.reset_after_s = 0.0
        self.last_used = 0.0
        self.waiting = 0  # requests awaiting `refill`
        self.refill: asyncio.Future[None] | None = None
        self.debt = 0  # admitted by the local fallback while Redis was away

    def take(self, now: float) -> bool:
        """Spend one unit if there is one."""
        if self.units:
            self.units -= 1
            self.last_used = now
            return True
        return False

    def give_back(self) -> None:
        """A spent unit was not used after all (the call never reached upstream)."""
        self.units += 1

    def wants_prefetch(self) -> bool:
        """Low on units, nothing in flight, and the fleet still has room: ask ahead."""
        return self.units <= self.low_water and self.refill is None and self.room > 0

    def cached_refusal(self, now: float) -> Refusal | None:
        """The last refusal, while it may still be trusted."""
        refusal = self.refusal
        if refusal is not None and now < refusal.until:
            return refusal
        return None

    def apply(self, grant: Grant, now: float, lease_max: int) -> None:
        """Add a grant and note what it says of the fleet's remaining budget."""
        self.units += grant.granted
        room = grant.room
        self.room = room
        self.reset_after_s = grant.reset_after_s
        self.next_want = lease_size(room, grant.holders, lease_max)
        self.low_water = self.next_want // 4
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
