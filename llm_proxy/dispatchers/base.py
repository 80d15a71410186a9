"""The delivery loop shared by every backend: retries, dead letters, lag, health.

A `Backend` only knows how to send one batch and says which events failed and how;
`Dispatcher` owns the policy: transient failures (5xx, 429, connection errors,
timeouts) are retried with exponential backoff and jitter, permanent ones (other 4xx)
are not, and whatever is still undelivered after the last retry is appended to a
dead-letter JSONL file. A batch is acknowledged to the bus only once it was either
delivered or dead-lettered, so a killed dispatcher on the Redis bus loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol

import orjson

from ..accounting.metrics import Metrics
from ..backoff import RetryPolicy as RetryPolicy  # also importable from here
from ..clock import Clock, utc_now_iso
from ..domain_errors import ProxyError
from ..events.model import BaseEvent, EventT, Subscription
from ..private_files import open_private_append
from .records import event_time_s

log = logging.getLogger(__name__)


class DeliveryError(ProxyError):
    """A whole batch failed; `permanent` says whether retrying can help."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(slots=True)
class SendResult(Generic[EventT]):
    """Per-event outcome of a batch: events to retry, and events refused for good."""

    retry: list[EventT] = field(default_factory=list)
    retry_reason: str = ""
    rejected: list[tuple[EventT, str]] = field(default_factory=list)


class Backend(Protocol[EventT]):
    """Where a dispatcher delivers events."""

    name: str

    async def start(self) -> None: ...

    async def send(self, batch: Sequence[EventT]) -> SendResult[EventT]:
        """Deliver `batch`; raise `DeliveryError` when the whole batch failed."""
        ...

    async def close(self) -> None: ...


def is_transient_status(status: int) -> bool:
    """5xx, 429 and 408 are worth retrying; any other 4xx is the payload's fault."""
    return status >= 500 or status in (408, 429)


class DeadLetterFile:
    """Append-only JSONL of events no backend accepted, with the reason (fsynced).

    Created mode 0600 (its folders 0700): it holds whole events.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def append(
        self, service: str, failed: Sequence[tuple[BaseEvent, str]]
    ) -> None:
        """Write one line per failed event, off the event loop."""
        now = utc_now_iso()
        lines = b"".join(
            orjson.dumps(
                {
                    "service": service,
                    "reason": reason,
                    "failed_at": now,
                    "event": event.to_json_dict(),
                },
                default=dict,
            )
            + b"\n"
            for event, reason in failed
        )
        await asyncio.to_thread(self._write, lines)

    def _write(self, data: bytes) -> None:
        with open_private_append(self.path) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every dead-lettered entry (for tests and operators)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            return [orjson.loads(line) for line in file if line.strip()]


def event_age_s(event: BaseEvent, now: float) -> float:
    """Seconds between an event's timestamp and `now` (epoch seconds)."""
    stamp = event_time_s(event)
    return max(0.0, now - stamp) if stamp else 0.0


class Dispatcher(Generic[EventT]):
    """Consumes one subscription and delivers its batches to one backend."""

    def __init__(
        self,
        backend: Backend[EventT],
        subscription: Subscription[EventT],
        dead_letter: DeadLetterFile,
        *,
        retry: RetryPolicy | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Clock = time.time,
        dead_letter_on_cancel: bool = True,
    ) -> None:
        self.backend = backend
        self.subscription = subscription
        self.dead_letter = dead_letter
        self.retry = retry or RetryPolicy()
        self.metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._dead_letter_on_cancel = dead_letter_on_cancel
        self.delivered = 0
        self.dead_lettered = 0
        self.failures = 0  # consecutive failed attempts; 0 = healthy
        self.lag_s = 0.0
        self._unwritten = False  # a dead letter of the current batch failed to write

    @property
    def name(self) -> str:
        return self.backend.name

    async def run(self) -> None:
        """Deliver batches until the subscription ends (bus closed or cancelled)."""
        await self.backend.start()
        try:
            async for batch in self.subscription:
                await self._handle(batch)
        finally:
            await self.subscription.close()
            await self.backend.close()
            log.info(
                "dispatcher %s stopped: %d delivered, %d dead-lettered",
                self.name,
                self.delivered,
                self.dead_lettered,
            )

    async def _handle(self, batch: list[EventT]) -> None:
        self._unwritten = False
        try:
            await self.deliver(batch)
        except asyncio.CancelledError:
            if self._dead_letter_on_cancel:
                await asyncio.shield(
                    self._give_up(batch, "dispatcher stopped before delivery")
                )
            raise
        except Exception:  # a bug must not stop the loop; the batch is kept
            log.exception("dispatcher %s failed on a batch", self.name)
            await self._give_up(batch, "dispatcher error")
        if not self._unwritten:  # else left to the bus: Redis delivers it again
            await self.subscription.ack(batch)

    async def deliver(self, batch: Sequence[EventT]) -> None:
        """Send with retries; dead-letter what cannot be delivered."""
        pending = list(batch)
        reason = ""
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                await self._sleep(self.retry.delay_s(attempt - 1))
            try:
                result = await self.backend.send(pending)
            except DeliveryError as exc:
                self._failed("permanent" if exc.permanent else "transient", exc.reason)
                if exc.permanent:
                    await self._give_up(pending, exc.reason)
                    return
                reason = exc.reason
                continue
            if result.rejected:
                self._failed("permanent", result.rejected[0][1])
                await self._give_up(result.rejected, None)
            done = len(pending) - len(result.retry) - len(result.rejected)
            self._delivered(pending, done, result)
            pending, reason = result.retry, result.retry_reason
            if not pending:
                return
            self._failed("transient", reason)
        await self._give_up(
            pending, f"gave up after {self.retry.max_retries} retries: {reason}"
        )

    def _delivered(
        self, sent: Sequence[EventT], count: int, result: SendResult[EventT]
    ) -> None:
        if count <= 0:
            return
        self.delivered += count
        if self.failures and not result.retry:
            log.info(
                "dispatcher %s recovered after %d failures", self.name, self.failures
            )
            self.failures = 0
        self.lag_s = event_age_s(sent[-1], self._clock())
        if self.metrics is not None:
            self.metrics.dispatched.labels(self.name, "delivered").inc(count)
            self.metrics.dispatcher_lag.labels(self.name).set(self.lag_s)
            self.metrics.dispatcher_healthy.labels(self.name).set(1)

    def _failed(self, kind: str, reason: str) -> None:
        self.failures += 1
        log.warning(
            "dispatcher %s: %s delivery failure #%d: %s",
            self.name,
            kind,
            self.failures,
            reason,
        )
        if self.metrics is not None:
            self.metrics.dispatch_failures.labels(self.name, kind).inc()
            self.metrics.dispatcher_healthy.labels(self.name).set(0)

    async def _give_up(
        self,
        events: Sequence[EventT] | Sequence[tuple[EventT, str]],
        reason: str | None,
    ) -> None:
        failed = [
            item if isinstance(item, tuple) else (item, reason or "") for item in events
        ]
        if not failed:
            return
        try:
            await self.dead_letter.append(self.name, failed)
        except OSError as exc:  # a full disk must not stop the loop for good
            self._unwritten = True
            log.error(
                "dispatcher %s could not dead-letter %d events to %s (%s); their "
                "batch stays unacknowledged (the Redis bus delivers it again, the "
                "memory bus cannot)",
                self.name,
                len(failed),
                self.dead_letter.path,
                exc,
            )
            return
        self.dead_lettered += len(failed)
        log.error(
            "dispatcher %s dead-lettered %d events to %s: %s",
            self.name,
            len(failed),
            self.dead_letter.path,
            failed[0][1],
        )
        if self.metrics is not None:
            self.metrics.dispatched.labels(self.name, "dead_lettered").inc(len(failed))
