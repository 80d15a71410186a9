"""The acceptance of the audit trail: a scripted sequence of management and admin
actions, refused sign-ins among them, read back through `/manage/audit`, `llm-proxy
manage audit list` and the admin audit page in a real headless Chromium; no secret
in any of them, nor in the audit rows or the JSONL file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from click.testing import CliRunner, Result
from playwright.async_api import async_playwright, expect
from pytest_aiohttp import AiohttpServer

from llm_proxy.cli import main
from llm_proxy.config import Settings

from ..e2e.test_admin_browser import CHROMIUM, CHROMIUM_ARGS, _require_chromium, shoot
from ..support import (
    ADMIN_ENV,
    ADMIN_PASSWORD,
    ADMIN_USER,
    AUTH,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    bearer,
    with_admin,
)
from .support import ROTATED_KEY, assert_no_secret, audit_env, audit_table_dump

pytestmark = pytest.mark.browser

METRICS_TOKEN = "metrics-scrape-secret-5551"
EXPECTED = [
    ("project.create", "management_api", "success"),
    ("project.rotate_key", "management_api", "success"),
    ("project.deactivate", "management_api", "success"),
    ("project.activate", "management_api", "success"),
    ("token.create", "management_api", "success"),
    ("token.revoke", "management_api", "success"),
    ("auth.failed", "management_api", "denied"),
    ("auth.failed", "metrics", "denied"),
    ("project.create", ADMIN_USER, "success"),
    ("token.create", ADMIN_USER, "success"),
    ("token.revoke", ADMIN_USER, "success"),
    ("auth.failed", ADMIN_USER, "denied"),
    ("auth.failed", "unknown", "denied"),
]


@pytest.fixture
async def server(
    aiohttp_server: AiohttpServer, proxy_env: dict[str, str], tmp_path: Path
) -> TestServer:
    env = {
        **proxy_env,
        **ADMIN_ENV,
        **audit_env(tmp_path),
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    return await aiohttp_server(with_admin(Settings.from_env(env)))


async def management_script(base: str) -> list[str]:
    """Changes through the management API, a bad token, a bad scrape; token values."""
    async with aiohttp.ClientSession(base, headers=AUTH) as api:
        body = {"name": "api-made", "openai_api_key": UPSTREAM_KEY}
        async with api.post("/manage/projects", json=body) as response:
            project_id = (await response.json())["project_id"]
        for change in ({"openai_api_key": ROTATED_KEY}, {"is_active": False}):
            async with api.patch(f"/manage/projects/{project_id}", json=change):
                pass
        async with api.patch(
            f"/manage/projects/{project_id}", json={"is_active": True}
        ):
            pass
        body = {"project_id": project_id, "duration_minutes": 30}
        async with api.post("/manage/tokens", json=body) as response:
            value = (await response.json())["token"]
        async with api.delete("/manage/tokens", json={"token": value}) as response:
            assert response.status == 204
        bad = bearer("not-the-management-token")
        async with api.get("/manage/projects", headers=bad) as response:
            assert response.status == 401
        async with api.get("/metrics", headers=bearer("guess")) as response:
            assert response.status == 401
    return [value]


async def browser_script(browser: Any, base: str) -> str:
    """Changes through the admin pages, then two refused sign-ins; the token value."""
    context = await browser.new_context(
        base_url=base,
        http_credentials={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
    )
    page = await context.new_page()
    await page.goto("/admin/projects/new")
    await page.get_by_label("Name").fill("browser-made")
    await page.get_by_label("OpenAI API key").fill(UPSTREAM_KEY)
    await page.get_by_role("button", name="Create project").click()
    await page.get_by_role("link", name="Generate token").click()
    await page.get_by_role("button", name="Generate token").click()
    value: str = await page.locator("#token-value").input_value()
    await page.goto("/admin/tokens")
    await page.get_by_role("link", name=f"…{value[-4:]}").click()
    await page.get_by_role("link", name="Revoke…").click()
    await page.get_by_role("button", name="Revoke token").click()
    await expect(page.locator("h1 .badge")).to_have_text("revoked")
    await context.close()
    for user, password in ((ADMIN_USER, "wrong-password-1"), ("mallory", "hunter2")):
        intruder = await browser.new_page(
            http_credentials={"username": user, "password": password}
        )
        response = await intruder.goto(f"{base}/admin/")
        assert response is not None and response.status == 401
        await intruder.close()
    return value


async def read_api(base: str, count: int) -> dict[str, Any]:
    """The trail through /manage/audit, once the recorder has written `count`."""
    async with aiohttp.ClientSession(base, headers=AUTH) as api, asyncio.timeout(10):
        while True:
            async with api.get("/manage/audit", params={"page_size": "100"}) as got:
                found: dict[str, Any] = await got.json()
            if len(found["events"]) >= count:
                return found
            await asyncio.sleep(0.05)


def cli(base: str, *args: str) -> Result:
    env = {"MANAGE_API_BASE_URL": base, "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
    result = CliRunner().invoke(main, ["manage", "audit", "list", *args], env=env)
    assert result.exit_code == 0, result.output
    return result


async def read_page(browser: Any, base: str) -> tuple[list[str], str]:
    """The audit page's rows (as text) and every HTML of the walk through it."""
    context = await browser.new_context(
        base_url=base,
        http_credentials={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
    )
    page = await context.new_page()
    await page.goto("/admin/")
    await page.get_by_role("link", name="Audit").click()
    await expect(page.locator("h1")).to_have_text("Audit")
    rows = await page.locator("#audit-events tbody tr").all_inner_texts()
    html = await page.content()
    await shoot(page, "audit")
    await page.get_by_label("Action").select_option("auth.failed")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("#audit-events tbody tr")).to_have_count(4)
    html += await page.content()
    await context.close()
    return rows, html


async def test_the_audit_trail_of_a_scripted_session_everywhere_without_secrets(
    server: TestServer, tmp_path: Path
) -> None:
    _require_chromium()
    base = str(server.make_url("")).rstrip("/")
    values = await management_script(base)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            values.append(await browser_script(browser, base))
            trail = await read_api(base, len(EXPECTED))
            rows, html = await read_page(browser, base)
        finally:
            await browser.close()
    events = list(reversed(trail["events"]))
    assert [(e["action"], e["actor"], e["outcome"]) for e in events] == EXPECTED
    table = await asyncio.to_thread(cli, base)
    as_json = await asyncio.to_thread(cli, base, "--json", "--action", "token.revoke")
    assert f"{len(EXPECTED)} of {len(EXPECTED)} events" in table.output
    assert len(orjson.loads(as_json.output)["events"]) == 2
    assert len(rows) == len(EXPECTED) and "project.rotate_key" in rows[-2]
    secrets = (*values, METRICS_TOKEN, "wrong-password-1", "hunter2", "mallory")
    for where in (
        orjson.dumps(trail).decode(),
        table.output,
        as_json.output,
        html,
        audit_table_dump(tmp_path / "proxy.db"),
        (tmp_path / "audit.jsonl").read_text(),
    ):
        assert_no_secret(where, *secrets)
