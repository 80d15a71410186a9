"""Admin pages: auth, CSRF and origin checks, security headers, escaping, every page
and form, against the whole app behind a real socket and the fake upstream."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from pytest_aiohttp import AiohttpClient
from yarl import URL

from llm_proxy.admin import create_admin_app
from llm_proxy.admin.flash import OneTimeSlots
from llm_proxy.admin.forms import Pager, optional_int, page_number
from llm_proxy.admin.render import relative, token_status
from llm_proxy.admin.security import SECURITY_HEADERS, is_same_origin
from llm_proxy.auth.crypto import TOKEN_PREFIX
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import REPOSITORY_KEY
from llm_proxy.storage import Repository, Token, TokenFilter, UsageEvent

from ..support import (
    ADMIN_AUTH,
    ADMIN_ENV,
    ADMIN_PASSWORD,
    ADMIN_USER,
    AUTH,
    UPSTREAM_KEY,
    FakeClock,
    bearer,
    with_admin,
)

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
TOKEN_VALUE = re.compile(r'id="token-value"[^>]*>([^<]+)</textarea>')
NOTICE = re.compile(r'<p class="flash" role="status">([^<]+)</p>')
XSS = "<script>alert(1)</script>"
NEW_KEY = "sk-proj-ROTATEDSECRETKEY9876543210wxyz"

Client = TestClient[Any, Any]


@pytest.fixture
def start_admin(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> Callable[..., Any]:
    async def start(**env: str) -> Client:
        settings = Settings.from_env({**proxy_env, **ADMIN_ENV, **env})
        return await aiohttp_client(with_admin(settings))

    return start


@pytest.fixture
async def admin(start_admin: Callable[..., Any]) -> Client:
    client: Client = await start_admin()
    return client


def origin(client: Client) -> str:
    return f"http://{client.host}:{client.port}"


async def page(client: Client, path: str, status: int = 200) -> str:
    response = await client.get(path, headers=ADMIN_AUTH, allow_redirects=False)
    body = await response.text()
    assert response.status == status, body
    assert response.content_type == "text/html"
    return body


async def csrf_of(client: Client) -> str:
    match = CSRF.search(await page(client, "/admin/projects/new"))
    assert match is not None
    return match.group(1)


async def post(
    client: Client,
    path: str,
    data: dict[str, str] | None = None,
    *,
    headers: dict[str, str] | None = None,
    csrf: bool = True,
) -> aiohttp.ClientResponse:
    form = dict(data or {})
    if csrf:
        form["csrf_token"] = await csrf_of(client)
    return await client.post(
        path,
        data=form,
        headers={
            **ADMIN_AUTH,
            **({"Origin": origin(client)} if headers is None else headers),
        },
        allow_redirects=False,
    )


async def new_project(client: Client, name: str | None = None) -> str:
    name = name or f"project-{uuid.uuid4().hex[:8]}"
    data = {"name": name, "description": "for tests", "openai_api_key": UPSTREAM_KEY}
    response = await post(client, "/admin/projects", data)
    assert response.status == 303, await response.text()
    return URL(response.headers["Location"]).path.rsplit("/", 1)[-1]


async def mint(client: Client, project_id: str, **fields: str) -> str:
    """Post the generate form; the 303's Location (the page showing the value)."""
    data = {"project_id": project_id, "duration_minutes": "60", **fields}
    response = await post(client, "/admin/tokens", data)
    assert response.status == 303, await response.text()
    return response.headers["Location"]


async def new_token(client: Client, project_id: str, **fields: str) -> str:
    body = await page(client, await mint(client, project_id, **fields))
    match = TOKEN_VALUE.search(body)
    assert match is not None
    return match.group(1)


async def follow(client: Client, response: aiohttp.ClientResponse) -> str:
    """The page a 303 leads to."""
    assert response.status == 303, await response.text()
    return await page(client, response.headers["Location"])


def notice_of(body: str) -> str | None:
    """The one-time confirmation message of a page, if it has one."""
    match = NOTICE.search(body)
    return None if match is None else match.group(1)


async def first_token(client: Client, project_id: str) -> Token:
    repository: Repository = client.app[REPOSITORY_KEY]
    tokens = await repository.list_tokens(
        TokenFilter(project_id=project_id), now=datetime.now(UTC), limit=1, offset=0
    )
    return tokens[0]


def assert_secure(response: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


# -- access -------------------------------------------------------------------------


async def test_admin_challenges_without_credentials(admin: Client) -> None:
    response = await admin.get("/admin/")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert_secure(response)


async def test_admin_challenge_page_says_how_to_sign_in(admin: Client) -> None:
    wrong = {"Authorization": aiohttp.encode_basic_auth(ADMIN_USER, "not-it-at-all")}
    for headers in ({}, wrong):
        response = await admin.get("/admin/tokens", headers=headers)
        body = await response.text()
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="llm-proxy admin"'
        assert response.content_type == "text/html"
        assert "<title>Sign in required" in body
        assert "Authentication required" in body and "Reload the page" in body
        assert_secure(response)


@pytest.mark.parametrize(
    ("user", "password"),
    [(ADMIN_USER, "wrong-password-123"), ("intruder", ADMIN_PASSWORD), ("", "")],
)
async def test_admin_refuses_wrong_credentials(
    admin: Client, user: str, password: str
) -> None:
    auth = {"Authorization": aiohttp.encode_basic_auth(user, password)}
    response = await admin.get("/admin/", headers=auth)
    assert response.status == 401


async def test_admin_refuses_undecodable_authorization(admin: Client) -> None:
    for header in ("Basic !!!", "Basic " + "//79".strip(), "Bearer abc"):
        response = await admin.get("/admin/", headers={"Authorization": header})
        assert response.status == 401


async def test_admin_accepts_utf8_password(start_admin: Callable[..., Any]) -> None:
    client = await start_admin(ADMIN_PASSWORD="pässwörd-long-enough")
    auth = aiohttp.encode_basic_auth(ADMIN_USER, "pässwörd-long-enough", "utf-8")
    assert (await client.get("/admin/", headers={"Authorization": auth})).status == 200


async def test_admin_is_off_without_credentials(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    client = await aiohttp_client(with_admin(Settings.from_env(proxy_env)))
    response = await client.get("/admin/", headers=ADMIN_AUTH)
    assert response.status == 404


def test_admin_app_needs_credentials(proxy_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="ADMIN_USER"):
        create_admin_app(Settings.from_env(proxy_env))


async def test_admin_bare_prefix_redirects_to_dashboard(admin: Client) -> None:
    response = await admin.get("/admin", headers=ADMIN_AUTH, allow_redirects=False)
    assert response.status == 308
    assert response.headers["Location"] == "/admin/"
    assert_secure(response)


# -- pages ----------------------------------------------------------------------------


async def test_admin_every_page_renders_with_security_headers(admin: Client) -> None:
    project_id = await new_project(admin)
    await new_token(admin, project_id)
    token = await first_token(admin, project_id)
    paths = [
        f"/admin/tokens/{token.id}/created",
        "/admin/",
        "/admin/projects",
        "/admin/projects?q=project&page=2",
        "/admin/projects/new",
        f"/admin/projects/{project_id}",
        f"/admin/projects/{project_id}/delete",
        f"/admin/projects/{project_id}/revoke-tokens",
        "/admin/tokens",
        f"/admin/tokens?project_id={project_id}&status=active&page=x",
        "/admin/tokens?status=bogus",
        f"/admin/tokens/new?project_id={project_id}",
        f"/admin/tokens/{token.id}",
        f"/admin/tokens/{token.id}/revoke",
        "/admin/usage",
        "/admin/usage?period=30d",
        "/admin/usage?period=nonsense",
    ]
    for path in paths:
        response = await admin.get(path, headers=ADMIN_AUTH)
        assert response.status == 200, path
        assert_secure(response)
        assert response.headers["Cache-Control"] == "no-store"
        assert "<script>" not in await response.text()  # only <script src=...>


async def test_admin_static_files_are_cached_and_versioned(admin: Client) -> None:
    body = await page(admin, "/admin/")
    match = re.search(r'href="(/admin/static/admin\.css\?v=[0-9a-f]{12})"', body)
    assert match is not None
    response = await admin.get(match.group(1), headers=ADMIN_AUTH)
    assert response.status == 200
    assert response.content_type == "text/css"
    assert response.headers["Cache-Control"] == "private, max-age=86400"
    assert_secure(response)
    script = await admin.get("/admin/static/admin.js", headers=ADMIN_AUTH)
    assert "clipboard" in await script.text()


async def test_admin_errors_are_html_pages(admin: Client) -> None:
    missing = await page(admin, f"/admin/projects/{uuid.uuid4()}", status=404)
    assert "No project with id" in missing
    assert "404" in await page(admin, "/admin/no-such-page", status=404)
    await page(admin, f"/admin/tokens/{uuid.uuid4()}", status=404)
    response = await admin.put("/admin/projects", headers=ADMIN_AUTH)
    assert response.status == 403  # refused by the CSRF check before routing


async def test_admin_unexpected_failure_is_a_500_page(admin: Client) -> None:
    await admin.app[REPOSITORY_KEY].close()
    body = await page(admin, "/admin/", status=500)
    assert "Internal error" in body


# -- CSRF and origin ------------------------------------------------------------------


async def test_admin_refuses_form_without_csrf_token(admin: Client) -> None:
    data = {"name": "forged", "openai_api_key": UPSTREAM_KEY}
    response = await post(admin, "/admin/projects", data, csrf=False)
    assert response.status == 403
    assert "security token" in await response.text()
    assert_secure(response)
    assert "forged" not in await page(admin, "/admin/projects")


async def test_admin_refuses_wrong_csrf_token(admin: Client) -> None:
    data = {"name": "forged", "openai_api_key": UPSTREAM_KEY, "csrf_token": "0" * 64}
    response = await post(admin, "/admin/projects", data, csrf=False)
    assert response.status == 403


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/admin/projects"},
        {},
    ],
    ids=["cross-site-origin", "null-origin", "cross-site-referer", "no-origin"],
)
async def test_admin_refuses_cross_site_post_even_with_token(
    admin: Client, headers: dict[str, str]
) -> None:
    data = {"name": "forged", "openai_api_key": UPSTREAM_KEY}
    response = await post(admin, "/admin/projects", data, headers=headers)
    assert response.status == 403
    assert "did not come from this site" in await response.text()


async def test_admin_accepts_same_origin_referer_and_forwarded_proto(
    admin: Client,
) -> None:
    data = {"name": "via-referer", "openai_api_key": UPSTREAM_KEY}
    referer = {"Referer": origin(admin) + "/admin/projects/new"}
    assert (await post(admin, "/admin/projects", data, headers=referer)).status == 303
    forwarded = {
        "Origin": f"https://{admin.host}:{admin.port}",
        "X-Forwarded-Proto": "https",
    }
    data["name"] = "via-tls-proxy"
    assert (await post(admin, "/admin/projects", data, headers=forwarded)).status == 303


def _request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("POST", "/admin/projects", headers=headers)


@pytest.mark.parametrize(
    ("given", "headers", "same"),
    [
        ("http://proxy.example", {"Host": "proxy.example"}, True),
        ("http://proxy.example:8443", {"Host": "proxy.example"}, True),
        ("http://proxy.example:81", {"Host": "proxy.example:80"}, False),
        ("http://other.example", {"Host": "proxy.example"}, False),
        ("https://proxy.example", {"Host": "proxy.example"}, False),
        ("http://a.example", {"Host": "b", "X-Forwarded-Host": "a.example"}, True),
        ("http://[::1", {"Host": "proxy.example"}, False),
        ("/relative", {"Host": "proxy.example"}, False),
        ("http://proxy.example", {"Host": "bad host/x"}, False),
    ],
)
def test_admin_same_origin_rules(
    given: str, headers: dict[str, str], same: bool
) -> None:
    assert is_same_origin(given, _request(headers)) is same


# -- projects -------------------------------------------------------------------------


async def test_admin_creates_project_and_never_shows_its_key(admin: Client) -> None:
    project_id = await new_project(admin, "billing")
    detail = await page(admin, f"/admin/projects/{project_id}")
    assert "billing" in detail and "sk-...abcd" in detail
    for path in ("/admin/", "/admin/projects", f"/admin/projects/{project_id}"):
        assert UPSTREAM_KEY not in await page(admin, path)


async def test_admin_create_project_errors_keep_fields_but_not_key(
    admin: Client,
) -> None:
    data = {"name": "keep-me", "description": "desc", "openai_api_key": "short"}
    response = await post(admin, "/admin/projects", data)
    body = await response.text()
    assert response.status == 400
    assert "openai_api_key" in body and 'value="keep-me"' in body
    assert 'value="short"' not in body
    await new_project(admin, "taken")
    data = {"name": "taken", "openai_api_key": UPSTREAM_KEY}
    assert (await post(admin, "/admin/projects", data)).status == 409


async def test_admin_escapes_hostile_project_names(admin: Client) -> None:
    project_id = await new_project(admin, XSS)
    await new_token(admin, project_id)
    for path in (
        "/admin/projects",
        f"/admin/projects/{project_id}",
        f"/admin/projects/{project_id}/delete",
        "/admin/tokens",
        "/admin/tokens/new",
    ):
        body = await page(admin, path)
        assert XSS not in body, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path


async def test_admin_searches_and_pages_projects(admin: Client) -> None:
    for number in range(22):
        await new_project(admin, f"team-{number:02d}")
    await new_project(admin, "other")
    first = await page(admin, "/admin/projects?q=team")
    assert "team-00" in first and "team-21" not in first and "other" not in first
    assert 'href="?q=team&amp;page=2"' in first and "Page 1 of 2" in first
    second = await page(admin, "/admin/projects?q=team&page=2")
    assert "team-21" in second and 'rel="prev"' in second
    assert "No projects match" in await page(admin, "/admin/projects?q=zzz")


async def test_admin_edits_rotates_and_toggles_project(
    admin: Client, fake: FakeUpstreamState
) -> None:
    project_id = await new_project(admin, "before")
    token = await new_token(admin, project_id)
    url = f"/admin/projects/{project_id}"
    edit = {"name": "after", "description": "changed"}
    assert (await post(admin, url, edit)).status == 303
    assert "after" in await page(admin, url)
    rotate = await post(admin, f"{url}/key", {"openai_api_key": NEW_KEY})
    assert rotate.status == 303
    await admin.get("/v1/models", headers=bearer(token))
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {NEW_KEY}"
    assert NEW_KEY not in await page(admin, url)
    assert (await post(admin, f"{url}/active", {"is_active": "0"})).status == 303
    assert "Reactivate project" in await page(admin, url)
    assert (await admin.get("/v1/models", headers=bearer(token))).status == 403
    assert (await post(admin, f"{url}/active", {"is_active": "1"})).status == 303
    assert (await admin.get("/v1/models", headers=bearer(token))).status == 200


async def test_admin_project_edit_errors_show_on_detail_page(admin: Client) -> None:
    await new_project(admin, "first")
    project_id = await new_project(admin, "second")
    url = f"/admin/projects/{project_id}"
    response = await post(admin, url, {"name": "first", "description": ""})
    assert response.status == 409
    assert "already exists" in await response.text()
    bad_key = await post(admin, f"{url}/key", {"openai_api_key": "sk-...abcd"})
    assert bad_key.status == 400
    unknown = await post(admin, f"/admin/projects/{uuid.uuid4()}", {"name": "x"})
    assert unknown.status == 404


async def test_admin_sets_changes_and_clears_project_origins(admin: Client) -> None:
    app_origin = "https://chat.acme.test"
    data = {
        "name": "web",
        "openai_api_key": UPSTREAM_KEY,
        "allowed_origins": "HTTPS://Chat.acme.test\r\n\r\n https://*.acme.org ",
        "require_origin": "1",
    }
    response = await post(admin, "/admin/projects", data)
    shown = browser_origins(await follow(admin, response))
    assert shown == f"{app_origin}, https://*.acme.org; browser pages only"
    project_id = URL(response.headers["Location"]).path.rsplit("/", 1)[-1]
    token = await new_token(admin, project_id)
    from_page = {**bearer(token), "Origin": app_origin}
    assert (await admin.get("/v1/models", headers=from_page)).status == 200
    assert (await admin.get("/v1/models", headers=bearer(token))).status == 403
    url = f"/admin/projects/{project_id}/origins"
    changed = await post(admin, url, {"allowed_origins": "http://localhost:3000"})
    detail = await follow(admin, changed)
    assert browser_origins(detail) == "http://localhost:3000"
    assert "http://localhost:3000</textarea>" in detail
    assert (await admin.get("/v1/models", headers=bearer(token))).status == 200
    cleared = await post(admin, url, {"allowed_origins": ""})
    shown = browser_origins(await follow(admin, cleared))
    assert shown == "the server's (CORS_ALLOWED_ORIGINS)"
    # no origins anywhere now: served as before CORS, without CORS headers
    relayed = await admin.get("/v1/models", headers=from_page)
    assert relayed.status == 200
    assert "Access-Control-Allow-Origin" not in relayed.headers


def fact(detail: str, name: str) -> str:
    """One fact of a project page, tags removed."""
    match = re.search(rf"<dt>{name}</dt><dd>(.*?)</dd>", detail)
    assert match is not None
    return re.sub(r"<[^>]+>", "", match.group(1))


def response_cache(detail: str) -> str:
    """The "Response cache" fact of a project page, tags removed."""
    return fact(detail, "Response cache")


def browser_origins(detail: str) -> str:
    """The "Browser origins" fact of a project page, tags removed."""
    return fact(detail, "Browser origins")


async def test_admin_sets_changes_and_clears_project_cache_ttl(admin: Client) -> None:
    project_id = await new_project(admin, "cached")
    detail = await page(admin, f"/admin/projects/{project_id}")
    assert (
        response_cache(detail) == "only when the client asks (Cache-Control: max-age)"
    )
    url = f"/admin/projects/{project_id}/cache"
    detail = await follow(admin, await post(admin, url, {"cache_ttl_seconds": "600"}))
    assert response_cache(detail) == "its POSTs for up to 600 s"
    assert (
        'name="cache_ttl_seconds" type="number"' in detail and 'value="600"' in detail
    )
    api = await admin.get(f"/manage/projects/{project_id}", headers=AUTH)
    assert (await api.json())["cache_ttl_seconds"] == 600
    detail = await follow(admin, await post(admin, url, {"cache_ttl_seconds": "0"}))
    assert response_cache(detail) == "never: its answers are not stored"
    detail = await follow(admin, await post(admin, url, {"cache_ttl_seconds": " "}))
    assert response_cache(detail).startswith("only when the client asks")


async def test_admin_project_page_shows_the_token_policy_defaults(
    admin: Client,
) -> None:
    project_id = await new_project(admin, "governed")
    detail = await page(admin, f"/admin/projects/{project_id}")
    assert fact(detail, "Token defaults") == "none: each token's own policy applies"
    defaults = {
        "allowed_models": ["gpt-4o-mini", "gpt-4.1-*"],
        "max_output_tokens_cap": 1000,
        "allow_streaming": False,
    }
    url = f"/manage/projects/{project_id}"
    assert (await admin.patch(url, json=defaults, headers=AUTH)).status == 200
    detail = await page(admin, f"/admin/projects/{project_id}")
    assert fact(detail, "Token defaults") == (
        "models: gpt-4o-mini, gpt-4.1-*; output tokens: at most 1000 per call;"
        " streaming refused"
    )


async def test_admin_project_cache_ttl_errors_name_the_field(admin: Client) -> None:
    project_id = await new_project(admin, "cached")
    url = f"/admin/projects/{project_id}/cache"
    for bad, message in [
        ("ten", "cache_ttl_seconds must be a whole number of seconds"),
        ("-1", "cache_ttl_seconds must be between 0 and 31536000, got -1."),
    ]:
        response = await post(admin, url, {"cache_ttl_seconds": bad})
        assert response.status == 400
        assert message in await response.text()


async def test_admin_project_origin_errors_keep_the_form(admin: Client) -> None:
    bad = "https://app.example.com/path"
    data = {"name": "web", "openai_api_key": UPSTREAM_KEY, "allowed_origins": bad}
    response = await post(admin, "/admin/projects", data)
    body = await response.text()
    assert response.status == 400
    assert "no path" in body and bad in body and 'value="web"' in body
    project_id = await new_project(admin, "other")
    url = f"/admin/projects/{project_id}/origins"
    response = await post(admin, url, {"allowed_origins": "*"})
    assert response.status == 400
    assert "is not accepted" in await response.text()


async def test_admin_revokes_all_project_tokens_and_deletes_project(
    admin: Client,
) -> None:
    project_id = await new_project(admin)
    tokens = [await new_token(admin, project_id) for _ in range(2)]
    url = f"/admin/projects/{project_id}"
    confirm = await page(admin, f"{url}/revoke-tokens")
    assert "Revoke all tokens" in confirm and 'name="csrf_token"' in confirm
    assert (await post(admin, f"{url}/revoke-tokens")).status == 303
    for token in tokens:
        assert (await admin.get("/v1/models", headers=bearer(token))).status == 401
    assert "revoked" in await page(admin, url)
    response = await post(admin, f"{url}/delete")
    assert response.status == 303
    assert URL(response.headers["Location"]).path == "/admin/projects"
    await page(admin, url, status=404)


# -- tokens ---------------------------------------------------------------------------


async def test_admin_token_is_shown_once_and_works_until_revoked(
    admin: Client, fake: FakeUpstreamState
) -> None:
    project_id = await new_project(admin)
    location = await mint(admin, project_id, duration_minutes="15", max_requests="5")
    response = await admin.get(location, headers=ADMIN_AUTH)
    body = await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    value = TOKEN_VALUE.search(body).group(1)  # type: ignore[union-attr]
    assert f"curl {origin(admin)}/v1/chat/completions" in body
    assert f'OpenAI(base_url="{origin(admin)}/v1", api_key="{value}")' in body
    assert "in 15 min" in body
    assert (await admin.get("/v1/models", headers=bearer(value))).status == 200
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    token = await first_token(admin, project_id)
    for path in ("/admin/", "/admin/tokens", f"/admin/tokens/{token.id}"):
        assert value not in await page(admin, path)
    detail = await page(admin, f"/admin/tokens/{token.id}")
    assert f"…{value[-4:]}" in detail and "of 5" in detail
    assert re.search(
        r'<time datetime="[^"]+" title="[^"]+ UTC">in 15 min</time>', detail
    )
    assert "Revoke token" in await page(admin, f"/admin/tokens/{token.id}/revoke")
    revoked = await post(admin, f"/admin/tokens/{token.id}/revoke")
    assert URL(revoked.headers["Location"]).path == f"/admin/tokens/{token.id}"
    assert (await admin.get("/v1/models", headers=bearer(value))).status == 401
    assert "revoked" in await page(admin, f"/admin/tokens/{token.id}")


async def test_admin_token_form_sets_calls_in_flight(admin: Client) -> None:
    project_id = await new_project(admin)
    form = await page(admin, f"/admin/tokens/new?project_id={project_id}")
    assert 'name="max_concurrent"' in form
    data = {"project_id": project_id, "duration_minutes": "15", "max_concurrent": "3"}
    await post(admin, "/admin/tokens", data)
    token = await first_token(admin, project_id)
    assert token.max_concurrent == 3
    assert "at most 3 at once" in await page(admin, f"/admin/tokens/{token.id}")
    refused = await post(admin, "/admin/tokens", {**data, "max_concurrent": "0"})
    assert refused.status == 400
    assert "max_concurrent must be between" in await refused.text()


async def test_admin_snippets_use_forwarded_host(admin: Client) -> None:
    project_id = await new_project(admin)
    data = {
        "project_id": project_id,
        "duration_minutes": "60",
        "csrf_token": await csrf_of(admin),
    }
    headers = {
        "Origin": "https://llm.example.com",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "llm.example.com",
    }
    headers = {**ADMIN_AUTH, **headers}
    response = await admin.post(
        "/admin/tokens", data=data, headers=headers, allow_redirects=False
    )
    assert response.status == 303
    shown = await admin.get(response.headers["Location"], headers=headers)
    assert "curl https://llm.example.com/v1/chat/completions" in await shown.text()


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"duration_minutes": "soon"}, 400, "whole number"),
        ({"duration_minutes": ""}, 400, "duration_minutes is required"),
        ({"max_requests": "0"}, 400, "max_requests must be between"),
        ({"duration_minutes": "999999999"}, 400, "duration_minutes must be between"),
    ],
)
async def test_admin_generate_token_form_errors(
    admin: Client, fields: dict[str, str], status: int, message: str
) -> None:
    project_id = await new_project(admin)
    data = {"project_id": project_id, "duration_minutes": "60", **fields}
    response = await post(admin, "/admin/tokens", data)
    assert response.status == status
    body = await response.text()
    assert message in body and "Generate token" in body


async def test_admin_generate_token_refuses_inactive_project(admin: Client) -> None:
    project_id = await new_project(admin)
    await post(admin, f"/admin/projects/{project_id}/active", {"is_active": "0"})
    data = {"project_id": project_id, "duration_minutes": "60"}
    response = await post(admin, "/admin/tokens", data)
    assert response.status == 403
    assert "There is no active project" in await response.text()


async def test_admin_filters_and_pages_tokens(admin: Client) -> None:
    busy, quiet = await new_project(admin, "busy"), await new_project(admin, "quiet")
    for _ in range(21):
        await new_token(admin, busy)
    await new_token(admin, quiet)
    token = await first_token(admin, quiet)
    await post(admin, f"/admin/tokens/{token.id}/revoke")
    first = await page(admin, f"/admin/tokens?project_id={busy}")
    assert "Page 1 of 2" in first and f"project_id={busy}&amp;page=2" in first
    revoked = await page(admin, "/admin/tokens?status=inactive")
    assert f"…{token.token_hint}" in revoked and "1 in all" in revoked
    active = await page(admin, f"/admin/tokens?project_id={quiet}&status=active")
    assert "No tokens match" in active


# -- post/redirect/get, the one-time value and confirmations ---------------------------


async def count_tokens(client: Client, project_id: str) -> int:
    repository: Repository = client.app[REPOSITORY_KEY]
    token_filter = TokenFilter(project_id=project_id)
    return await repository.count_tokens(token_filter, now=datetime.now(UTC))


async def test_admin_reloading_the_created_page_neither_mints_nor_shows_again(
    admin: Client,
) -> None:
    project_id = await new_project(admin)
    location = await mint(admin, project_id)
    token = await first_token(admin, project_id)
    assert URL(location).path == f"/admin/tokens/{token.id}/created"
    first = await page(admin, location)
    value = TOKEN_VALUE.search(first).group(1)  # type: ignore[union-attr]
    assert value[-4:] == token.token_hint and value not in location
    again = await page(admin, location)
    assert TOKEN_VALUE.search(again) is None and value not in again
    assert "shown once" in again and "cannot be shown again" in again
    assert f"/admin/tokens/{token.id}" in again
    assert await count_tokens(admin, project_id) == 1


async def test_admin_token_value_is_only_for_its_own_get_page(admin: Client) -> None:
    project_id = await new_project(admin)
    first = URL(await mint(admin, project_id))
    head = await admin.head(first, headers=ADMIN_AUTH, allow_redirects=False)
    assert head.status == 405  # a HEAD must not use up the one showing
    second = URL(await mint(admin, project_id))
    borrowed = second.with_query(first.query)
    body = await page(admin, str(borrowed))
    assert TOKEN_VALUE.search(body) is None
    assert TOKEN_VALUE.search(await page(admin, str(second))) is not None
    forged = await page(admin, str(second.with_query(show="guessed-slot-id")))
    assert TOKEN_VALUE.search(forged) is None


def test_admin_one_time_slots_are_single_use_bounded_and_short_lived() -> None:
    clock = FakeClock(100.0)
    slots: OneTimeSlots[str] = OneTimeSlots(capacity=2, lifetime_s=10.0, clock=clock)
    first = slots.put("a")
    assert len(first) >= 22 and slots.take(first) == "a"
    assert slots.take(first) is None
    oldest, kept, newest = slots.put("b"), slots.put("c"), slots.put("d")
    assert len(slots) == 2 and len({oldest, kept, newest}) == 3
    assert slots.take(oldest) is None  # evicted to stay within capacity
    assert slots.take(kept) == "c"
    clock.advance(10.0)
    assert slots.take(newest) is None  # expired
    slots.put("e")
    assert len(slots) == 1  # expired slots are dropped on the next put
    assert slots.take("") is None


async def test_admin_generate_form_never_preselects_another_project(
    admin: Client,
) -> None:
    awake = await new_project(admin, "awake")
    asleep = await new_project(admin, "asleep")
    await post(admin, f"/admin/projects/{asleep}/active", {"is_active": "0"})
    placeholder = '<option value="" selected>Choose a project…</option>'
    inactive = await page(admin, f"/admin/tokens/new?project_id={asleep}", 403)
    assert "Project “asleep” is inactive" in inactive
    assert placeholder in inactive and f'value="{awake}" selected' not in inactive
    unknown = await page(admin, f"/admin/tokens/new?project_id={uuid.uuid4()}", 404)
    assert "No project with id" in unknown
    assert placeholder in unknown and f'value="{awake}" selected' not in unknown
    chosen = await page(admin, f"/admin/tokens/new?project_id={awake}")
    assert f'value="{awake}" selected' in chosen and placeholder not in chosen
    assert placeholder in await page(admin, "/admin/tokens/new")


async def test_admin_generate_token_refuses_inactive_project_by_name(
    admin: Client,
) -> None:
    awake = await new_project(admin, "awake")
    asleep = await new_project(admin, "asleep")
    await post(admin, f"/admin/projects/{asleep}/active", {"is_active": "0"})
    data = {"project_id": asleep, "duration_minutes": "60"}
    response = await post(admin, "/admin/tokens", data)
    body = await response.text()
    assert response.status == 403
    assert (
        "Project “asleep” is inactive" in body and "no token can be generated" in body
    )
    assert f'value="{awake}" selected' not in body
    assert await count_tokens(admin, asleep) == 0
    empty = await post(admin, "/admin/tokens", {"duration_minutes": "60"})
    assert empty.status == 400 and "Choose a project" in await empty.text()


async def test_admin_every_action_confirms_once_without_secrets(admin: Client) -> None:
    data = {"name": "flashy", "openai_api_key": UPSTREAM_KEY}
    created = await post(admin, "/admin/projects", data)
    assert notice_of(await follow(admin, created)) == "Project “flashy” created."
    assert notice_of(await page(admin, created.headers["Location"])) is None
    url = URL(created.headers["Location"]).path
    project_id = url.rsplit("/", 1)[-1]
    value = await new_token(admin, project_id)
    token = await first_token(admin, project_id)
    actions = [
        (url, {"name": "renamed", "description": ""}, "Project “renamed” saved."),
        (
            f"{url}/key",
            {"openai_api_key": NEW_KEY},
            "Upstream key of “renamed” rotated to sk-...wxyz; "
            "the next proxied request uses it.",
        ),
        (
            f"{url}/active",
            {"is_active": "0"},
            "Project “renamed” deactivated: its tokens are refused until it is "
            "reactivated.",
        ),
        (f"{url}/active", {"is_active": "1"}, "Project “renamed” reactivated."),
        (
            f"/admin/tokens/{token.id}/revoke",
            {},
            f"Token {TOKEN_PREFIX}…{token.token_hint} revoked.",
        ),
        (
            f"{url}/revoke-tokens",
            {},
            "No token of “renamed” was active (1 already revoked).",
        ),
        (f"{url}/delete", {}, "Project “renamed” deleted, with its tokens."),
    ]
    for path, fields, expected in actions:
        response = await post(admin, path, fields)
        body = await follow(admin, response)
        assert notice_of(body) == expected, path
        assert NEW_KEY not in body and UPSTREAM_KEY not in body and value not in body
        assert notice_of(await page(admin, response.headers["Location"])) is None


async def test_admin_revoking_all_tokens_counts_them(admin: Client) -> None:
    project_id = await new_project(admin, "pair")
    for _ in range(2):
        await new_token(admin, project_id)
    response = await post(admin, f"/admin/projects/{project_id}/revoke-tokens")
    notice = notice_of(await follow(admin, response))
    assert notice == "2 tokens of “pair” revoked."


# -- dashboard and usage --------------------------------------------------------------


def _event(project_id: str | None, token_id: str | None, **fields: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "ts": datetime.now(UTC) - timedelta(seconds=1),
        "project_id": project_id,
        "token_id": token_id,
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status_code": 200,
        "duration_ms": 42.0,
        "model": "gpt-4o-mini",
        "total_tokens": 1000,
    }
    return UsageEvent(**(values | fields))


async def test_admin_dashboard_and_usage_show_real_numbers(admin: Client) -> None:
    project_id = await new_project(admin, "analytics")
    await new_token(admin, project_id)
    token = await first_token(admin, project_id)
    repository: Repository = admin.app[REPOSITORY_KEY]
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    await repository.insert_usage_events(
        [
            _event(project_id, token.id),
            _event(project_id, token.id, status_code=429, endpoint="/v1/limited"),
            _event(project_id, token.id, ts=three_days_ago),
            _event(str(uuid.uuid4()), None, model=None, total_tokens=None),
        ]
    )
    dashboard = await page(admin, "/admin/")
    assert re.search(r"Requests today</dt><dd>3<", dashboard)
    assert re.search(r"Requests, 7 days</dt><dd>4<", dashboard)
    assert re.search(r"Tokens used, 7 days</dt><dd>3,000<", dashboard)
    assert "1 error<" in dashboard
    assert "POST /v1/limited" in dashboard and "deleted project" in dashboard
    usage = await page(admin, "/admin/usage?period=24h")
    assert "analytics" in usage and f"…{token.token_hint} (analytics)" in usage
    assert 'class="bar-fill" width="100.0"' in usage
    detail = await page(admin, f"/admin/projects/{project_id}")
    assert re.search(r"Requests</dt><dd>3<", detail)


# -- helpers --------------------------------------------------------------------------

NOW = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (NOW + timedelta(minutes=14, seconds=10), "in 14 min"),
        (NOW - timedelta(hours=3), "3 h ago"),
        (NOW + timedelta(seconds=20), "just now"),
        (NOW + timedelta(days=3), "in 3 days"),
        (None, "never"),
    ],
)
def test_admin_relative_times(moment: datetime | None, text: str) -> None:
    assert relative(moment, NOW) == text


def test_admin_token_status_names_each_state() -> None:
    base = Token(
        id="t",
        token_hash="h",
        token_hint="abcd",
        project_id="p",
        expires_at=NOW + timedelta(hours=1),
        is_active=True,
        request_count=5,
        max_requests=None,
        rate_limit_per_hour=None,
        created_at=NOW,
        last_used_at=None,
    )
    assert token_status(base, NOW) == "active"
    assert token_status(replace(base, is_active=False), NOW) == "revoked"
    assert token_status(replace(base, expires_at=NOW), NOW) == "expired"
    assert token_status(replace(base, max_requests=5), NOW) == "used up"


def test_admin_pager_and_form_numbers() -> None:
    pager = Pager(page=2, total=41)
    assert (pager.offset, pager.pages, pager.previous, pager.next) == (20, 3, 1, 3)
    assert Pager(page=1, total=0).pages == 1
    assert page_number({"page": "-3"}) == 1
    assert optional_int({"n": " 7 "}, "n") == 7
    assert optional_int({"n": ""}, "n") is None


async def test_admin_token_form_sets_a_policy_shown_on_the_token_page(
    admin: Client, fake: FakeUpstreamState
) -> None:
    project_id = await new_project(admin)
    form = await page(admin, f"/admin/tokens/new?project_id={project_id}")
    for name in ("bind", "allowed_models", "max_output_tokens_cap", "no_streaming"):
        assert f'name="{name}"' in form
    value = await new_token(
        admin,
        project_id,
        bind="user_id=alice\r\n\r\nclient = web-1\r\n",
        allowed_models="gpt-4o-mini, o1*  text-embedding-3-*",
        max_output_tokens_cap="1000",
        no_streaming="1",
    )
    token = await first_token(admin, project_id)
    assert token.policy is not None
    assert dict(token.policy.bind) == {"user_id": "alice", "client": "web-1"}
    assert token.policy.allowed_models == ("gpt-4o-mini", "o1*", "text-embedding-3-*")
    assert token.policy.max_output_tokens_cap == 1000
    assert token.policy.allow_streaming is False
    shown = await page(admin, f"/admin/tokens/{token.id}")
    for fact in (
        "X-Proxy-User-Id",
        "alice",
        "X-Proxy-Client",
        "o1*",
        "1000",
        "refused",
    ):
        assert fact in shown, fact
    headers = {**bearer(value), "X-Proxy-User-Id": "alice", "X-Proxy-Client": "web-1"}
    assert (await admin.get("/v1/models", headers=headers)).status == 200
    assert (await admin.get("/v1/models", headers=bearer(value))).status == 403


async def test_admin_token_page_without_policy_says_so(admin: Client) -> None:
    project_id = await new_project(admin)
    await new_token(admin, project_id)
    token = await first_token(admin, project_id)
    shown = await page(admin, f"/admin/tokens/{token.id}")
    assert "any model" in shown and "no bound headers" in shown


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bind": "alice"}, "key=value"),
        ({"bind": "User=alice"}, "bind key"),
        ({"allowed_models": "x" * 129}, "allowed_models"),
        ({"max_output_tokens_cap": "lots"}, "whole number"),
        (
            {"max_output_tokens_cap": "20000000"},
            "max_output_tokens_cap must be between",
        ),
    ],
)
async def test_admin_token_policy_errors_keep_the_form(
    admin: Client, fields: dict[str, str], message: str
) -> None:
    project_id = await new_project(admin)
    data = {"project_id": project_id, "duration_minutes": "60", "no_streaming": "1"}
    response = await post(admin, "/admin/tokens", {**data, **fields})
    assert response.status == 400
    body = await response.text()
    assert message in body and "Generate token" in body
    assert 'name="no_streaming" value="1" checked' in body
