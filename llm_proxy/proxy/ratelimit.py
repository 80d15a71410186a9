"""Per-key hourly request limits (GCRA) with an injected clock.

Owns the limiter maths and the small `Limiter` seam a Redis-backed variant will fill;
knows nothing about aiohttp, tokens or how keys are chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

from ..clock import Clock

WINDOW_S: Final = 3600.0
# Float slack for comparisons: sums of T = 3600/limit drift by a few ulps, which must
# not turn the limit-th request of a burst into a refusal (limit=7 does, without it).
_EPS: Final = 1e-6


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of one `try_acquire`: everything a 429 or `RateLimit-*` header needs."""

    allowed: bool
    limit: int
    remaining: int  # requests that would still be allowed right now
    retry_after_s: float  # 0.0 when allowed; else wait this long for the next slot
    reset_after_s: float  # until the whole allowance is available again


class Limiter(Protocol):
    """The seam between the rate-limit middleware and a limiter implementation."""

    def try_acquire(self, key: str, limit_per_hour: int) -> Decision:
        """Count one request for `key` if allowed, and say whether it was."""
        ...

    def refund(self, key: str) -> None:
        """Give back one slot `try_acquire` granted (the call was refused after all)."""
        ...


def _refuse_all(window_s: float) -> Decision:
    return Decision(False, 0, 0, window_s, window_s)


class GcraLimiter:
    """In-process GCRA limiter: O(1) per call, one float and one int per active key.

    GCRA with emission interval T = window/limit and burst tolerance window - T: a
    fresh key may spend its whole allowance at once, spent slots come back one every
    T, and over time a key averages at most `limit` per window. This is a leaky
    bucket, not a sliding log: a key that bursts and then keeps claiming each slot
    as it frees can reach 2*limit - 1 requests inside one window (no O(1) scheme can
    allow a full burst and also cap every window at `limit`). After `t` seconds a key
    has had at most `limit + t / T` requests.

    State per key is its theoretical arrival time (TAT) and the limit it was last
    used with. When the limit changes, the requests still counted against the key
    carry over (capped at the new limit), so raising a limit frees the difference at
    once and lowering it never grants extra. A key whose TAT is in the past has its
    full allowance back and is indistinguishable from an unseen key, so `prune` can
    drop it; `try_acquire` calls `prune` every `prune_every` calls to bound memory.

    A limit below 1 refuses every request (it is "zero per hour", not "unlimited").
    """

    __slots__ = ("_calls", "_clock", "_prune_every", "_state", "_window_s")

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        window_s: float = WINDOW_S,
        prune_every: int = 10_000,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        if prune_every < 1:
            raise ValueError(f"prune_every must be at least 1, got {prune_every!r}")
        self._clock = clock
        self._window_s = window_s
        self._prune_every = prune_every
        self._calls = 0
        self._state: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        """Number of keys currently tracked."""
        return len(self._state)

    def try_acquire(self, key: str, limit_per_hour: int) -> Decision:
        """Count one request for `key` against `limit_per_hour` if it fits."""
        now = self._clock()
        self._calls += 1
        if self._calls >= self._prune_every:
            self._calls = 0
            self.prune(now)
        if limit_per_hour < 1:
            return _refuse_all(self._window_s)
        window = self._window_s
        interval = window / limit_per_hour
        tat = self._current_tat(key, limit_per_hour, interval, now)
        new_tat = tat + interval
        allow_at = new_tat - window
        if now + _EPS < allow_at:
            self._state[key] = (tat, limit_per_hour)
            return Decision(False, limit_per_hour, 0, allow_at - now, tat - now)
        self._state[key] = (new_tat, limit_per_hour)
        remaining = int((now + window - new_tat) / interval + _EPS)
        return Decision(True, limit_per_hour, remaining, 0.0, new_tat - now)

    def refund(self, key: str) -> None:
        """Give back one granted slot of `key`: its TAT moves back one interval.

        Never below now, so a refund can restore at most the full allowance; the
        interval is that of the limit the slot was counted with.
        """
        state = self._state.get(key)
        if state is None:
            return
        tat, limit = state
        earlier = tat - self._window_s / limit
        if earlier <= self._clock() + _EPS:
            del self._state[key]  # the whole allowance is back: as if never seen
        else:
            self._state[key] = (earlier, limit)

    def prune(self, now: float | None = None) -> int:
        """Forget keys that have their full allowance back; return how many."""
        if now is None:
            now = self._clock()
        idle = [key for key, (tat, _) in self._state.items() if tat <= now]
        for key in idle:
            del self._state[key]
        return len(idle)

    def _current_tat(self, key: str, limit: int, interval: float, now: float) -> float:
        state = self._state.get(key)
        if state is None:
            return now
        tat, old_limit = state
        if tat <= now:
            return now
        if old_limit != limit:
            outstanding = (tat - now) / (self._window_s / old_limit)
            return now + min(outstanding, float(limit)) * interval
        return tat
