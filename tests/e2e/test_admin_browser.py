"""The admin pages in a real headless Chromium (Debian's package, driven by Playwright):
sign in, create a project, generate and copy a token, use it through the proxy, revoke
it in the UI and see the proxy refuse it. Screenshots land in test-artifacts/."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import ConsoleMessage, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from pytest_aiohttp import AiohttpServer

from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import REPOSITORY_KEY
from llm_proxy.storage import Repository, TokenFilter, UsageEvent

from ..support import (
    ADMIN_ENV,
    ADMIN_PASSWORD,
    ADMIN_USER,
    UPSTREAM_KEY,
    bearer,
    with_admin,
)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
WIDTHS = (1280, 390)


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser tests")
    pytest.skip(reason)


@pytest.fixture
async def server(
    aiohttp_server: AiohttpServer, proxy_env: dict[str, str]
) -> TestServer:
    settings = Settings.from_env({**proxy_env, **ADMIN_ENV})
    return await aiohttp_server(with_admin(settings))


@pytest.fixture
async def browser_page(server: TestServer) -> AsyncIterator[tuple[Any, list[str]]]:
    """A signed-in page and the console errors it logs (CSP violations included)."""
    _require_chromium()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        context = await browser.new_context(
            base_url=str(server.make_url("")).rstrip("/"),
            http_credentials={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
            viewport={"width": WIDTHS[0], "height": 900},
        )
        await context.grant_permissions(
            ["clipboard-read", "clipboard-write"],
            origin=str(server.make_url("")).rstrip("/"),
        )
        page = await context.new_page()
        problems: list[str] = []

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                problems.append(message.text)

        def on_page_error(error: PlaywrightError) -> None:
            problems.append(str(error))

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        try:
            yield page, problems
        finally:
            await context.close()
            await browser.close()


async def shoot(page: Any, name: str) -> None:
    """Full-page screenshots at desktop and phone width."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        await page.set_viewport_size({"width": width, "height": 900})
        await page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)
    await page.set_viewport_size({"width": WIDTHS[0], "height": 900})


async def seed_usage(repository: Repository, project_id: str, token_id: str) -> None:
    """A few days of traffic so the dashboard and usage pages have bars to draw."""
    now = datetime.now(UTC)
    events = [
        UsageEvent(
            event_id=str(uuid.uuid4()),
            ts=now - timedelta(days=day, minutes=5 + n),
            project_id=project_id,
            token_id=token_id,
            endpoint="/v1/chat/completions",
            method="POST",
            status_code=429 if n == 0 and day == 1 else 200,
            duration_ms=180.0 + 10 * n,
            model="gpt-4o-mini",
            prompt_tokens=120,
            completion_tokens=40,
            total_tokens=160,
            usage_source="response",
        )
        for day in range(5)
        for n in range(2 + (day * 3) % 5)
    ]
    await repository.insert_usage_events(events)


async def count_tokens(server: TestServer, project_id: str) -> int:
    repository: Repository = server.app[REPOSITORY_KEY]
    token_filter = TokenFilter(project_id=project_id)
    return await repository.count_tokens(token_filter, now=datetime.now(UTC))


async def create_project(page: Any, name: str) -> str:
    """Create a project through the form; its id."""
    await page.goto("/admin/projects/new")
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("OpenAI API key").fill(UPSTREAM_KEY)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.locator(".flash")).to_have_text(f"Project “{name}” created.")
    return str(page.url.split("?")[0].rsplit("/", 1)[-1])


async def test_browser_operator_manages_a_token_end_to_end(
    server: TestServer, browser_page: tuple[Any, list[str]], fake: FakeUpstreamState
) -> None:
    page, problems = browser_page
    await page.goto("/admin/")
    assert await page.locator("h1").inner_text() == "Dashboard"

    await page.get_by_role("link", name="New project").first.click()
    await page.get_by_label("Name").fill("Research team")
    await page.get_by_label("Description").fill("Notebook experiments <b>beta</b>")
    await page.get_by_label("OpenAI API key").fill(UPSTREAM_KEY)
    await page.get_by_role("button", name="Create project").click()
    await page.wait_for_url("**/admin/projects/*")
    assert "Research team" in await page.locator("h1").inner_text()
    project_id = page.url.split("?")[0].rsplit("/", 1)[-1]

    await page.get_by_role("link", name="Generate token").click()
    await page.get_by_label("Valid for").select_option("240")
    await page.get_by_label("Maximum requests").fill("100")
    await page.get_by_role("button", name="Generate token").click()
    await page.wait_for_selector("#token-value")
    value = await page.locator("#token-value").input_value()
    assert value.startswith("wt-")
    await page.get_by_role("button", name="Copy").first.click()
    await expect(page.locator(".copy-status")).to_have_text("Copied to the clipboard.")
    assert await page.evaluate("navigator.clipboard.readText()") == value
    await shoot(page, "token-created")
    assert value not in page.url

    await page.reload()  # a GET: neither a second token nor the value again
    await expect(page.locator(".alert.notice")).to_contain_text("shown once")
    assert await page.locator("#token-value").count() == 0
    assert value not in await page.content()
    assert await count_tokens(server, project_id) == 1

    async with aiohttp.ClientSession() as session:
        url = server.make_url("/v1/models")
        async with session.get(url, headers=bearer(value)) as response:
            assert response.status == 200
        assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"

        repository = server.app[REPOSITORY_KEY]
        tokens = await repository.list_tokens(
            TokenFilter(project_id=project_id), now=datetime.now(UTC), limit=1, offset=0
        )
        await seed_usage(repository, project_id, tokens[0].id)

        await page.goto("/admin/")
        await shoot(page, "dashboard")
        await page.goto("/admin/projects")
        await shoot(page, "projects")
        await page.goto(f"/admin/projects/{project_id}")
        await shoot(page, "project-detail")
        await page.goto("/admin/usage")
        await shoot(page, "usage")
        await page.goto("/admin/tokens")
        await shoot(page, "tokens")

        await page.get_by_role("link", name=f"…{value[-4:]}").click()
        await page.get_by_role("link", name="Revoke…").click()
        await page.get_by_role("button", name="Revoke token").click()
        await expect(page.locator("h1 .badge")).to_have_text("revoked")
        flash = page.locator(".flash")
        await expect(flash).to_have_text(f"Token wt-…{value[-4:]} revoked.")
        await shoot(page, "token-revoked")
        await page.reload()
        await expect(page.locator("h1 .badge")).to_have_text("revoked")
        assert await flash.count() == 0
        async with session.get(url, headers=bearer(value)) as response:
            assert response.status == 401

    assert problems == []  # no CSP violations, no script errors


async def test_browser_inactive_project_is_named_and_never_swapped(
    server: TestServer, browser_page: tuple[Any, list[str]]
) -> None:
    page, problems = browser_page
    await create_project(page, "Awake team")
    asleep = await create_project(page, "Asleep team")
    await page.get_by_role("button", name="Deactivate project").click()
    await expect(page.locator(".flash")).to_contain_text("“Asleep team” deactivated")

    await page.goto(f"/admin/tokens/new?project_id={asleep}")
    await expect(page.get_by_role("alert")).to_contain_text(
        "Project “Asleep team” is inactive"
    )
    assert await page.get_by_label("Project").input_value() == ""
    await page.get_by_role("button", name="Generate token").click()
    assert await page.get_by_label("Project").evaluate("s => s.validity.valueMissing")
    await expect(page.locator("h1")).to_have_text("Generate token")
    assert "/created" not in page.url
    assert await count_tokens(server, asleep) == 0
    await shoot(page, "token-new-inactive-project")
    refused = "the server responded with a status of 403 (Forbidden)"
    assert [refused in problem for problem in problems] == [True]  # that page only


async def test_browser_token_with_a_policy_is_bound_to_its_user(
    server: TestServer, browser_page: tuple[Any, list[str]], fake: FakeUpstreamState
) -> None:
    page, problems = browser_page
    project_id = await create_project(page, "Policy team")
    await page.goto(f"/admin/tokens/new?project_id={project_id}")
    await page.get_by_label("Bound headers").fill("user_id=alice")
    await page.get_by_label("Allowed models").fill("gpt-4o-mini, o1*")
    await page.get_by_label("Output tokens cap").fill("1000")
    await page.get_by_label("Refuse streaming").check()
    await shoot(page, "token-new-policy")
    await page.get_by_role("button", name="Generate token").click()
    await page.wait_for_selector("#token-value")
    value = await page.locator("#token-value").input_value()
    await page.goto("/admin/tokens")
    await page.get_by_role("link", name=f"…{value[-4:]}").click()
    facts = page.locator("dl.facts")
    await expect(facts).to_contain_text("X-Proxy-User-Id: alice")
    await expect(facts).to_contain_text("gpt-4o-mini, o1*")
    await expect(facts).to_contain_text("at most 1000 per call")
    await expect(facts).to_contain_text("refused")
    await shoot(page, "token-policy")

    body = {"model": "gpt-4o-mini", "messages": [], "max_tokens": 10}
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        for user, status in (("bob", 403), ("alice", 200)):
            headers = {**bearer(value), "X-Proxy-User-Id": user}
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == status, await response.text()
    assert fake.requests_seen == 1
    assert problems == []


async def test_browser_cancelled_sign_in_shows_a_page(server: TestServer) -> None:
    _require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        # Without any credentials Chromium aborts the navigation instead of showing
        # the prompt (playwright#11436); wrong ones make it give up and render the
        # 401 body, which is what a person sees after cancelling the prompt.
        wrong = {"username": ADMIN_USER, "password": "not-the-password"}
        try:
            page = await browser.new_page(http_credentials=wrong)
            response = await page.goto(str(server.make_url("/admin/")))
            assert response is not None and response.status == 401
            await expect(page.locator("h1")).to_have_text("Authentication required")
            await expect(page.locator("body")).to_contain_text("Reload the page")
            assert "Sign in required" in await page.title()
        finally:
            await browser.close()
