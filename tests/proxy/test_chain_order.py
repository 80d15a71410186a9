"""The /v1 chain's Stage protocol, driven without a loop: enter in order, leave reversed.

The handlers here never await, so `coroutine.send(None)` runs a whole call
synchronously and the test sees the exact order of every enter, leave and submit.
"""

from __future__ import annotations

from collections.abc import Coroutine

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler

from llm_proxy.errors import ApiError
from llm_proxy.proxy.chain import proxy_chain
from llm_proxy.proxy.exchange import Exchange

Log = list[str]


class RecordingStage:
    """Notes its enter and leave (with the error's class) in a shared log."""

    def __init__(self, name: str, log: Log, *, refuse: bool = False) -> None:
        self.name = name
        self.log = log
        self.refuse = refuse

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        self.log.append(f"enter {self.name}")
        if self.refuse:
            raise ApiError(403, f"{self.name} refuses", code="refused")

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        self.log.append(f"leave {self.name} {type(error).__name__}")


class BrokenLeave(RecordingStage):
    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        super().leave(request, exchange, error)
        raise RuntimeError("a bug in leave")


class Sink:
    """The chain's CallSink: counts calls in flight, keeps the submitted records."""

    def __init__(self, log: Log) -> None:
        self.in_flight = 0
        self.log = log
        self.submitted: list[Exchange] = []

    def submit(self, exchange: Exchange) -> None:
        self.log.append(f"submit in_flight={self.in_flight}")
        self.submitted.append(exchange)


def _handler(log: Log, *, fail: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        log.append("handler")
        if fail:
            raise ValueError("handler failed")
        return web.Response(text="ok")

    return handler


def _call(
    sink: Sink, stages: list[RecordingStage], handler: Handler
) -> web.StreamResponse:
    """Run one call through the chain to its end, without an event loop."""
    chain = proxy_chain(sink, stages, handler)
    coroutine = chain(make_mocked_request("GET", "/v1/models"))
    assert isinstance(coroutine, Coroutine)
    try:
        coroutine.send(None)
    except StopIteration as done:
        response: web.StreamResponse = done.value
        return response
    coroutine.close()
    raise AssertionError("the chain awaited: a stage or the handler is not synchronous")


def test_stages_enter_in_order_and_leave_in_reverse() -> None:
    log: Log = []
    sink = Sink(log)
    stages = [RecordingStage(name, log) for name in ("a", "b", "c")]
    response = _call(sink, stages, _handler(log))
    assert response.status == 200
    assert log == [
        "enter a",
        "enter b",
        "enter c",
        "handler",
        "leave c NoneType",
        "leave b NoneType",
        "leave a NoneType",
        "submit in_flight=0",
    ]
    assert sink.in_flight == 0
    [record] = sink.submitted
    assert record.method == "GET" and record.finished >= record.started


def test_a_refusal_skips_the_inner_stages_and_leaves_only_the_entered_ones() -> None:
    log: Log = []
    sink = Sink(log)
    stages = [
        RecordingStage("a", log),
        RecordingStage("b", log, refuse=True),
        RecordingStage("c", log),
    ]
    with pytest.raises(ApiError) as refused:
        _call(sink, stages, _handler(log))
    assert log == ["enter a", "enter b", "leave a ApiError", "submit in_flight=0"]
    [record] = sink.submitted
    assert record.status == 403 and record.error == "refused"
    assert refused.value.headers["X-Request-ID"] == record.request_id


def test_every_entered_stage_leaves_with_the_handlers_exception() -> None:
    log: Log = []
    sink = Sink(log)
    stages = [RecordingStage(name, log) for name in ("a", "b")]
    with pytest.raises(ValueError, match="handler failed"):
        _call(sink, stages, _handler(log, fail=True))
    assert log == [
        "enter a",
        "enter b",
        "handler",
        "leave b ValueError",
        "leave a ValueError",
        "submit in_flight=0",
    ]
    assert sink.submitted[0].status == 500


def test_a_failing_leave_does_not_skip_the_outer_stages_nor_the_submit() -> None:
    log: Log = []
    sink = Sink(log)
    stages = [RecordingStage("a", log), BrokenLeave("b", log)]
    assert _call(sink, stages, _handler(log)).status == 200
    assert log[-3:] == ["leave b NoneType", "leave a NoneType", "submit in_flight=0"]
