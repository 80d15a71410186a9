"""A project's browser origins through the management API: checked at set time,
shown in every project answer, changed and cleared by PATCH, described by OpenAPI."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.management.openapi import openapi_document
from llm_proxy.origins import MAX_ORIGINS

from ..support import AUTH, UPSTREAM_KEY, create_project

Client = TestClient[Any, Any]


async def refused(response: Any, param: str) -> str:
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["param"] == param
    message: str = error["message"]
    return message


async def test_project_origins_are_stored_canonical_and_shown_everywhere(
    client: Client,
) -> None:
    plain = await create_project(client, "plain")
    assert (plain["allowed_origins"], plain["require_origin"]) == ([], False)
    project = await create_project(
        client,
        "browser",
        allowed_origins=["HTTPS://App.Example.com:443", "https://*.example.org"],
        require_origin=True,
    )
    expected = ["https://app.example.com", "https://*.example.org"]
    assert (project["allowed_origins"], project["require_origin"]) == (expected, True)
    url = f"/manage/projects/{project['project_id']}"
    detail = await (await client.get(url, headers=AUTH)).json()
    assert detail["allowed_origins"] == expected and detail["require_origin"] is True
    listed = await (await client.get("/manage/projects", headers=AUTH)).json()
    assert [p["allowed_origins"] for p in listed] == [[], expected]


async def test_project_origins_change_clear_and_stay_when_left_out(
    client: Client,
) -> None:
    project = await create_project(client, allowed_origins=["https://a.example"])
    url = f"/manage/projects/{project['project_id']}"
    kept = await client.patch(url, json={"description": "d"}, headers=AUTH)
    assert (await kept.json())["allowed_origins"] == ["https://a.example"]
    changed = await client.patch(
        url,
        json={"allowed_origins": ["http://localhost:5173"], "require_origin": True},
        headers=AUTH,
    )
    body = await changed.json()
    assert (body["allowed_origins"], body["require_origin"]) == (
        ["http://localhost:5173"],
        True,
    )
    cleared = await client.patch(
        "/manage/projects",
        json={
            "project_id": project["project_id"],
            "allowed_origins": None,
            "require_origin": False,
        },
        headers=AUTH,
    )
    body = await cleared.json()
    assert (body["allowed_origins"], body["require_origin"]) == ([], False)


@pytest.mark.parametrize(
    ("origins", "says"),
    [
        (["https://app.example.com/"], "no path"),
        (["*"], "'*'"),
        (["null"], "http:// or https://"),
        (["https://*.com"], "two labels"),
        ([f"https://h{n}.example" for n in range(MAX_ORIGINS + 1)], "at most 32"),
        ([1], "array of strings"),
        ("https://app.example.com", "an array"),
    ],
)
async def test_bad_origins_are_refused_naming_the_field(
    client: Client, origins: Any, says: str
) -> None:
    body = {"name": "x", "openai_api_key": UPSTREAM_KEY, "allowed_origins": origins}
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    assert says in await refused(response, "allowed_origins")
    project = await create_project(client, "y")
    url = f"/manage/projects/{project['project_id']}"
    response = await client.patch(url, json={"allowed_origins": origins}, headers=AUTH)
    assert says in await refused(response, "allowed_origins")


async def test_require_origin_must_be_a_boolean(client: Client) -> None:
    body = {"name": "x", "openai_api_key": UPSTREAM_KEY, "require_origin": "yes"}
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    await refused(response, "require_origin")


def test_openapi_describes_the_origin_fields() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name in ("Project", "ProjectCreate", "ProjectUpdate", "ProjectUpdateWithId"):
        properties = schemas[name]["properties"]
        assert properties["allowed_origins"]["maxItems"] == MAX_ORIGINS
        assert properties["require_origin"]["type"] == "boolean"
