"""The audit middleware on a small app of its own, with the real trail on a memory bus:
how a handler's ending becomes the outcome and reason of its records."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from llm_proxy.audit import trail as audit
from llm_proxy.audit.actions import audit_middleware
from llm_proxy.audit.publisher import BusAuditTrail
from llm_proxy.events.audit import AuditRecorded
from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.management.service import NotFound


async def redirect(request: web.Request) -> web.Response:
    audit.note(request, project_id="p-1")
    raise web.HTTPSeeOther("/done")


async def refused_form(request: web.Request) -> web.Response:
    audit.note(request, reason="name taken")
    return web.Response(status=409, text="the form again")


async def unknown(request: web.Request) -> web.Response:
    raise NotFound("No project with id 'p-2'.", param="project_id")


async def broken(request: web.Request) -> web.Response:
    raise RuntimeError("secret-looking detail sk-123")


async def two_actions(request: web.Request) -> web.Response:
    audit.note(
        request, actions=audit.project_actions({"name": "n", "is_active": False})
    )
    return web.Response(text="ok")


async def read(request: web.Request) -> web.Response:
    return web.Response(text="not audited")


HANDLERS: dict[Any, str] = {
    redirect: audit.PROJECT_CREATE,
    refused_form: audit.PROJECT_CREATE,
    unknown: audit.PROJECT_DELETE,
    broken: audit.PROJECT_DELETE,
    two_actions: audit.PROJECT_UPDATE,
}


async def records_of(
    aiohttp_client: AiohttpClient, path: str
) -> tuple[int, list[AuditRecorded]]:
    """The status of POST `path` and the records it made (their request id, when the
    answer is the handler's, comes back in X-Request-ID)."""
    bus = InMemoryEventBus[AuditRecorded](flush_interval_s=0.01)
    subscription = bus.subscribe("test")
    app = web.Application(middlewares=[audit_middleware(HANDLERS, "tester")])
    app[audit.AUDIT_TRAIL_KEY] = BusAuditTrail(bus)
    for handler in (*HANDLERS, read):
        app.router.add_post(f"/{handler.__name__}", handler)
    client = await aiohttp_client(app)
    response = await client.post(path, allow_redirects=False)
    await bus.close()
    records = [record async for batch in subscription for record in batch]
    if response.status < 500 and records:
        assert response.headers["X-Request-ID"] == records[0].request_id
    return response.status, records


async def test_a_redirect_after_the_change_is_a_success(
    aiohttp_client: AiohttpClient,
) -> None:
    status, records = await records_of(aiohttp_client, "/redirect")
    assert status == 303
    [record] = records
    assert (record.action, record.outcome, record.reason) == (
        "project.create",
        "success",
        None,
    )
    assert (record.actor, record.project_id) == ("tester", "p-1")


async def test_a_form_shown_again_is_a_failure_with_the_noted_reason(
    aiohttp_client: AiohttpClient,
) -> None:
    status, [record] = await records_of(aiohttp_client, "/refused_form")
    assert (status, record.outcome, record.reason) == (409, "failure", "name taken")


async def test_a_rules_refusal_is_a_failure_with_its_message(
    aiohttp_client: AiohttpClient,
) -> None:
    _, [record] = await records_of(aiohttp_client, "/unknown")
    assert (record.outcome, record.reason) == ("failure", "No project with id 'p-2'.")


async def test_an_unexpected_error_names_only_its_class(
    aiohttp_client: AiohttpClient,
) -> None:
    status, [record] = await records_of(aiohttp_client, "/broken")
    assert status == 500
    assert (record.outcome, record.reason) == ("error", "internal error (RuntimeError)")


async def test_one_request_can_be_several_actions(
    aiohttp_client: AiohttpClient,
) -> None:
    _, records = await records_of(aiohttp_client, "/two_actions")
    assert [r.action for r in records] == ["project.update", "project.deactivate"]
    assert len({r.request_id for r in records}) == 1


async def test_handlers_not_named_are_not_audited(
    aiohttp_client: AiohttpClient,
) -> None:
    status, records = await records_of(aiohttp_client, "/read")
    assert (status, records) == (200, [])
