"""Counts from two real `serve` processes merge in PostgreSQL without a lost update.

Issue #14, item 4: `request_count`, `last_used_at` and the usage rows of calls served
by both processes at once all land in the database, and a graceful stop (SIGTERM)
right after the last answer loses none of them.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from ..support import _postgres_url
from .fleet import Fleet, fleet_session, mint, running_fleet

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
CALLS_PER_PROCESS = 150
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _chat_burst(fleet: Fleet, token: str) -> Counter[int]:
    headers = {"Authorization": f"Bearer {token}"}
    async with fleet_session() as session:

        async def one(index: int) -> int:
            url = f"{fleet.bases[index % 2]}/v1/chat/completions"
            async with session.post(url, json=CHAT, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(2 * CALLS_PER_PROCESS)))
    return Counter(statuses)


def _stop(proxies: tuple[subprocess.Popen[bytes], ...]) -> list[int]:
    for process in proxies:
        process.terminate()
    return [process.wait(30) for process in proxies]


async def _read_back(
    fleet: Fleet, token_id: str
) -> tuple[int, datetime | None, int, int]:
    connection = await asyncpg.connect(_postgres_url(), timeout=5)
    try:
        await connection.execute(f'SET search_path TO "{fleet.schema}"')
        token = await connection.fetchrow(
            "SELECT request_count, last_used_at FROM tokens WHERE id = $1", token_id
        )
        usage = await connection.fetchrow(
            "SELECT count(*) AS calls, coalesce(sum(total_tokens), 0) AS total"
            " FROM usage_events WHERE token_id = $1",
            token_id,
        )
    finally:
        await connection.close()
    assert token is not None and usage is not None
    return token[0], token[1], usage["calls"], usage["total"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    # a long flush interval: the counts must come from the flush at the stop
    with running_fleet(
        tmp_path,
        USAGE_FLUSH_INTERVAL="30",
        TOKEN_MAX_CONCURRENT="1000",
        PROJECT_MAX_CONCURRENT="1000",
    ) as started:
        yield started


async def test_counts_of_both_processes_land_whole_after_a_sigterm(
    fleet: Fleet,
) -> None:
    async with fleet_session() as session:
        token = await mint(session, fleet)
    started = datetime.now(UTC)
    statuses = await _chat_burst(fleet, token["token"])
    assert statuses == {200: 2 * CALLS_PER_PROCESS}
    assert _stop(fleet.proxies) == [0, 0]
    count, last_used, calls, total = await _read_back(fleet, token["token_id"])
    print(
        f"\n{2 * CALLS_PER_PROCESS} calls over two processes, then SIGTERM:"
        f" request_count {count}, usage rows {calls}, total_tokens {total}"
    )
    assert count == 2 * CALLS_PER_PROCESS
    assert last_used is not None and last_used >= started.replace(microsecond=0)
    assert calls == 2 * CALLS_PER_PROCESS
    assert total > 0 and total % calls == 0  # every row carries the call's usage
