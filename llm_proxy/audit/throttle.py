"""The bound on refused sign-ins written to the audit trail: a rate cap per client.

A flood of bad credentials must not flood the table. Per client (surface and address)
at most `per_client` refusals are recorded per window, and at most `total` across all
clients; the rest are counted, and the next record of that client tells how many of
its refusals were held back since its last one. Pure: the caller passes no time, the
clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from ..clock import Clock

PER_CLIENT: Final = 5
TOTAL: Final = 100
WINDOW_S: Final = 60.0
# Clients remembered at once; the least recently seen goes first (an address space
# as large as IPv6's must not grow this table).
MAX_CLIENTS: Final = 4096


@dataclass(slots=True)
class _Client:
    window: int
    recorded: int = 0
    held_back: int = 0


class FailureThrottle:
    """Decides which refused sign-ins are recorded; counts the ones that are not."""

    def __init__(
        self,
        *,
        per_client: int = PER_CLIENT,
        total: int = TOTAL,
        window_s: float = WINDOW_S,
        max_clients: int = MAX_CLIENTS,
        clock: Clock = time.monotonic,
    ) -> None:
        self._per_client = per_client
        self._total = total
        self._window_s = window_s
        self._max_clients = max_clients
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._window = -1
        self._recorded = 0  # across clients, in the current window
        self.suppressed = 0  # every refusal held back since start

    def admit(self, client: str) -> int | None:
        """None: hold this one back (counted); else record it, and this many of the
        client's refusals were held back since its last record."""
        window = int(self._clock() // self._window_s)
        if window != self._window:
            self._window, self._recorded = window, 0
        state = self._state(client, window)
        if state.recorded >= self._per_client or self._recorded >= self._total:
            state.held_back += 1
            self.suppressed += 1
            return None
        state.recorded += 1
        self._recorded += 1
        held_back, state.held_back = state.held_back, 0
        return held_back

    def _state(self, client: str, window: int) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(window)
            if len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
            if state.window != window:
                state.window, state.recorded = window, 0
        return state
