"""Retention: dead tokens, old usage events and old audit records go in short batches.

What goes: tokens that expired, or were revoked (migration 005 dates revocations), more
than `TOKEN_RETENTION_DAYS` ago, usage events older than `USAGE_RETENTION_DAYS` and
audit records older than `AUDIT_RETENTION_DAYS`.
Deleting a token leaves a tombstone (migration 004), so every process's token table
drops it at its next reload. Projects are never deleted here (only by the management
API), and neither are their active tokens: an inactive project's tokens work again when
it is reactivated. Usage events outlive the tokens they name.

`Purger.run` holds the database's purge lock (`Repository.purge_lock`), so one
process of a fleet purges at a time; each batch is one short DELETE committed on its
own, with a pause between batches, and a run stops after `max_run_s` (the rest goes
next time). `RetentionJob` runs it in the proxy every `PURGE_INTERVAL`, jittered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Protocol

from ..accounting.metrics import Metrics
from ..clock import Clock, utc_iso, utc_now
from ..config import RetentionSettings
from ..storage import PurgeCounts, Repository

log = logging.getLogger(__name__)

# Rows per DELETE. Only SQLite locks anything beyond the rows: its write lock, for the
# whole file, is held for one batch. On a 2-core machine shared with other test runs,
# a usage row took about 0.06 ms to delete (four indexes) and a token about twice
# that (its tombstone, six indexes), so a batch holds that lock roughly 0.1 s.
TOKEN_BATCH_ROWS: Final = 1000
USAGE_BATCH_ROWS: Final = 2000
AUDIT_BATCH_ROWS: Final = 2000  # six indexes like a token's, but far fewer rows
# Between two batches the other writers (usage inserts, count flushes) get the table.
BATCH_PAUSE_S: Final = 0.05
# A scheduled run stops after this long; the lock's lease outlasts it by the margin.
MAX_RUN_S: Final = 300.0
LEASE_MARGIN_S: Final = 60.0
# The first scheduled run comes this long after start (at most one interval), times a
# random factor in [0.5, 1): a fleet restarted at once does not purge at once.
FIRST_RUN_DELAY_S: Final = 300.0
JITTER: Final = 0.1  # later runs: the interval times a factor in [0.9, 1.1]
# The schema version that dates revocations (migration 005).
SCHEMA_VERSION: Final = 5
STOP_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Rows older than these go; None: that kind is kept forever."""

    tokens_before: datetime | None
    usage_before: datetime | None
    audit_before: datetime | None = None

    @property
    def any(self) -> bool:
        """Whether anything is purged at all."""
        kinds = (self.tokens_before, self.usage_before, self.audit_before)
        return any(before is not None for before in kinds)


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """One purge run: the cut-offs, what it deleted, how long it took."""

    cutoffs: Cutoffs
    deleted: PurgeCounts
    seconds: float
    complete: bool  # False: stopped at its time bound with rows left


def cutoffs_at(settings: RetentionSettings, now: datetime) -> Cutoffs:
    """The cut-offs of `settings` at the moment `now`."""

    def before(days: int | None) -> datetime | None:
        return None if days is None else now - timedelta(days=days)

    return Cutoffs(
        before(settings.token_days),
        before(settings.usage_days),
        before(settings.audit_days),
    )


class _BatchPurge(Protocol):
    async def __call__(self, *, before: datetime, limit: int) -> int: ...


class Purger:
    """Deletes what retention lets go, in batches, under the database's purge lock."""

    def __init__(
        self,
        repository: Repository,
        settings: RetentionSettings,
        *,
        max_run_s: float = MAX_RUN_S,
        pause_s: float = BATCH_PAUSE_S,
        token_batch_rows: int = TOKEN_BATCH_ROWS,
        usage_batch_rows: int = USAGE_BATCH_ROWS,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._max_run_s = max_run_s
        self._pause_s = pause_s
        self._token_batch_rows = token_batch_rows
        self._usage_batch_rows = usage_batch_rows
        self._clock = clock
        self._monotonic = monotonic
        self._stopping = asyncio.Event()

    def cutoffs(self) -> Cutoffs:
        """The cut-offs as of now."""
        return cutoffs_at(self._settings, self._clock())

    async def preview(self) -> tuple[Cutoffs, PurgeCounts]:
        """What a run now would delete (a dry run: nothing changes)."""
        cutoffs = self.cutoffs()
        counts = await self._repository.count_purgeable(
            tokens_before=cutoffs.tokens_before, usage_before=cutoffs.usage_before
        )
        if cutoffs.audit_before is not None:
            audit = await self._repository.count_old_audit_events(
                before=cutoffs.audit_before
            )
            counts = replace(counts, audit_events=audit)
        return cutoffs, counts

    async def run(self) -> PurgeReport | None:
        """Purge now; None when another process holds the purge lock."""
        cutoffs = self.cutoffs()
        if not cutoffs.any:
            return PurgeReport(cutoffs, PurgeCounts(), 0.0, complete=True)
        lease_s = self._max_run_s + LEASE_MARGIN_S
        async with self._repository.purge_lock(lease_s=lease_s) as held:
            if not held:
                log.info("retention purge skipped: another process holds the lock")
                return None
            report = await self._purge(cutoffs)
        _log_report(report)
        return report

    def stop(self) -> None:
        """Make a run in progress stop after its current batch."""
        self._stopping.set()

    async def _purge(self, cutoffs: Cutoffs) -> PurgeReport:
        started = self._monotonic()
        deadline = started + self._max_run_s
        tokens = usage_events = 0
        complete = True
        repository = self._repository
        if cutoffs.tokens_before is not None:
            tokens, complete = await self._drain(
                repository.purge_tokens,
                cutoffs.tokens_before,
                self._token_batch_rows,
                deadline,
            )
        if cutoffs.usage_before is not None and complete:
            usage_events, complete = await self._drain(
                repository.purge_usage_events,
                cutoffs.usage_before,
                self._usage_batch_rows,
                deadline,
            )
        audit_events = 0
        if cutoffs.audit_before is not None and complete:
            audit_events, complete = await self._drain(
                repository.purge_audit_events,
                cutoffs.audit_before,
                AUDIT_BATCH_ROWS,
                deadline,
            )
        elapsed = self._monotonic() - started
        deleted = PurgeCounts(tokens, usage_events, audit_events)
        return PurgeReport(cutoffs, deleted, elapsed, complete)

    async def _drain(
        self, purge: _BatchPurge, before: datetime, rows: int, deadline: float
    ) -> tuple[int, bool]:
        """Delete batches until one comes back short; (rows deleted, all gone)."""
        deleted = 0
        while True:
            started = self._monotonic()
            batch = await purge(before=before, limit=rows)
            took_s = self._monotonic() - started
            log.debug("retention batch: %d of %d rows in %.3f s", batch, rows, took_s)
            deleted += batch
            if batch < rows:
                return deleted, True
            if self._monotonic() >= deadline:
                return deleted, False
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._pause_s)
            if self._stopping.is_set():
                return deleted, False


def _log_report(report: PurgeReport) -> None:
    cutoffs, deleted = report.cutoffs, report.deleted
    log.info(
        "retention purge deleted %d tokens (dead before %s), %d usage events "
        "(before %s) and %d audit events (before %s) in %.2f s%s",
        deleted.tokens,
        format_cutoff(cutoffs.tokens_before),
        deleted.usage_events,
        format_cutoff(cutoffs.usage_before),
        deleted.audit_events,
        format_cutoff(cutoffs.audit_before),
        report.seconds,
        ""
        if report.complete
        else "; stopped at its time bound, the rest goes next run",
    )


def format_cutoff(moment: datetime | None) -> str:
    """A cut-off as `2025-01-31T12:00:00Z`, or `never` for a kind kept forever."""
    if moment is None:
        return "never"
    return utc_iso(moment)


class RetentionJob:
    """The proxy's scheduled purge: the first run a while after start, then every
    interval (jittered), each one skipped where another process holds the lock."""

    def __init__(
        self,
        purger: Purger,
        interval_s: float,
        *,
        metrics: Metrics | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._purger = purger
        self._interval_s = interval_s
        self._metrics = metrics
        self._uniform = uniform
        self._task: asyncio.Task[None] | None = None
        self._running = False  # a run is in progress (not sleeping between runs)
        self._closing = False
        self.last_report: PurgeReport | None = None

    def start(self) -> None:
        """Schedule the runs in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop: a run in progress ends after its current batch (or is cancelled)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._purger.stop()
        if not self._running or not await _finishes(task, STOP_TIMEOUT_S):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> PurgeReport | None:
        """One run, counted in the metrics; a failure is logged, not raised."""
        try:
            report = await self._purger.run()
        except Exception:
            log.exception("retention purge failed; retrying at the next interval")
            self._count("failed")
            return None
        if report is None:
            self._count("skipped")
            return None
        self.last_report = report
        self._count("done" if report.complete else "partial", report.deleted)
        return report

    def first_delay_s(self) -> float:
        """Seconds from start to the first run."""
        return min(self._interval_s, FIRST_RUN_DELAY_S) * self._uniform(0.5, 1.0)

    def next_delay_s(self) -> float:
        """Seconds from one run to the next."""
        return self._interval_s * self._uniform(1 - JITTER, 1 + JITTER)

    async def _loop(self) -> None:
        delay = self.first_delay_s()
        while True:
            await asyncio.sleep(delay)
            self._running = True
            try:
                await self.run_once()
            finally:
                self._running = False
            if self._closing:
                return
            delay = self.next_delay_s()

    def _count(self, outcome: str, deleted: PurgeCounts | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.purge_runs.labels(outcome).inc()
        if deleted is not None:
            self._metrics.purged_rows.labels("tokens").inc(deleted.tokens)
            self._metrics.purged_rows.labels("usage_events").inc(deleted.usage_events)
            self._metrics.purged_rows.labels("audit_events").inc(deleted.audit_events)


async def _finishes(task: Awaitable[None], timeout_s: float) -> bool:
    """Whether `task` ends within `timeout_s` (it is not cancelled here)."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        return False
    return True
