"""`/manage/audit` against the whole app behind a real socket: every management action
and refused sign-in is recorded off the request path, read back with the filters and
pages of the API, with the client's address, the request id and never a secret."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from ..support import AUTH, MANAGEMENT_TOKEN, bearer, create_project, create_token
from .support import (
    ROTATED_KEY,
    actions,
    assert_no_secret,
    audit_env,
    audit_page,
    audit_table_dump,
)

Client = TestClient[Any, Any]


@pytest.fixture
async def audited(start_proxy: Callable[..., Any], tmp_path: Path) -> Client:
    client: Client = await start_proxy(**audit_env(tmp_path))
    return client


async def run_script(client: Client) -> dict[str, Any]:
    """Every kind of management action once, a refusal, a bad token; what it made."""
    project = await create_project(client, "audited")
    project_id = project["project_id"]
    url = f"/manage/projects/{project_id}"
    patches = [{"name": "renamed"}, {"openai_api_key": ROTATED_KEY}]
    patches += [{"is_active": False}, {"is_active": True}]
    for change in patches:
        response = await client.patch(url, json=change, headers=AUTH)
        assert response.status == 200, await response.text()
    first = await create_token(client, project_id)
    second = await create_token(client, project_id)
    by_value = await client.delete(
        "/manage/tokens", json={"token": first["token"]}, headers=AUTH
    )
    assert by_value.status == 204
    by_id = await client.delete(f"/manage/tokens/{second['token_id']}", headers=AUTH)
    assert by_id.status == 204
    revoke_all = await client.post(f"{url}/tokens/revoke", headers=AUTH)
    assert revoke_all.status == 200
    refused = await client.post(
        "/manage/tokens",
        json={"project_id": "no-such-project", "duration_minutes": 5},
        headers=AUTH,
    )
    assert refused.status == 404
    bad = await client.get("/manage/projects", headers=bearer("wrong-token-0123"))
    assert bad.status == 401
    deleted = await client.delete(url, headers=AUTH)
    assert deleted.status == 204
    return {"project_id": project_id, "tokens": [first, second]}


SCRIPT_ACTIONS = [
    ("project.create", "success"),
    ("project.update", "success"),
    ("project.rotate_key", "success"),
    ("project.deactivate", "success"),
    ("project.activate", "success"),
    ("token.create", "success"),
    ("token.create", "success"),
    ("token.revoke", "success"),
    ("token.revoke", "success"),
    ("project.revoke_tokens", "success"),
    ("token.create", "failure"),
    ("auth.failed", "denied"),
    ("project.delete", "success"),
]


async def test_every_management_action_is_recorded_in_order(audited: Client) -> None:
    made = await run_script(audited)
    page = await audit_page(audited, len(SCRIPT_ACTIONS))
    assert actions(page) == SCRIPT_ACTIONS
    events = list(reversed(page["events"]))
    project_id = made["project_id"]
    first, second = made["tokens"]
    assert all(e["project_id"] == project_id for e in events[:10] if e["project_id"])
    assert [e["token_id"] for e in events[5:9]] == [
        first["token_id"],
        second["token_id"],
        first["token_id"],
        second["token_id"],
    ]
    assert events[1]["metadata"] == {"fields": ["name"]}
    assert events[9]["metadata"] == {"revoked_count": 0}
    assert events[10]["reason"] == "No project with id 'no-such-project'."
    assert events[10]["project_id"] == "no-such-project"
    assert events[11]["actor"] == "management_api"
    assert events[11]["reason"] == "wrong token"
    assert events[11]["metadata"] == {"surface": "management"}
    assert {e["actor"] for e in events} == {"management_api"}
    assert {e["client_ip"] for e in events} == {"127.0.0.1"}


async def test_no_secret_reaches_the_rows_the_file_or_the_answers(
    audited: Client, tmp_path: Path
) -> None:
    made = await run_script(audited)
    page = await audit_page(audited, len(SCRIPT_ACTIONS))
    values = [token["token"] for token in made["tokens"]]
    assert_no_secret(orjson.dumps(page).decode(), *values)
    assert_no_secret(audit_table_dump(tmp_path / "proxy.db"), *values)
    jsonl = tmp_path / "audit.jsonl"
    lines = [orjson.loads(line) for line in jsonl.read_bytes().splitlines()]
    assert [line["event_id"] for line in lines] == [
        e["id"] for e in reversed(page["events"])
    ]
    assert_no_secret(jsonl.read_text(), *values)
    one = await audited.get(f"/manage/audit/{page['events'][0]['id']}", headers=AUTH)
    assert await one.json() == page["events"][0]


async def test_the_request_id_is_the_clients_and_comes_back(audited: Client) -> None:
    headers = {**AUTH, "X-Request-ID": "change-4711"}
    response = await audited.post(
        "/manage/projects",
        json={"name": "traced", "openai_api_key": "sk-test-0123456789"},
        headers=headers,
    )
    assert response.headers["X-Request-ID"] == "change-4711"
    page = await audit_page(audited, 1)
    assert page["events"][0]["request_id"] == "change-4711"
    refused = await audited.patch(
        "/manage/projects/nope", json={"name": "x"}, headers=AUTH
    )
    assert refused.status == 404
    page = await audit_page(audited, 2)
    assert page["events"][0]["request_id"] not in (None, "change-4711")


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    forwarded = {**AUTH, "X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
    trusted = await start_proxy(**audit_env(tmp_path, TRUSTED_PROXIES="127.0.0.1"))
    await trusted.post("/manage/projects/nope/tokens/revoke", headers=forwarded)
    page = await audit_page(trusted, 1)
    assert page["events"][0]["client_ip"] == "203.0.113.7"
    other_db = f"sqlite:///{tmp_path / 'untrusted.db'}"
    untrusted = await start_proxy(**audit_env(tmp_path, DATABASE_URL=other_db))
    await untrusted.post("/manage/projects/nope/tokens/revoke", headers=forwarded)
    page = await audit_page(untrusted, 1)
    assert page["events"][0]["client_ip"] == "127.0.0.1"


async def test_filters_and_pages_narrow_the_listing(audited: Client) -> None:
    made = await run_script(audited)
    await audit_page(audited, len(SCRIPT_ACTIONS))
    revokes = await audit_page(audited, 2, action="token.revoke")
    assert actions(revokes) == [("token.revoke", "success")] * 2
    denied = await audit_page(audited, 1, outcome="denied")
    assert actions(denied) == [("auth.failed", "denied")]
    token_id = made["tokens"][0]["token_id"]
    of_token = await audit_page(audited, 2, token_id=token_id)
    assert actions(of_token) == [
        ("token.create", "success"),
        ("token.revoke", "success"),
    ]
    nobody = await audit_page(audited, 0, actor="operator")
    assert nobody["events"] == []
    paged = await audit_page(audited, 0, page="2", page_size="5")
    assert len(paged["events"]) == 5
    assert paged["pagination"] == {
        "page": 2,
        "page_size": 5,
        "total_count": len(SCRIPT_ACTIONS),
        "total_pages": 3,
        "has_next": True,
        "has_prev": True,
    }
    newest = paged["events"][0]["timestamp"]
    later = await audit_page(audited, 0, start_time=newest)
    assert len(later["events"]) == 6  # page 1 and the newest of page 2
    earlier = await audit_page(audited, 0, end_time=newest.removesuffix("Z"))
    assert len(earlier["events"]) == len(SCRIPT_ACTIONS) - 6


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"outcome": "maybe"}, "outcome"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"page_size": "101"}, "page_size"),
        ({"page": "0"}, "page"),
        ({"action": "x" * 201}, "action"),
    ],
)
async def test_bad_audit_queries_are_400_naming_the_parameter(
    audited: Client, query: dict[str, str], param: str
) -> None:
    response = await audited.get("/manage/audit", params=query, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == param


async def test_an_unknown_audit_event_is_404(audited: Client) -> None:
    response = await audited.get("/manage/audit/nothing-here", headers=AUTH)
    assert response.status == 404


async def test_a_flood_of_bad_tokens_writes_a_bounded_number_of_rows(
    audited: Client,
) -> None:
    for _ in range(40):
        response = await audited.get("/manage/tokens", headers=bearer("guess-0123456"))
        assert response.status == 401
    await audited.get("/manage/tokens")  # no credentials at all: refused too
    metrics = await (await audited.get("/metrics")).text()
    assert "llm_proxy_audit_records_total 5.0" in metrics  # all that was published
    assert "llm_proxy_audit_suppressed_total 36.0" in metrics
    page = await audit_page(audited, 5, action="auth.failed")
    assert page["pagination"]["total_count"] == 5
    assert {e["reason"] for e in page["events"]} == {"wrong token"}


async def test_metrics_sign_in_refusals_are_recorded(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    client = await start_proxy(**audit_env(tmp_path, METRICS_TOKEN="scrape-secret-99"))
    response = await client.get("/metrics", headers=bearer("scrape-guess-00"))
    assert response.status == 401
    page = await audit_page(client, 1)
    event = page["events"][0]
    assert (event["action"], event["actor"], event["reason"]) == (
        "auth.failed",
        "metrics",
        "wrong token",
    )
    assert event["metadata"] == {"surface": "metrics"}
    assert_no_secret(orjson.dumps(page).decode(), "scrape-secret-99", "scrape-guess")


async def test_reads_are_not_recorded(audited: Client) -> None:
    project = await create_project(audited, "read-me")
    await audited.get(f"/manage/projects/{project['project_id']}", headers=AUTH)
    await audited.get("/manage/projects", headers=AUTH)
    await audited.get("/manage/audit", headers=AUTH)
    page = await audit_page(audited, 1)
    assert actions(page) == [("project.create", "success")]
    assert MANAGEMENT_TOKEN not in orjson.dumps(page).decode()
