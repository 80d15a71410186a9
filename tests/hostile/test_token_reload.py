"""Token-table reloads at scale: bounded loop slices, no stall, on SQLite and PostgreSQL.

`TOKEN_RELOAD_STALL_TOKENS` (default 20,000) sets the table size of the stall
measurement; run with `-s` to see the numbers (200,000 for the figures in the report).
Set, it also holds the loop's lateness to `STALL_BOUND_MS`: a measurement run, for a
machine that is not busy with other work. The loop's own CPU time per slice is held to
the bound always, since no other process or thread can inflate it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.auth import sync as sync_module
from llm_proxy.auth import tokens as tokens_module
from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.sync import PAGE_ROWS, TokenSync
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.server import tune_switch_interval
from llm_proxy.storage import (
    PostgresRepository,
    Project,
    Repository,
    SqliteRepository,
)

from ..support import _postgres_schema, _postgres_url

MASTER_KEY = bytes(range(32))
STALL_BOUND_MS = 5.0  # issue #11: no loop stall over 5 ms at 200,000 tokens
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
INSERT INTO tokens (id, token, token_hint, project_id, expires_at, is_active,
                    request_count, created_at)
SELECT lower(hex(randomblob(16))), lower(hex(randomblob(32))), 'abcd', ?1,
       '2999-01-01T00:00:00.000000Z', 1, 0, '2025-01-01T00:00:00.000000Z'
FROM n"""
POSTGRES_FILL = """
INSERT INTO tokens (id, token, token_hint, project_id, expires_at, is_active,
                    request_count, created_at)
SELECT gen_random_uuid(), md5(random()::text) || md5(random()::text), 'abcd', $1,
       now() + interval '1 day', true, 0, now()
FROM generate_series(1, $2)"""
SQLITE_TOUCH = "UPDATE tokens SET max_requests = 5"
POSTGRES_TOUCH = "UPDATE tokens SET max_requests = 5"


@dataclass
class Table:
    """A repository with one project, and a way to add and change tokens in bulk."""

    repository: Repository
    project: Project
    fill: Callable[[int], Awaitable[None]]
    touch_all: Callable[[], Awaitable[None]]
    execute: Callable[[str], Awaitable[None]]


def _project(cipher: KeyCipher) -> Project:
    now = datetime.now(UTC)
    return Project(
        id=str(uuid.uuid4()),
        name="bulk",
        description="",
        metadata={},
        encrypted_api_key=cipher.encrypt("sk-proj-BULKTESTKEY0123456789"),
        api_key_hint="sk-...6789",
        is_active=True,
        created_at=now,
        updated_at=now,
    )


@pytest.fixture(params=BACKENDS)
async def table(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Table]:
    project = _project(KeyCipher(MASTER_KEY))
    if request.param == "sqlite":
        path = tmp_path / "proxy.db"
        repository: Repository = SqliteRepository(path)
        await repository.connect()
        await repository.migrate()
        await repository.create_project(project)

        def run(sql: str, *params: Any) -> None:
            import sqlite3

            with sqlite3.connect(path) as conn:
                conn.execute(sql, params)

        async def fill(count: int) -> None:
            await asyncio.to_thread(run, SQLITE_FILL, project.id, count)

        async def touch_all() -> None:
            await asyncio.to_thread(run, SQLITE_TOUCH)

        async def execute(sql: str) -> None:
            await asyncio.to_thread(run, sql)

        yield Table(repository, project, fill, touch_all, execute)
        await repository.close()
        return
    async with _postgres_schema() as schema:
        postgres = PostgresRepository(_postgres_url(), schema=schema)
        await postgres.connect()
        await postgres.migrate()
        await postgres.create_project(project)

        async def pg_fill(count: int) -> None:
            await postgres._connected.execute(
                POSTGRES_FILL, uuid.UUID(project.id), count
            )

        async def pg_touch_all() -> None:
            await postgres._connected.execute(POSTGRES_TOUCH)

        async def pg_execute(sql: str) -> None:
            await postgres._connected.execute(sql)

        yield Table(postgres, project, pg_fill, pg_touch_all, pg_execute)
        await postgres.close()


def _sync(repository: Repository) -> tuple[TokenStore, TokenSync]:
    store = TokenStore(TokenHasher(MASTER_KEY), KeyCipher(MASTER_KEY))
    sync = TokenSync(store, repository, reload_interval_s=3600, flush_interval_s=3600)
    return store, sync


class LoopTicks:
    """Counts event-loop iterations: work done within one tick ran without a yield."""

    def __init__(self) -> None:
        self.tick = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.tick += 1
            await asyncio.sleep(0)

    def __enter__(self) -> LoopTicks:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def _count_puts_per_tick(store: TokenStore, ticks: LoopTicks) -> dict[int, int]:
    """Wrap the store's put_token to count how many rows each loop tick applied."""
    per_tick: dict[int, int] = {}
    put = store.put_token

    def counting(token: Any) -> None:
        per_tick[ticks.tick] = per_tick.get(ticks.tick, 0) + 1
        put(token)

    store.put_token = counting  # type: ignore[method-assign]
    return per_tick


async def test_a_reload_applies_at_most_a_page_of_rows_per_loop_slice(
    table: Table,
) -> None:
    count = 3 * PAGE_ROWS + 7
    await table.fill(count)
    store, sync = _sync(table.repository)
    with LoopTicks() as ticks:
        per_tick = _count_puts_per_tick(store, ticks)
        await sync.reload()  # the first one is a full resync
        assert len(store) == count and sum(per_tick.values()) == count
        assert max(per_tick.values()) <= PAGE_ROWS
        per_tick.clear()
        await table.touch_all()
        await sync.reload()  # incremental: every row changed
    assert sum(per_tick.values()) == count
    assert max(per_tick.values()) <= PAGE_ROWS
    assert {entry.max_requests for entry in store._by_hash.values()} == {5}


async def test_the_slice_bound_check_catches_a_reload_in_one_slice(
    table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above fails when pages are unbounded (as a one-shot reload is)."""
    monkeypatch.setattr(sync_module, "PAGE_ROWS", 10**9)
    await table.fill(PAGE_ROWS + 1)
    store, sync = _sync(table.repository)
    with LoopTicks() as ticks:
        per_tick = _count_puts_per_tick(store, ticks)
        await sync.reload()
    assert max(per_tick.values()) == PAGE_ROWS + 1


async def test_a_resync_converts_only_the_rows_that_changed(table: Table) -> None:
    count = 3 * PAGE_ROWS + 7
    await table.fill(count)
    store, sync = _sync(table.repository)
    with LoopTicks() as ticks:
        per_tick = _count_puts_per_tick(store, ticks)
        await sync.reload()
        per_tick.clear()
        await sync.resync()  # nothing changed: every row passed over by its marker
        assert per_tick == {} and len(store) == count
        await table.touch_all()
        await sync.resync()
    assert sum(per_tick.values()) == count
    assert {entry.max_requests for entry in store._by_hash.values()} == {5}


async def test_a_resync_sweeps_tokens_gone_without_tombstones_while_the_table_changes(
    table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep finds every token the resync did not see, also when other tokens
    come and go between its slices (each pass is then cut short)."""
    monkeypatch.setattr(tokens_module, "SWEEP_ENTRIES", 7)
    await table.fill(3 * PAGE_ROWS)
    store, sync = _sync(table.repository)
    await sync.reload()
    await table.execute("DELETE FROM tokens WHERE request_count = 0")
    await table.execute("DELETE FROM deletions")  # as if purged while this one slept
    await table.fill(5)
    gone = set(store._by_hash)

    async def churn() -> None:
        """Add and drop tokens as the management API of this process would."""
        [row] = (await table.repository.load_tokens_changed_since(0, limit=1)).rows
        token = replace(row, id=str(uuid.uuid4()), token_hash="0" * 64)
        while True:
            store.put_token(token)
            await asyncio.sleep(0)
            store.remove_token(token.id)
            await asyncio.sleep(0)

    churning = asyncio.ensure_future(churn())
    try:
        await sync.resync()
    finally:
        churning.cancel()
    assert not gone & set(store._by_hash) and store.unseen == 0
    assert len(store) in (5, 5 + 1)  # the new five, and the churned one if it is in


class WorstLateness:
    """A task that sleeps 1 ms in a loop and records how late it woke; and the CPU
    time of the longest loop slice (one callback the loop ran, such as one step of
    a task), which no other process or thread can inflate, unlike lateness."""

    def __init__(self) -> None:
        self.late_s: list[float] = []
        self.slice_cpu_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self.late_s.append(time.perf_counter() - started - 0.001)

    def _timed(self, run: Callable[[asyncio.Handle], None]) -> Callable[..., None]:
        def timed_run(handle: asyncio.Handle) -> None:
            started = time.thread_time()
            run(handle)
            self.slice_cpu_s = max(self.slice_cpu_s, time.thread_time() - started)

        return timed_run

    async def __aenter__(self) -> WorstLateness:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.01)
        self.late_s.clear()
        self._run_handle = asyncio.Handle._run
        asyncio.Handle._run = self._timed(self._run_handle)  # type: ignore[method-assign]
        return self

    async def __aexit__(self, *exc: object) -> None:
        asyncio.Handle._run = self._run_handle  # type: ignore[method-assign]
        assert self._task is not None
        self._task.cancel()


@dataclass
class Stall:
    """Loop lateness (worst, 99th percentile) and the CPU time of the longest loop
    slice, in ms, while some work ran for `took_s`."""

    late_max: float
    late_p99: float
    cpu_max: float
    took_s: float

    def __str__(self) -> str:
        return (
            f"late max {self.late_max:.2f} p99 {self.late_p99:.2f},"
            f" longest slice {self.cpu_max:.2f} CPU ({self.took_s:.2f} s)"
        )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.99)] if ordered else 0.0


async def _worst(work: Callable[[], Awaitable[object]]) -> Stall:
    """The loop's lateness and slices while `work` runs, and how long it took."""
    async with WorstLateness() as probe:
        started = time.perf_counter()
        await work()
        took = time.perf_counter() - started
    late = [s * 1000 for s in probe.late_s]
    return Stall(max(late, default=0), _p99(late), probe.slice_cpu_s * 1000, took)


async def _measure_reloads(table: Table, count: int) -> dict[str, Stall]:
    """Load `count` tokens, then time the reloads a running server does."""
    await table.fill(count)
    store, sync = _sync(table.repository)
    warm = await _worst(sync.reload)  # at start, before the server listens
    assert len(store) == count
    gc.collect()
    gc.freeze()
    tune_switch_interval()
    await table.touch_all()
    changed = await _worst(sync.reload)
    await table.fill(count // 100)
    added = await _worst(sync.reload)
    idle = await _worst(sync.reload)  # nothing changed: the every-5-s case
    resync = await _worst(sync.resync)  # the hourly safety net
    assert len(store) == count + count // 100
    return {
        "warm-up full load (start-up)": warm,
        "reload, every row changed": changed,
        "reload, 1% new tokens": added,
        "reload, nothing changed": idle,
        "hourly full resync": resync,
    }


@pytest.fixture
async def like_a_server() -> AsyncIterator[None]:
    """The loop without asyncio's debug mode, which takes a stack trace per future
    (milliseconds a slice, at any table size); and afterwards undo what
    `_measure_reloads` does as the server does once started (`tune_gc`'s freeze and
    `tune_switch_interval`)."""
    loop = asyncio.get_running_loop()
    debug, interval = loop.get_debug(), sys.getswitchinterval()
    loop.set_debug(False)
    yield
    loop.set_debug(debug)
    gc.unfreeze()
    sys.setswitchinterval(interval)


async def test_reloads_of_a_large_table_do_not_stall_the_loop(
    table: Table, request: pytest.FixtureRequest, like_a_server: None
) -> None:
    size = os.environ.get("TOKEN_RELOAD_STALL_TOKENS")
    count = int(size or "20000")
    stalls = await _measure_reloads(table, count)
    backend = request.node.callspec.params["table"]
    print(f"\n{backend}, {count} tokens, in ms:")
    for name, stall in stalls.items():
        print(f"  {name}: {stall}")
    running = [stalls[name] for name in list(stalls)[1:]]  # after start-up
    assert max(stall.cpu_max for stall in running) < STALL_BOUND_MS
    # Lateness also counts what other processes ran: held to the bound in a
    # measurement run; under a parallel suite 122 ms was seen at 20,000 tokens.
    late_bound = STALL_BOUND_MS if size else 400
    assert max(stall.late_max for stall in running) < late_bound


async def test_the_stall_bound_catches_a_reload_in_one_slice(
    table: Table, monkeypatch: pytest.MonkeyPatch, like_a_server: None
) -> None:
    """The slice bound above fails when pages are unbounded (a one-shot reload)."""
    monkeypatch.setattr(sync_module, "PAGE_ROWS", 10**9)
    stalls = await _measure_reloads(table, 20000)
    assert stalls["reload, every row changed"].cpu_max > STALL_BOUND_MS
