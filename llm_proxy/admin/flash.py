"""One-time slots: what a post/redirect/get carries from the POST to the page it lands
on (a confirmation message, a new token's value). In memory, bounded in count and
lifetime, each read at most once; no HTTP here.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from ..clock import Clock

T = TypeVar("T")

KEY_BYTES: Final = 16  # 128 random bits: a slot id cannot be guessed
NOTICE_SLOTS: Final = 256
NOTICE_LIFETIME_S: Final = 120.0
VALUE_SLOTS: Final = 64
VALUE_LIFETIME_S: Final = 120.0  # the redirect is followed at once; a minute is ample


class OneTimeSlots(Generic[T]):
    """Values under random ids: `put` stores one, `take` hands it out once.

    At most `capacity` slots are held (the oldest is dropped to make room) and each
    lives `lifetime_s`; both bounds hold however many ids are never taken.
    """

    def __init__(
        self, *, capacity: int, lifetime_s: float, clock: Clock = time.monotonic
    ) -> None:
        self._capacity = capacity
        self._lifetime_s = lifetime_s
        self._clock = clock
        self._slots: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, value: T) -> str:
        """Keep `value`; the id to take it back with."""
        now = self._clock()
        self._drop_expired(now)
        while len(self._slots) >= self._capacity:
            self._slots.popitem(last=False)
        key = secrets.token_urlsafe(KEY_BYTES)
        self._slots[key] = (now + self._lifetime_s, value)
        return key

    def take(self, key: str) -> T | None:
        """The value under `key`, removed; None if unknown, taken or expired."""
        slot = self._slots.pop(key, None)
        if slot is None or slot[0] <= self._clock():
            return None
        return slot[1]

    def _drop_expired(self, now: float) -> None:
        # Insertion order is expiry order: every slot lives the same time.
        while self._slots:
            deadline, _ = next(iter(self._slots.values()))
            if deadline > now:
                return
            self._slots.popitem(last=False)


@dataclass(frozen=True, slots=True)
class MintedValue:
    """A new token's value, waiting to be shown once on that token's page."""

    token_id: str
    value: str = field(repr=False)
