"""Keeping a `TokenStore` in step with the repository: reloads and usage flushes.

`TokenSync` warms the table at start with a full resync, then applies only what
changed since the last reload (change markers and tombstones, migration 004), in pages
of `PAGE_ROWS` rows so no reload stalls the loop. `TokenSync.flush` writes the counted
requests to the repository in batches, also those of tokens revoked or deleted
meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Final, Protocol, TypeVar

from ..clock import Clock
from ..storage.base import ChangeCursor, ChangePage, Repository
from .tokens import TokenStore

log = logging.getLogger(__name__)

Row = TypeVar("Row")

# Rows fetched per page of a reload. A page's changed rows are converted in one loop
# slice (about 10 µs a row at 200,000 tokens, cache misses included) and applied in
# the next (2-4 µs a row), so no slice of a reload passes about 1 ms even when every
# row changed; an unchanged row costs a lookup (well under 1 µs). Each page fetch is
# an await that lets requests run between slices.
PAGE_ROWS: Final = 50
# Sweep passes before the sweep falls back to one copy of the table's keys: a pass is
# cut short when the table changes size between two of its slices.
SWEEP_PASSES: Final = 5
# A full resync (every row, then a sweep of what is gone) runs at start and this
# often: the safety net under the incremental reloads.
FULL_RESYNC_INTERVAL_S: Final = 3600.0
# Tombstones are kept this long (far longer than FULL_RESYNC_INTERVAL_S, after which a
# process that could not reload falls back to a full resync anyway).
DELETION_RETENTION: Final = timedelta(days=1)


class _PageLoader(Protocol[Row]):
    async def __call__(
        self, *, after: ChangeCursor | None, limit: int
    ) -> ChangePage[Row]: ...


class TokenSync:
    """Background work around a `TokenStore`: incremental reloads and usage flushing."""

    def __init__(
        self,
        store: TokenStore,
        repository: Repository,
        *,
        reload_interval_s: float,
        flush_interval_s: float,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._store = store
        self._repository = repository
        self._reload_interval_s = reload_interval_s
        self._flush_interval_s = flush_interval_s
        self._monotonic = monotonic
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # Set by `poke()`: the reload loop runs at once instead of at its interval.
        self._wake = asyncio.Event()
        self._mark: int | None = None  # where the next incremental reload starts
        self._last_resync = 0.0
        # Held by a flush from taking counts until the store knows they are written,
        # so a reloaded row never counts the same requests twice (row + in flight).
        self._flush_lock = asyncio.Lock()

    async def reload(self) -> None:
        """Apply what changed since the last reload; a full resync when it is due."""
        since = self._mark
        overdue = self._monotonic() - self._last_resync >= FULL_RESYNC_INTERVAL_S
        if since is None or overdue:
            await self.resync()
            return
        mark = await self._repository.change_mark()
        repository = self._repository
        store = self._store
        await self._paged(
            partial(repository.load_projects_changed_since, since), store.put_projects
        )
        await self._paged(
            partial(
                repository.load_tokens_changed_since,
                since,
                unchanged=store.unchanged,
            ),
            store.put_tokens,
        )
        await self._paged(
            partial(repository.load_deletions_since, since), store.apply_deletions
        )
        self._mark = mark

    async def resync(self) -> None:
        """Read every project and unrevoked token, then sweep out what is gone."""
        mark = await self._repository.change_mark()
        generation = self._store.begin_resync()
        repository = self._repository
        store = self._store
        await self._paged(
            partial(repository.load_projects_changed_since, 0), store.put_projects
        )
        await self._paged(
            partial(
                repository.load_tokens_changed_since,
                0,
                active_only=True,
                unchanged=store.unchanged,
            ),
            store.put_tokens,
        )
        await self._sweep_tokens(generation)
        store.sweep_projects(generation)
        self._mark = mark
        self._last_resync = self._monotonic()
        before = datetime.now(UTC) - DELETION_RETENTION
        await self._repository.purge_deletions(before=before)

    async def _sweep_tokens(self, generation: int) -> None:
        """Drop the tokens the resync did not see, examining the table in slices.

        Nothing to do, and nothing walked, when it saw every one (the usual case).
        """
        store = self._store
        for _ in range(SWEEP_PASSES):
            if not store.unseen:
                return
            gone: list[str] = []
            with suppress(RuntimeError):  # the table changed size: pass again
                for token_hashes in store.unseen_token_hashes(generation):
                    gone += token_hashes
                    await asyncio.sleep(0)
            for start in range(0, len(gone), PAGE_ROWS):
                store.sweep_tokens(gone[start : start + PAGE_ROWS], generation)
                await asyncio.sleep(0)
        if store.unseen:  # the table kept changing size: one copy of its keys
            token_hashes = store.token_hashes()
            for start in range(0, len(token_hashes), PAGE_ROWS):
                store.sweep_tokens(token_hashes[start : start + PAGE_ROWS], generation)
                await asyncio.sleep(0)

    async def _paged(
        self, load: _PageLoader[Row], apply: Callable[[list[Row]], None]
    ) -> None:
        """Fetch and apply pages of at most PAGE_ROWS rows, in loop slices of their own.

        A page's rows are converted in the slice its fetch ends in and applied in the
        next one, which halves the longest slice of a reload that changes every row.
        """
        after: ChangeCursor | None = None
        while True:
            page = await load(after=after, limit=PAGE_ROWS)
            if page.rows:
                await asyncio.sleep(0)
                async with self._flush_lock:
                    apply(page.rows)
            if page.cursor is None:
                return
            after = page.cursor

    async def flush(self) -> int:
        """Write counted requests to the repository; return how many were written."""
        async with self._flush_lock:
            batch = self._store.take_usage()
            if not batch:
                return 0
            try:
                await self._repository.record_token_usage(batch)
            except Exception:
                self._store.usage_failed(batch)
                raise
            self._store.usage_stored(batch)
        return sum(usage.requests for usage in batch)

    async def start(self) -> None:
        """Warm the snapshot, then keep it fresh and flush usage in the background."""
        self._wake.clear()  # the warm reload covers every earlier poke
        await self.reload()
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(
                self._every(self._reload_interval_s, self.reload, self._wake)
            ),
            asyncio.create_task(self._every(self._flush_interval_s, self.flush)),
        ]

    async def close(self) -> None:
        """Stop the loops, then flush what is left (nothing lost on a graceful stop).

        A reload is cancelled where it is; a flush in progress is let finish, since
        a write cancelled half-way could neither be retried nor counted as stored.
        """
        self._stopping.set()
        if self._tasks:
            self._tasks[0].cancel()  # the reload loop
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.flush()

    def poke(self) -> None:
        """Reload now (something changed elsewhere), not at the next interval.

        Coalesced: pokes during a reload queue one more reload after it, since that
        reload may have read the database before the change; further pokes add none.
        """
        self._wake.set()

    async def _every(
        self,
        interval_s: float,
        work: Callable[[], Awaitable[object]],
        wake: asyncio.Event | None = None,
    ) -> None:
        """Run `work` every `interval_s`, and at once whenever `wake` is set."""
        signal = wake if wake is not None else self._stopping
        while not self._stopping.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), interval_s)
            if self._stopping.is_set():
                return
            if wake is not None:
                wake.clear()  # a poke from now on queues the next run
            try:
                await work()
            except Exception:
                log.exception("background token sync failed; retrying next interval")
