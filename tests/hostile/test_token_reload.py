"""Token-table reloads at scale: bounded loop slices, no stall, on SQLite and PostgreSQL.

`TOKEN_RELOAD_STALL_TOKENS` (default 20,000) sets the table size of the stall
measurement; run with `-s` to see the numbers (200,000 for the figures in the report).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.auth import tokens as tokens_module
from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.tokens import PAGE_ROWS, TokenStore, TokenSync
from llm_proxy.server import tune_switch_interval
from llm_proxy.storage import (
    PostgresRepository,
    Project,
    Repository,
    SqliteRepository,
)

from ..support import _postgres_schema, _postgres_url

MASTER_KEY = bytes(range(32))
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

        yield Table(repository, project, fill, touch_all)
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

        yield Table(postgres, project, pg_fill, pg_touch_all)
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
    monkeypatch.setattr(tokens_module, "PAGE_ROWS", 10**9)
    await table.fill(PAGE_ROWS + 1)
    store, sync = _sync(table.repository)
    with LoopTicks() as ticks:
        per_tick = _count_puts_per_tick(store, ticks)
        await sync.reload()
    assert max(per_tick.values()) == PAGE_ROWS + 1


class WorstLateness:
    """A task that sleeps 1 ms in a loop and records how late it woke, at worst."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            late = time.perf_counter() - started - 0.001
            self.worst_s = max(self.worst_s, late)

    async def __aenter__(self) -> WorstLateness:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
def frozen_heap() -> Iterator[Callable[[], None]]:
    """`freeze()` does what the server does once started (`tune_gc` and
    `tune_switch_interval`); undone after."""
    interval = sys.getswitchinterval()

    def freeze() -> None:
        gc.collect()
        gc.freeze()
        tune_switch_interval()

    yield freeze
    gc.unfreeze()
    sys.setswitchinterval(interval)


async def _worst(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Worst loop lateness while `work` runs, and how long it took, in ms and s."""
    async with WorstLateness() as lateness:
        started = time.perf_counter()
        await work()
        took = time.perf_counter() - started
    return lateness.worst_s * 1000, took


async def test_reloads_of_a_large_table_do_not_stall_the_loop(
    table: Table, request: pytest.FixtureRequest, frozen_heap: Callable[[], None]
) -> None:
    count = int(os.environ.get("TOKEN_RELOAD_STALL_TOKENS", "20000"))
    await table.fill(count)
    store, sync = _sync(table.repository)
    warm = await _worst(sync.reload)  # at start, before the server listens
    assert len(store) == count
    frozen_heap()
    await table.touch_all()
    changed = await _worst(sync.reload)
    await table.fill(count // 100)
    added = await _worst(sync.reload)
    idle = await _worst(sync.reload)  # nothing changed: the every-5-s case
    resync = await _worst(sync.resync)  # the hourly safety net
    assert len(store) == count + count // 100
    backend = request.node.callspec.params["table"]
    print(f"\n{backend}, {count} tokens: worst loop lateness in ms (duration in s)")
    for name, (worst_ms, took_s) in {
        "warm-up full load (start-up)": warm,
        "reload, every row changed": changed,
        "reload, 1% new tokens": added,
        "reload, nothing changed": idle,
        "hourly full resync": resync,
    }.items():
        print(f"  {name}: {worst_ms:.1f} ({took_s:.2f})")
    # A wide margin for a loaded 2-core machine (under a parallel suite the worst seen
    # was 122 ms at 20,000 tokens); the deterministic bound is the slice test above.
    assert max(changed[0], added[0], idle[0], resync[0]) < 400
