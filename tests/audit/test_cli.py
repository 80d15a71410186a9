"""`llm-proxy manage audit list|get` against a proxy on a real port (the command runs
its own event loop, in a worker thread, while the proxy answers on the test's)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from click.testing import CliRunner, Result
from pytest_aiohttp import AiohttpServer

from llm_proxy.app import create_app
from llm_proxy.cli import main
from llm_proxy.config import Settings

from ..support import MANAGEMENT_TOKEN
from .support import audit_env, audit_page
from .test_api import SCRIPT_ACTIONS, run_script


@pytest.fixture
async def server(
    aiohttp_server: AiohttpServer, proxy_env: dict[str, str], tmp_path: Path
) -> TestServer:
    settings = Settings.from_env({**proxy_env, **audit_env(tmp_path)})
    return await aiohttp_server(create_app(settings))


async def manage(server: TestServer, *args: str) -> Result:
    env = {
        "MANAGE_API_BASE_URL": str(server.make_url("")).rstrip("/"),
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
    }
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, ["manage", *args], env=env)


async def test_audit_list_prints_a_table_and_filters(
    server: TestServer, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(server)
    made = await run_script(client)
    await audit_page(client, len(SCRIPT_ACTIONS))
    table = await manage(server, "audit", "list", "--page-size", "5")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == [
        "TIME", "ACTION", "ACTOR", "OUTCOME", "PROJECT", "TOKEN", "CLIENT", "REASON"
    ]  # fmt: skip
    assert lines[1].split()[1] == "project.delete"
    assert lines[-1] == f"5 of {len(SCRIPT_ACTIONS)} events (page 1 of 3)"
    denied = await manage(server, "audit", "list", "--outcome", "denied", "--json")
    events = orjson.loads(denied.output)["events"]
    assert [e["action"] for e in events] == ["auth.failed"]
    token_id = made["tokens"][0]["token_id"]
    of_token = await manage(server, "audit", "list", "--token-id", token_id, "--json")
    assert len(orjson.loads(of_token.output)["events"]) == 2
    shown = await manage(server, "audit", "get", events[0]["id"])
    assert shown.exit_code == 0 and "auth.failed" in shown.output


async def test_audit_list_refuses_a_bad_outcome_and_names_a_bad_time(
    server: TestServer,
) -> None:
    wrong = await manage(server, "audit", "list", "--outcome", "perhaps")
    assert wrong.exit_code == 2
    late = await manage(server, "audit", "list", "--since", "tomorrow")
    assert late.exit_code == 1
    assert "start_time must be an ISO 8601 time" in late.output
    missing = await manage(server, "audit", "get", "no-such-event")
    assert missing.exit_code == 1 and "404" in missing.output
