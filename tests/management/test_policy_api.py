"""A token's policy and its project's defaults through the management API."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.management.openapi import openapi_document

from ..support import AUTH, create_project, create_token

Client = TestClient[Any, Any]
POLICY = {
    "bind": {"user_id": "alice", "client_ip": "10.0.0.7"},
    "allowed_models": ["gpt-4o-mini", "gpt-4.1-*"],
    "max_output_tokens_cap": 1000,
    "allow_streaming": False,
}
NO_POLICY = {
    "bind": {},
    "allowed_models": None,
    "max_output_tokens_cap": None,
    "allow_streaming": True,
}


def _schema_fields(name: str) -> set[str]:
    return set(openapi_document()["components"]["schemas"][name]["properties"])


async def test_a_token_policy_is_shown_at_creation_in_details_and_lists(
    client: Client,
) -> None:
    project = await create_project(client)
    created = await create_token(client, project["project_id"], **POLICY)
    assert {k: created[k] for k in POLICY} == POLICY
    assert set(created) == _schema_fields("TokenCreated")
    item = await client.get(f"/manage/tokens/{created['token_id']}", headers=AUTH)
    shown = await item.json()
    assert {k: shown[k] for k in POLICY} == POLICY
    assert set(shown) == _schema_fields("Token")
    plain = await create_token(client, project["project_id"])
    listed = await (await client.get("/manage/tokens", headers=AUTH)).json()
    by_id = {t["token_id"]: t for t in listed}
    assert {k: by_id[created["token_id"]][k] for k in POLICY} == POLICY
    assert {k: by_id[plain["token_id"]][k] for k in POLICY} == NO_POLICY


async def test_project_defaults_are_set_changed_one_by_one_and_cleared(
    client: Client,
) -> None:
    project = await create_project(
        client, allowed_models=["gpt-4o*"], max_output_tokens_cap=2000
    )
    assert set(project) == _schema_fields("Project")
    assert "bind" not in project
    assert project["allowed_models"] == ["gpt-4o*"]
    assert project["allow_streaming"] is True
    url = f"/manage/projects/{project['project_id']}"
    changed = await client.patch(url, json={"allow_streaming": False}, headers=AUTH)
    body = await changed.json()
    assert (body["allowed_models"], body["max_output_tokens_cap"]) == (
        ["gpt-4o*"],
        2000,
    )
    assert body["allow_streaming"] is False
    cleared = await client.patch(
        url,
        json={
            "allowed_models": None,
            "max_output_tokens_cap": None,
            "allow_streaming": True,
        },
        headers=AUTH,
    )
    body = await cleared.json()
    assert {k: body[k] for k in NO_POLICY if k != "bind"} == {
        k: v for k, v in NO_POLICY.items() if k != "bind"
    }
    again = await (await client.get(url, headers=AUTH)).json()
    assert again == body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"bind": {"User": "alice"}}, "bind"),
        ({"bind": {"1user": "alice"}}, "bind"),
        ({"bind": {"user_id": ""}}, "bind"),
        ({"bind": {"user_id": " alice"}}, "bind"),
        ({"bind": {"user_id": "al\nice"}}, "bind"),
        ({"bind": {"user_id": "élodie"}}, "bind"),
        ({"bind": {"user_id": "a" * 257}}, "bind"),
        ({"bind": {"user_id": 7}}, "bind"),
        ({"bind": {f"k{i}": "v" for i in range(9)}}, "bind"),
        ({"bind": {"k" * 65: "v"}}, "bind"),
        ({"bind": "user_id=alice"}, "bind"),
        ({"allowed_models": []}, "allowed_models"),
        ({"allowed_models": "gpt-4o"}, "allowed_models"),
        ({"allowed_models": ["gpt 4o"]}, "allowed_models"),
        ({"allowed_models": [""]}, "allowed_models"),
        ({"allowed_models": [7]}, "allowed_models"),
        ({"allowed_models": ["m" * 129]}, "allowed_models"),
        ({"allowed_models": [f"m{i}" for i in range(65)]}, "allowed_models"),
        ({"max_output_tokens_cap": 0}, "max_output_tokens_cap"),
        ({"max_output_tokens_cap": 10_000_001}, "max_output_tokens_cap"),
        ({"max_output_tokens_cap": "1000"}, "max_output_tokens_cap"),
        ({"max_output_tokens_cap": True}, "max_output_tokens_cap"),
        ({"allow_streaming": "no"}, "allow_streaming"),
    ],
)
async def test_a_bad_policy_field_is_refused_naming_it(
    client: Client, fields: dict[str, Any], param: str
) -> None:
    project = await create_project(client)
    body = {"project_id": project["project_id"], "duration_minutes": 60, **fields}
    response = await client.post("/manage/tokens", json=body, headers=AUTH)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["param"] == param and param in error["message"]
    tokens = await (await client.get("/manage/tokens", headers=AUTH)).json()
    assert tokens == []


async def test_the_limits_of_a_policy_are_accepted(client: Client) -> None:
    project = await create_project(client)
    fields = {
        "bind": {f"key_{i}": "~" * 256 for i in range(8)} | {"k" * 64: "a b"},
        "allowed_models": [f"model-{i}-*" for i in range(64)],
        "max_output_tokens_cap": 10_000_000,
    }
    fields["bind"].pop("key_0")
    created = await create_token(client, project["project_id"], **fields)
    assert created["allowed_models"] == fields["allowed_models"]
    assert len(created["bind"]) == 8


async def test_a_project_has_no_bind(client: Client) -> None:
    body = {"name": "p", "openai_api_key": "sk-proj-0123456789abcdef", "bind": {}}
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "bind"
    project = await create_project(client)
    url = f"/manage/projects/{project['project_id']}"
    bad = await client.patch(url, json={"max_output_tokens_cap": -1}, headers=AUTH)
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "max_output_tokens_cap"
