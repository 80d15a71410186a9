"""The management API over a real socket, on a real SQLite file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.management.api import ROUTES
from llm_proxy.management.openapi import openapi_document

from ..support import AUTH, UPSTREAM_KEY, create_project, create_token

Client = TestClient[Any, Any]


async def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


async def test_project_create_returns_201_with_seed_shape(client: Client) -> None:
    project = await create_project(
        client, "alpha", description="first", metadata={"team": "ml"}
    )
    assert set(project) >= {
        "project_id",
        "name",
        "description",
        "metadata",
        "created_at",
        "is_active",
    }
    assert project["metadata"] == {"team": "ml"} and project["is_active"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", project["created_at"])
    assert UPSTREAM_KEY not in str(project)
    assert project["api_key_hint"] == "sk-...abcd"


async def test_project_duplicate_name_is_409(client: Client) -> None:
    await create_project(client, "same")
    response = await client.post(
        "/manage/projects",
        json={"name": "same", "openai_api_key": UPSTREAM_KEY},
        headers=AUTH,
    )
    error = await error_of(response, 409)
    assert error["param"] == "name"


async def test_project_list_get_and_pagination(client: Client) -> None:
    ids = [(await create_project(client, f"p{i}"))["project_id"] for i in range(3)]
    response = await client.get("/manage/projects?limit=2&offset=1", headers=AUTH)
    assert response.status == 200
    assert response.headers["X-Total-Count"] == "3"
    assert [p["project_id"] for p in await response.json()] == ids[1:3]
    one = await client.get(f"/manage/projects/{ids[0]}", headers=AUTH)
    assert (await one.json())["name"] == "p0"
    missing = await client.get("/manage/projects/nope", headers=AUTH)
    await error_of(missing, 404)


async def test_project_patch_item_and_seed_body_forms(client: Client) -> None:
    project_id = (await create_project(client, "before"))["project_id"]
    response = await client.patch(
        f"/manage/projects/{project_id}",
        json={"name": "after", "metadata": {"k": 1}},
        headers=AUTH,
    )
    assert response.status == 200
    body = await response.json()
    assert body["name"] == "after" and body["metadata"] == {"k": 1}
    assert "updated_at" in body
    response = await client.patch(
        "/manage/projects",
        json={"project_id": project_id, "description": "seed form", "is_active": False},
        headers=AUTH,
    )
    body = await response.json()
    assert body["description"] == "seed form" and body["is_active"] is False


async def test_project_patch_new_key_is_never_echoed(client: Client) -> None:
    project_id = (await create_project(client))["project_id"]
    new_key = "sk-proj-ROTATEDKEY9876543210wxyz"
    response = await client.patch(
        f"/manage/projects/{project_id}", json={"openai_api_key": new_key}, headers=AUTH
    )
    text = await response.text()
    assert response.status == 200 and new_key not in text
    assert (await response.json())["api_key_hint"] == "sk-...wxyz"


async def test_project_delete_removes_project_and_tokens(client: Client) -> None:
    project_id = (await create_project(client))["project_id"]
    token = await create_token(client, project_id)
    response = await client.delete(f"/manage/projects/{project_id}", headers=AUTH)
    assert response.status == 204
    await error_of(
        await client.get(f"/manage/projects/{project_id}", headers=AUTH), 404
    )
    gone = await client.get(f"/manage/tokens/{token['token_id']}", headers=AUTH)
    await error_of(gone, 404)
    again = await client.delete(
        "/manage/projects", json={"project_id": project_id}, headers=AUTH
    )
    await error_of(again, 404)


async def test_token_create_returns_value_once(client: Client) -> None:
    project_id = (await create_project(client))["project_id"]
    token = await create_token(
        client, project_id, max_requests=5, rate_limit_per_hour=60
    )
    assert set(token) >= {"token", "token_id", "project_id", "expires_at"}
    assert token["token"].startswith("wt-") and len(token["token"]) > 40
    listed = await client.get(f"/manage/tokens?project_id={project_id}", headers=AUTH)
    text = await listed.text()
    assert token["token"] not in text
    [item] = await listed.json()
    assert item["token_hint"] == token["token"][-4:]
    assert item["max_requests"] == 5 and item["rate_limit_per_hour"] == 60
    assert item["request_count"] == 0 and item["is_active"] is True
    one = await client.get(f"/manage/tokens/{token['token_id']}", headers=AUTH)
    assert token["token"] not in await one.text()


@pytest.mark.parametrize("minutes", [0, -1, 525601])
async def test_token_duration_bounds(client: Client, minutes: int) -> None:
    project_id = (await create_project(client))["project_id"]
    response = await client.post(
        "/manage/tokens",
        json={"project_id": project_id, "duration_minutes": minutes},
        headers=AUTH,
    )
    assert (await error_of(response, 400))["param"] == "duration_minutes"


async def test_token_for_unknown_or_inactive_project(client: Client) -> None:
    response = await client.post(
        "/manage/tokens",
        json={"project_id": "nope", "duration_minutes": 5},
        headers=AUTH,
    )
    await error_of(response, 404)
    project_id = (
        await create_project(client, is_active=None)
        if False
        else await create_project(client)
    )["project_id"]
    await client.patch(
        f"/manage/projects/{project_id}", json={"is_active": False}, headers=AUTH
    )
    response = await client.post(
        "/manage/tokens",
        json={"project_id": project_id, "duration_minutes": 5},
        headers=AUTH,
    )
    assert (await error_of(response, 403))["code"] == "project_inactive"


async def test_token_revoke_by_value_id_and_item_is_idempotent(client: Client) -> None:
    project_id = (await create_project(client))["project_id"]
    first, second, third = [await create_token(client, project_id) for _ in range(3)]
    for _ in range(2):
        r1 = await client.delete(
            "/manage/tokens", json={"token": first["token"]}, headers=AUTH
        )
        r2 = await client.delete(
            "/manage/tokens", json={"token_id": second["token_id"]}, headers=AUTH
        )
        r3 = await client.delete(f"/manage/tokens/{third['token_id']}", headers=AUTH)
        assert (r1.status, r2.status, r3.status) == (204, 204, 204)
    listed = await client.get("/manage/tokens?active=false", headers=AUTH)
    assert {t["token_id"] for t in await listed.json()} == {
        first["token_id"],
        second["token_id"],
        third["token_id"],
    }
    active = await client.get("/manage/tokens?active=true", headers=AUTH)
    assert await active.json() == []


async def test_token_delete_body_needs_exactly_one_field(client: Client) -> None:
    response = await client.delete("/manage/tokens", json={}, headers=AUTH)
    await error_of(response, 400)
    response = await client.delete(
        "/manage/tokens", json={"token": "a", "token_id": "b"}, headers=AUTH
    )
    await error_of(response, 400)


async def test_bulk_revoke_counts(client: Client) -> None:
    project_id = (await create_project(client))["project_id"]
    tokens = [await create_token(client, project_id) for _ in range(3)]
    await client.delete(f"/manage/tokens/{tokens[0]['token_id']}", headers=AUTH)
    response = await client.post(
        f"/manage/projects/{project_id}/tokens/revoke", headers=AUTH
    )
    assert await response.json() == {
        "revoked_count": 2,
        "already_revoked_count": 1,
        "total_tokens": 3,
    }
    missing = await client.post("/manage/projects/nope/tokens/revoke", headers=AUTH)
    await error_of(missing, 404)


def _concrete(path: str) -> str:
    return path.replace("{project_id}", "some-id").replace("{token_id}", "some-id")


@pytest.mark.parametrize(
    ("method", "path"), [(m, p) for m, p, _ in ROUTES if "openapi" not in p]
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": "Basic dGVzdDp0ZXN0"},
        {"Authorization": "Bearer"},
    ],
)
async def test_every_route_rejects_missing_or_wrong_token(
    client: Client, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await client.request(
        method, "/manage" + _concrete(path), headers=headers
    )
    error = await error_of(response, 401)
    assert error["code"] == "invalid_management_token"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/manage/projects", {"name": "x"}, "openai_api_key"),
        ("/manage/projects", {"name": 5, "openai_api_key": UPSTREAM_KEY}, "name"),
        (
            "/manage/projects",
            {"name": "x", "openai_api_key": UPSTREAM_KEY, "extra": 1},
            "extra",
        ),
        (
            "/manage/projects",
            {"name": "x", "openai_api_key": "sk-...abcd"},
            "openai_api_key",
        ),
        ("/manage/projects", {"name": "", "openai_api_key": UPSTREAM_KEY}, "name"),
        (
            "/manage/projects",
            {"name": "x", "openai_api_key": UPSTREAM_KEY, "metadata": []},
            "metadata",
        ),
        ("/manage/tokens", {"project_id": "p"}, "duration_minutes"),
        (
            "/manage/tokens",
            {"project_id": "p", "duration_minutes": "60"},
            "duration_minutes",
        ),
        (
            "/manage/tokens",
            {"project_id": "p", "duration_minutes": True},
            "duration_minutes",
        ),
        (
            "/manage/tokens",
            {"project_id": "p", "duration_minutes": 1.5},
            "duration_minutes",
        ),
        (
            "/manage/tokens",
            {"project_id": "p", "duration_minutes": 5, "max_requests": 0},
            "max_requests",
        ),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    client: Client, path: str, body: dict[str, Any], param: str
) -> None:
    if path == "/manage/tokens" and body.get("max_requests") == 0:
        body["project_id"] = (await create_project(client))["project_id"]
    response = await client.post(path, json=body, headers=AUTH)
    error = await error_of(response, 400)
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe", b"null"]
)
async def test_malformed_json_is_400(client: Client, raw: bytes) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post("/manage/projects", data=raw, headers=headers)
    await error_of(response, 400)


async def test_oversized_body_is_413(client: Client) -> None:
    body = b'{"name": "' + b"x" * 70_000 + b'"}'
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post("/manage/projects", data=body, headers=headers)
    await error_of(response, 413)


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "offset=-1", "limit=1001"])
async def test_bad_pagination_is_400(client: Client, query: str) -> None:
    response = await client.get(f"/manage/projects?{query}", headers=AUTH)
    await error_of(response, 400)
    response = await client.get(f"/manage/tokens?{query}", headers=AUTH)
    await error_of(response, 400)


async def test_bad_active_filter_is_400(client: Client) -> None:
    response = await client.get("/manage/tokens?active=perhaps", headers=AUTH)
    assert (await error_of(response, 400))["param"] == "active"


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    await error_of(await client.get("/manage/nothing", headers=AUTH), 404)
    await error_of(await client.get("/nowhere"), 404)
    response = await client.put("/manage/projects", headers=AUTH)
    await error_of(response, 405)


async def test_openapi_document_matches_routes(client: Client) -> None:
    response = await client.get("/manage/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    registered = {(method, "/manage" + path) for method, path, _ in ROUTES}
    assert documented == registered
    assert document == openapi_document()


async def test_secrets_never_reach_the_database_file(
    client: Client, tmp_path: Path
) -> None:
    project_id = (await create_project(client))["project_id"]
    token = await create_token(client, project_id)
    await client.get("/manage/tokens", headers=AUTH)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("proxy.db*") if p.is_file())
    assert raw, "the database file exists"
    assert UPSTREAM_KEY.encode() not in raw
    assert token["token"].encode() not in raw


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "a\u0000b", "openai_api_key": UPSTREAM_KEY}, "name"),
        (
            {"name": "ok", "openai_api_key": UPSTREAM_KEY, "description": "\u0000"},
            "description",
        ),
        (
            {"name": "ok", "openai_api_key": UPSTREAM_KEY, "metadata": {"k\u0000": 1}},
            "metadata",
        ),
        (
            {
                "name": "ok",
                "openai_api_key": UPSTREAM_KEY,
                "metadata": {"k": ["\u0000"]},
            },
            "metadata",
        ),
    ],
)
async def test_nul_characters_are_refused_naming_the_field(
    client: Client, body: dict[str, Any], param: str
) -> None:
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    assert (await error_of(response, 400))["param"] == param


async def test_nul_in_search_is_refused(client: Client) -> None:
    response = await client.get("/manage/projects?search=%00", headers=AUTH)
    assert (await error_of(response, 400))["param"] == "search"
    response = await client.get("/manage/tokens?project_id=%00", headers=AUTH)
    assert (await error_of(response, 400))["param"] == "project_id"


async def test_revoking_an_unknown_token_is_a_404_not_a_silent_204(
    client: Client,
) -> None:
    unknown = await client.delete("/manage/tokens/no-such-token-id", headers=AUTH)
    assert (await error_of(unknown, 404))["param"] == "token_id"
    by_id = await client.delete(
        "/manage/tokens", json={"token_id": "no-such-token-id"}, headers=AUTH
    )
    await error_of(by_id, 404)
    by_value = await client.delete(
        "/manage/tokens", json={"token": "wt-not-a-real-token"}, headers=AUTH
    )
    body = await error_of(by_value, 404)
    assert "wt-not-a-real-token" not in body["message"]  # a value is never echoed


async def test_a_token_is_found_by_its_value_without_putting_it_in_a_url(
    client: Client,
) -> None:
    project_id = (await create_project(client))["project_id"]
    token = await create_token(client, project_id)
    found = await client.post(
        "/manage/tokens/lookup", json={"token": token["token"]}, headers=AUTH
    )
    assert found.status == 200
    data = await found.json()
    assert data["token_id"] == token["token_id"] and "token" not in data
    missing = await client.post(
        "/manage/tokens/lookup", json={"token": "wt-unknown"}, headers=AUTH
    )
    await error_of(missing, 404)
    refused = await client.post("/manage/tokens/lookup", json={}, headers=AUTH)
    await error_of(refused, 400)


async def test_max_concurrent_is_set_shown_changed_and_cleared(client: Client) -> None:
    plain = await create_project(client, "plain")
    assert plain["max_concurrent"] is None
    project = await create_project(client, "capped", max_concurrent=5)
    project_id = project["project_id"]
    assert project["max_concurrent"] == 5
    shown = await (
        await client.get(f"/manage/projects/{project_id}", headers=AUTH)
    ).json()
    assert shown["max_concurrent"] == 5
    listed = await (await client.get("/manage/projects", headers=AUTH)).json()
    assert [p["max_concurrent"] for p in listed] == [None, 5]
    url = f"/manage/projects/{project_id}"
    renamed = await client.patch(url, json={"name": "renamed"}, headers=AUTH)
    assert (await renamed.json())["max_concurrent"] == 5  # absent: unchanged
    raised = await client.patch(url, json={"max_concurrent": 9}, headers=AUTH)
    assert (await raised.json())["max_concurrent"] == 9
    cleared = await client.patch(url, json={"max_concurrent": None}, headers=AUTH)
    assert (await cleared.json())["max_concurrent"] is None
    token = await create_token(client, project_id, max_concurrent=2)
    assert token["max_concurrent"] == 2
    token_url = f"/manage/tokens/{token['token_id']}"
    shown = await (await client.get(token_url, headers=AUTH)).json()
    assert shown["max_concurrent"] == 2
    listed = await (await client.get("/manage/tokens", headers=AUTH)).json()
    assert [t["max_concurrent"] for t in listed] == [2]
    default = await create_token(client, project_id, max_concurrent=None)
    assert default["max_concurrent"] is None


@pytest.mark.parametrize("value", [0, -1, "3", True, 1.5, 2**31])
async def test_bad_max_concurrent_is_400_naming_the_field(
    client: Client, value: Any
) -> None:
    refused = await client.post(
        "/manage/projects",
        json={"name": "x", "openai_api_key": UPSTREAM_KEY, "max_concurrent": value},
        headers=AUTH,
    )
    assert (await error_of(refused, 400))["param"] == "max_concurrent"
    project_id = (await create_project(client))["project_id"]
    patched = await client.patch(
        f"/manage/projects/{project_id}", json={"max_concurrent": value}, headers=AUTH
    )
    assert (await error_of(patched, 400))["param"] == "max_concurrent"
    token = await client.post(
        "/manage/tokens",
        json={"project_id": project_id, "duration_minutes": 5, "max_concurrent": value},
        headers=AUTH,
    )
    assert (await error_of(token, 400))["param"] == "max_concurrent"
