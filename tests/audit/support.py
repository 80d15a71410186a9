"""What the audit tests share: the environment of an audited proxy, reading the trail
back through the API once the recorder has written it, and the secrets to look for."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from ..support import ADMIN_PASSWORD, AUTH, MANAGEMENT_TOKEN, UPSTREAM_KEY

ROTATED_KEY = "sk-proj-ROTATEDSECRETKEY9876543210wxyz"
# The recorder flushes fast in tests, so reading the trail back takes milliseconds.
FAST = {"EVENT_FLUSH_INTERVAL": "0.02"}


def audit_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An audited proxy with the JSONL copy on."""
    return {**FAST, "AUDIT_LOG_FILE": str(tmp_path / "audit.jsonl"), **extra}


async def audit_page(
    client: TestClient[Any, Any], count: int, **params: str
) -> dict[str, Any]:
    """`GET /manage/audit` once it lists at least `count` events (5 s at most)."""
    query = {"page_size": "100", **params}
    async with asyncio.timeout(5):
        while True:
            response = await client.get("/manage/audit", params=query, headers=AUTH)
            assert response.status == 200, await response.text()
            page: dict[str, Any] = await response.json()
            if len(page["events"]) >= min(count, int(query["page_size"])):
                return page
            await asyncio.sleep(0.02)


def actions(page: dict[str, Any]) -> list[tuple[str, str]]:
    """(action, outcome) of a page's events, oldest first."""
    return [(e["action"], e["outcome"]) for e in reversed(page["events"])]


def audit_table_dump(database: Path) -> str:
    """Every value of every audit row, as text (to look for secrets in)."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT * FROM audit_events").fetchall()
    return "\n".join(" ".join(str(value) for value in r) for r in rows)


def assert_no_secret(text: str, *more: str) -> None:
    """None of the secrets of the audit tests (nor `more`) appears in `text`."""
    for secret in (MANAGEMENT_TOKEN, ADMIN_PASSWORD, UPSTREAM_KEY, ROTATED_KEY, *more):
        assert secret not in text, f"a secret ({secret[:6]}…) leaked"
