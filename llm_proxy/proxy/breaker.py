"""The upstream circuit breaker: a closed / open / half-open state machine.

Owns the transitions and their timing (through an injected clock); knows nothing
about aiohttp, the upstream URL or which responses count as failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from ..clock import Clock


class BreakerState(StrEnum):
    """Breaker states; the values appear in logs, metrics and events."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateChange = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures, probes after a cooldown.

    - CLOSED: every call is allowed; a success resets the failure count.
    - OPEN: calls are refused until `cooldown_s` has passed since opening. The first
      `allow()` after that moves to HALF_OPEN and lets exactly one probe through.
    - HALF_OPEN: further calls are refused while the probe is in flight. Its success
      closes the breaker; its failure re-opens it with a fresh cooldown.

    The move to HALF_OPEN happens lazily inside `allow()`, so `state` keeps reading
    OPEN after the cooldown until somebody asks. A probe whose outcome is never
    recorded (its request was cancelled) would wedge the breaker in HALF_OPEN, so a
    probe older than `probe_timeout_s` (default: `cooldown_s`) is written off and the
    next `allow()` grants a new one.

    Results recorded while OPEN come from requests that started before it opened;
    they neither close it nor extend the cooldown. There is no `await` between
    reading and writing the state, so no lock is needed. `on_change(old, new)` runs
    after every transition, with the new state already in place.
    """

    __slots__ = (
        "_clock",
        "_consecutive_failures",
        "_cooldown_s",
        "_failure_threshold",
        "_opened_at",
        "_probe_started_at",
        "_probe_timeout_s",
        "_state",
        "on_change",
    )

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Clock = time.monotonic,
        *,
        on_change: StateChange | None = None,
        probe_timeout_s: float | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(
                f"failure_threshold must be >= 1, got {failure_threshold!r}"
            )
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be positive, got {cooldown_s!r}")
        self._failure_threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._probe_timeout_s = (
            cooldown_s if probe_timeout_s is None else probe_timeout_s
        )
        self._clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_started_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN -> HALF_OPEN happens in `allow()`)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures recorded since the last success."""
        return self._consecutive_failures

    def allow(self) -> bool:
        """Say whether a call may go upstream now; may start the half-open probe."""
        state = self._state
        if state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if state is BreakerState.OPEN:
            if now - self._opened_at < self._cooldown_s:
                return False
            self._probe_started_at = now
            self._transition(BreakerState.HALF_OPEN)
            return True
        if now - self._probe_started_at >= self._probe_timeout_s:
            self._probe_started_at = now  # the previous probe was written off
            return True
        return False

    def record_success(self) -> None:
        """Record an upstream success: resets the count; a probe success closes."""
        if self._state is BreakerState.OPEN:
            return
        self._consecutive_failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """Record an upstream failure: may open, and a probe failure re-opens."""
        self._consecutive_failures += 1
        state = self._state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED
            and self._consecutive_failures >= self._failure_threshold
        ):
            self._opened_at = self._clock()
            self._transition(BreakerState.OPEN)

    def retry_after_s(self) -> float:
        """Seconds a refused caller should wait: 0 when closed, at least 1 otherwise."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        if self._state is BreakerState.HALF_OPEN:
            return 1.0
        left = self._opened_at + self._cooldown_s - self._clock()
        return max(1.0, left)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        if self.on_change is not None:
            self.on_change(old, new)
