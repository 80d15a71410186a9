"""Exponential backoff with jitter: the one rule for retry and reconnect delays.

Imports nothing of the project, so every layer may use it: dispatcher retries, the
upstream connection retry, the token invalidation reconnect, worker restarts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# A random factor of exactly 1: the same delays every time.
NO_JITTER: Final = (1.0, 1.0)
# Past this many doublings every delay is the cap; 2.0**1024 would overflow.
_MAX_DOUBLINGS: Final = 64


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """base * 2**attempt, capped at `max_s`, times a random factor in `jitter`.

    The default band (0.5, 1.0) keeps a fleet from retrying in lockstep without ever
    waiting longer than the doubling says. `max_retries` is for callers that take
    their count of attempts from the policy; an endless reconnect loop ignores it.
    """

    max_retries: int = 5
    base_s: float = 0.5
    max_s: float = 30.0
    jitter: tuple[float, float] = (0.5, 1.0)

    def delay_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The pause before retry number `attempt + 1` (attempt 0: the first retry)."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))
        low, high = self.jitter
        return ceiling * (low + (high - low) * rand())
