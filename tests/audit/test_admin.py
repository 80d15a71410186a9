"""The admin pages audited: each change is recorded with the admin user as its actor,
refused sign-ins (not the browser's first, credential-less request) are recorded
without the name that was tried, and the audit page shows and filters the trail."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.admin import create_admin_app
from llm_proxy.admin.audit import AUDITED
from llm_proxy.config import Settings

from ..admin.test_admin import new_project, new_token, page, post
from ..support import ADMIN_ENV, ADMIN_PASSWORD, ADMIN_USER, with_admin
from .support import ROTATED_KEY, actions, assert_no_secret, audit_env, audit_page

Client = TestClient[Any, Any]
ROW = re.compile(r"<tr>\s*<td>.*?</tr>", re.DOTALL)


@pytest.fixture
async def admin(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str], tmp_path: Path
) -> Client:
    env = {**proxy_env, **ADMIN_ENV, **audit_env(tmp_path)}
    return await aiohttp_client(with_admin(Settings.from_env(env)))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def run_admin_script(client: Client) -> dict[str, str]:
    """Every admin change once, and a form the rules refuse."""
    project_id = await new_project(client, "clicked")
    base = f"/admin/projects/{project_id}"
    for path, form in [
        (base, {"name": "clicked-again", "description": ""}),
        (f"{base}/key", {"openai_api_key": ROTATED_KEY}),
        (f"{base}/origins", {"allowed_origins": "https://app.example.com"}),
        (f"{base}/cache", {"cache_ttl_seconds": "600"}),
        (f"{base}/active", {"is_active": "0"}),
        (f"{base}/active", {"is_active": "1"}),
    ]:
        response = await post(client, path, form)
        assert response.status == 303, await response.text()
    value = await new_token(client, project_id)
    tokens = await page(client, f"/admin/tokens?project_id={project_id}")
    token_id = re.findall(r'href="/admin/tokens/([0-9a-f-]{36})"', tokens)[0]
    revoked = await post(client, f"/admin/tokens/{token_id}/revoke")
    assert revoked.status == 303
    all_revoked = await post(client, f"{base}/revoke-tokens")
    assert all_revoked.status == 303
    taken = await post(
        client,
        "/admin/projects",
        {"name": "clicked-again", "openai_api_key": "sk-x" * 3},
    )
    assert taken.status == 409
    deleted = await post(client, f"{base}/delete")
    assert deleted.status == 303
    return {"project_id": project_id, "token_id": token_id, "value": value}


ADMIN_ACTIONS = [
    ("project.create", "success"),
    ("project.update", "success"),
    ("project.rotate_key", "success"),
    ("project.update", "success"),
    ("project.update", "success"),
    ("project.deactivate", "success"),
    ("project.activate", "success"),
    ("token.create", "success"),
    ("token.revoke", "success"),
    ("project.revoke_tokens", "success"),
    ("project.create", "failure"),
    ("project.delete", "success"),
]


async def test_every_admin_change_is_recorded_as_the_admin_user(admin: Client) -> None:
    made = await run_admin_script(admin)
    trail = await audit_page(admin, len(ADMIN_ACTIONS))
    assert actions(trail) == ADMIN_ACTIONS
    events = list(reversed(trail["events"]))
    assert {e["actor"] for e in events} == {ADMIN_USER}
    origins, cache = events[3]["metadata"], events[4]["metadata"]
    assert origins == {"fields": ["allowed_origins", "require_origin"]}
    assert cache == {"fields": ["cache_ttl_seconds"]}
    assert events[7]["token_id"] == events[8]["token_id"] == made["token_id"]
    assert events[8]["project_id"] == made["project_id"]
    assert events[10]["reason"] == "A project named 'clicked-again' already exists."
    assert_no_secret(str(trail), made["value"])


async def test_refused_sign_ins_are_recorded_without_the_name_tried(
    admin: Client,
) -> None:
    first = await admin.get("/admin/")  # the browser's first try: no credentials
    assert first.status == 401
    wrong = await admin.get("/admin/", headers=basic(ADMIN_USER, "guess-1"))
    stranger = await admin.get("/admin/", headers=basic(ADMIN_PASSWORD, "x"))
    garbled = await admin.get("/admin/", headers={"Authorization": "Basic ***"})
    assert (wrong.status, stranger.status, garbled.status) == (401, 401, 401)
    trail = await audit_page(admin, 3)
    assert [(e["actor"], e["reason"]) for e in reversed(trail["events"])] == [
        (ADMIN_USER, "wrong password"),
        ("unknown", "unknown user"),
        ("unknown", "malformed credentials"),
    ]
    assert {e["metadata"]["surface"] for e in trail["events"]} == {"admin"}
    assert_no_secret(str(trail), "guess-1")


async def test_a_refused_csrf_check_is_a_recorded_failure(admin: Client) -> None:
    response = await post(
        admin, "/admin/projects", {"name": "forged"}, headers={"Origin": "http://evil"}
    )
    assert response.status == 403
    trail = await audit_page(admin, 1)
    assert actions(trail) == [("project.create", "failure")]
    assert trail["events"][0]["reason"] == "Cross-site request refused"


async def test_the_audit_page_lists_and_filters_the_trail(admin: Client) -> None:
    made = await run_admin_script(admin)
    await admin.get("/admin/", headers=basic(ADMIN_USER, "guess-2"))
    await audit_page(admin, len(ADMIN_ACTIONS) + 1)
    html = await page(admin, "/admin/audit")
    assert len(ROW.findall(html)) == len(ADMIN_ACTIONS) + 1
    assert "project.rotate_key" in html and "wrong password" in html
    assert_no_secret(html, made["value"])
    only = await page(admin, "/admin/audit?action=token.revoke&outcome=success")
    assert len(ROW.findall(only)) == 1 and made["token_id"][-8:] in only
    assert f"{len(ADMIN_ACTIONS) + 1} in all" in html


async def test_the_audit_page_names_a_bad_filter(admin: Client) -> None:
    html = await page(admin, "/admin/audit?start_time=soon", status=400)
    assert "start_time must be an ISO 8601 time" in html


async def test_the_audit_page_escapes_what_it_shows(admin: Client) -> None:
    await new_project(admin, "<b>bold</b>")
    await post(
        admin,
        "/admin/projects",
        {"name": "<b>bold</b>", "openai_api_key": "sk-xxxxxxxxxx"},
    )
    await audit_page(admin, 2)
    html = await page(admin, "/admin/audit")
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html


async def test_the_audit_page_needs_the_admin_credentials_and_is_linked(
    admin: Client,
) -> None:
    response = await admin.get("/admin/audit")
    assert response.status == 401
    assert 'href="/admin/audit"' in await page(admin, "/admin/")


def test_every_admin_form_that_changes_something_is_audited(
    proxy_env: dict[str, str],
) -> None:
    app = create_admin_app(Settings.from_env({**proxy_env, **ADMIN_ENV}))
    posts = {
        route.resource.canonical: route.handler
        for route in app.router.routes()
        if route.method == "POST" and route.resource is not None
    }
    assert len(posts) >= 10
    assert {path for path, handler in posts.items() if handler not in AUDITED} == set()
