"""Fake OpenAI upstream: a real aiohttp app that serves captured OpenAI wire bytes.

It owns scripted endpoints (JSON, SSE, errors, stalls, mid-stream drops) and a record of
every request it received; the test-suite and ``llm-proxy bench --mock`` share it. It
knows nothing about the proxy.

Bodies come from ``fake_fixtures/`` (byte-exact captures of api.openai.com, see the
README there) and are served unchanged: the request's ``model`` is never copied into a
response, so a stream through the proxy can be compared byte for byte with its file.
Bodies with no capture (completions, moderations, images, files, single model) are
reconstructed from the OpenAI spec examples.

Behaviours are chosen per request with ``x-fake-behaviour: name[=arg], ...`` on any
path; several may be combined:

- ``status-<code>``: answer that error status (401, 429 and 500 use OpenAI's bodies and
  headers; other codes a generic OpenAI-shaped body).
- ``stall-headers``: wait on the gate before sending anything.
- ``stall-after-first-event``: send the first SSE event (or half a JSON body), then wait
  on the gate.
- ``drop-mid-stream[=n]``: send ``n`` events (default: half), then close the connection.
- ``slow-stream[=seconds]``: pause between events (default 0.01 s).
- ``gzip``: gzip a JSON body and send ``Content-Encoding: gzip``.
- ``set-cookie``: add a ``Set-Cookie`` header.
- ``echo``: answer JSON describing the request received.
- ``usage-cached``: chat completions answer the prompt-cache-hit capture.
- ``usage-tokens``: transcriptions answer the token-usage variant.

SSE framing behaviours re-frame a streamed reply (the captures are LF-framed), as
other OpenAI-compatible servers send it; they combine with each other and the above:

- ``sse-framing=lf|crlf|cr|mixed``: end every line with LF, CRLF (sse-starlette's
  default), a lone CR, or all three in turn.
- ``sse-spaced-json``: write each ``data:`` JSON with spaces (``"choices": []``).
- ``sse-keepalive``: send a ``: keep-alive`` comment event before every event.
- ``sse-no-blank-lines``: end events with a line end only, never a blank line.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .fake_replies import (
    SSE_FRAMINGS,
    Replies,
    Reply,
    api_error,
    behaviour_problem,
    canned_replies,
    echo_reply,
    error_body,
    error_reply,
    framed,
    json_reply,
    load_fixture,
    parse_behaviours,
    reframe_sse_event,
    split_sse_events,
    status_behaviour,
    status_reply,
)
from .fake_state import (
    FAKE_STATE_KEY,
    MAX_RECORDED_BODY_BYTES,
    FakeFile,
    FakeUpstreamState,
    RecordedRequest,
    read_body,
)

__all__ = [
    "BEHAVIOUR_HEADER",
    "FAKE_STATE_KEY",
    "MAX_RECORDED_BODY_BYTES",
    "SSE_FRAMINGS",
    "FakeFile",
    "FakeUpstreamState",
    "RecordedRequest",
    "create_fake_upstream",
    "load_fixture",
    "parse_behaviours",
    "reframe_sse_event",
    "run_fake_upstream",
    "split_sse_events",
    "start_fake_upstream",
]

log = logging.getLogger(__name__)

BEHAVIOUR_HEADER: Final = "x-fake-behaviour"
SLOW_STREAM_DELAY_S: Final = 0.01
_COOKIE: Final = "__cf_bm=fake-upstream-cookie; path=/; HttpOnly; Secure; SameSite=None"
_CHUNKING: Final = frozenset(
    {"stall-after-first-event", "drop-mid-stream", "slow-stream"}
)


@dataclass(frozen=True, slots=True)
class _Call:
    body: bytes
    body_size: int
    behaviours: Mapping[str, str]


_CALL_KEY: Final = web.RequestKey("fake_upstream_call", _Call)


@web.middleware
async def _fake_upstream(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request, then apply the behaviours that replace the endpoint."""
    state = request.app[FAKE_STATE_KEY]
    limit = state.max_recorded_body_bytes
    body, size, sha = await read_body(request, limit)
    recorded = RecordedRequest(
        request.method,
        request.path,
        request.query_string,
        CIMultiDictProxy(CIMultiDict(request.headers)),
        body[:limit],
        size,
        sha,
    )
    state._record(recorded)
    behaviours = parse_behaviours(request.headers.get(BEHAVIOUR_HEADER))
    request[_CALL_KEY] = _Call(body, size, behaviours)
    if not behaviours:
        return await handler(request)
    problem = behaviour_problem(behaviours)
    if problem is not None:
        request[_CALL_KEY] = _Call(body, size, {})
        return await _respond(request, api_error(400, f"fake upstream: {problem}"))
    if "stall-headers" in behaviours:
        try:
            await state.wait_gate(request)
        except ConnectionResetError:
            log.debug("client left %s while headers were stalled", request.path)
            state._count("disconnects", 1)
            return web.Response(status=499)  # nginx's "client closed request"
        except asyncio.CancelledError:
            state._count("disconnects", 1)
            raise
    if "echo" in behaviours:
        return await _respond(request, echo_reply(recorded))
    status = status_behaviour(behaviours)
    if status is not None:
        return await _respond(request, status_reply(status, request))
    return await handler(request)


def _response_headers(reply: Reply, behaviours: Mapping[str, str]) -> dict[str, str]:
    headers = dict(reply.headers)
    headers["Content-Type"] = reply.content_type
    headers["x-request-id"] = "req_" + secrets.token_hex(16)
    if "set-cookie" in behaviours:
        headers["Set-Cookie"] = _COOKIE
    return headers


@functools.lru_cache(maxsize=64)
def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, mtime=0)


async def _respond(request: web.Request, reply: Reply) -> web.StreamResponse:
    """Send a reply, as one body or chunk by chunk as the behaviours ask."""
    behaviours = request[_CALL_KEY].behaviours
    headers = _response_headers(reply, behaviours)
    if reply.stream:
        chunks = framed(reply.chunks, behaviours)
        return await _send_chunks(request, reply.status, headers, chunks, None)
    body = b"".join(reply.chunks)
    if "gzip" in behaviours:
        body = _gzip(body)
        headers["Content-Encoding"] = "gzip"
    if _CHUNKING.isdisjoint(behaviours):
        return web.Response(status=reply.status, body=body, headers=headers)
    half = len(body) // 2
    return await _send_chunks(
        request, reply.status, headers, (body[:half], body[half:]), len(body)
    )


def _pause_s(behaviours: Mapping[str, str], default_s: float) -> float:
    if "slow-stream" in behaviours:
        return float(behaviours["slow-stream"] or SLOW_STREAM_DELAY_S)
    return default_s


def _drop_after(behaviours: Mapping[str, str], count: int) -> int | None:
    if "drop-mid-stream" not in behaviours:
        return None
    arg = behaviours["drop-mid-stream"]
    return min(int(arg), count) if arg else max(1, count // 2)


async def _send_chunks(
    request: web.Request,
    status: int,
    headers: Mapping[str, str],
    chunks: tuple[bytes, ...],
    content_length: int | None,
) -> web.StreamResponse:
    """Write each chunk with its own ``write()``; note how the stream ended."""
    state = request.app[FAKE_STATE_KEY]
    behaviours = request[_CALL_KEY].behaviours
    pause_s = _pause_s(behaviours, state.chunk_delay_s)
    drop_after = _drop_after(behaviours, len(chunks))
    response = web.StreamResponse(status=status, headers=headers)
    if content_length is not None:
        response.content_length = content_length
    state._count("streams_opened", 1)
    try:
        await response.prepare(request)
        for sent, chunk in enumerate(chunks):
            if sent == drop_after:
                break
            if sent == 1 and "stall-after-first-event" in behaviours:
                await state.wait_gate(request)
            if sent and pause_s:
                await asyncio.sleep(pause_s)
            await response.write(chunk)
        if drop_after is not None:
            _drop_connection(request)
            state._count("streams_dropped", 1)
            return response
        await response.write_eof()
    except ConnectionResetError:
        _client_left(state, request, "a failed write or stall")
        return response
    except asyncio.CancelledError:
        _client_left(state, request, "handler cancellation")
        raise
    state._count("streams_completed", 1)
    return response


def _drop_connection(request: web.Request) -> None:
    log.debug("dropping the connection of %s mid-stream", request.path)
    transport = request.transport
    if transport is not None:
        transport.close()


def _client_left(state: FakeUpstreamState, request: web.Request, how: str) -> None:
    log.debug("client left %s mid-stream (noticed by %s)", request.path, how)
    state._count("streams_cancelled", 1)
    state._count("disconnects", 1)


def _json_payload(call: _Call) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(call.body)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _json_endpoint(
    choose: Callable[[Replies, dict[str, Any], _Call], Reply],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Adapt ``choose(replies, payload, call)`` into a handler for a JSON-body POST."""

    async def json_endpoint_handler(request: web.Request) -> web.StreamResponse:
        call = request[_CALL_KEY]
        payload = _json_payload(call)
        if payload is None:
            return await _respond(request, canned_replies().invalid_json)
        return await _respond(request, choose(canned_replies(), payload, call))

    return json_endpoint_handler


def _choose_chat(replies: Replies, payload: dict[str, Any], call: _Call) -> Reply:
    if payload.get("stream") is True:
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return replies.chat_stream_usage
        return replies.chat_stream
    return replies.chat_cached if "usage-cached" in call.behaviours else replies.chat


def _choose_responses(replies: Replies, payload: dict[str, Any], _: _Call) -> Reply:
    return (
        replies.responses_stream if payload.get("stream") is True else replies.responses
    )


def _choose_embeddings(replies: Replies, payload: dict[str, Any], _: _Call) -> Reply:
    if payload.get("encoding_format") == "base64":
        return replies.embeddings_base64
    return replies.embeddings


def _constant(
    pick: Callable[[Replies], Reply],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that always answers the same precomputed reply."""

    async def constant_handler(request: web.Request) -> web.StreamResponse:
        return await _respond(request, pick(canned_replies()))

    return constant_handler


async def transcriptions_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``: the upload was read (and sized) already."""
    replies = canned_replies()
    tokens = "usage-tokens" in request[_CALL_KEY].behaviours
    reply = replies.transcription_tokens if tokens else replies.transcription
    return await _respond(request, reply)


async def model_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model_id}``: one model of the list, or OpenAI's 404."""
    model_id = request.match_info["model_id"]
    reply = canned_replies().model.get(model_id)
    if reply is None:
        message = (
            f"The model `{model_id}` does not exist or you do not have access to it."
        )
        body = error_body(
            message, "invalid_request_error", None, "model_not_found", edge=True
        )
        reply = error_reply(404, body, edge=True, headers=(("vary", "Origin"),))
    return await _respond(request, reply)


_DISPOSITION_RE: Final = re.compile(rb'\b(name|filename)="([^"]*)"')


def _form_fields(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Split a multipart/form-data body into ``{name: (filename, content)}``."""
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str):
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        head, separator, content = part.partition(b"\r\n\r\n")
        params = {k.decode(): v.decode() for k, v in _DISPOSITION_RE.findall(head)}
        if separator and "name" in params:
            fields[params["name"]] = (
                params.get("filename"),
                content.removesuffix(b"\r\n"),
            )
    return fields


async def files_upload_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/files``: keep the (bounded) upload and answer its file object."""
    state = request.app[FAKE_STATE_KEY]
    call = request[_CALL_KEY]
    fields = _form_fields(call.body, request.headers.get("Content-Type", ""))
    filename, content = fields.get("file", ("upload", b""))
    purpose = fields.get("purpose", (None, b"user_data"))[1].decode(errors="replace")
    truncated = call.body_size > len(call.body)
    upload = FakeFile(
        id="file-" + secrets.token_hex(11),
        filename=filename or "upload",
        purpose=purpose,
        size=call.body_size if truncated else len(content),
        content=content,
        created_at=int(time.time()),
    )
    state.files[upload.id] = upload
    return await _respond(request, json_reply(upload.to_json()))


def _file_or_404(request: web.Request) -> FakeFile | Reply:
    file_id = request.match_info["file_id"]
    upload = request.app[FAKE_STATE_KEY].files.get(file_id)
    if upload is None:
        return api_error(404, f"No such File object: {file_id}", param="id")
    return upload


async def file_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}``."""
    found = _file_or_404(request)
    reply = found if isinstance(found, Reply) else json_reply(found.to_json())
    return await _respond(request, reply)


async def file_content_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``: the bytes kept from the upload."""
    found = _file_or_404(request)
    if isinstance(found, FakeFile):
        found = Reply((found.content,), content_type="application/octet-stream")
    return await _respond(request, found)


async def not_found_handler(request: web.Request) -> web.StreamResponse:
    """Any other method and path: OpenAI's "Invalid URL" 404."""
    message = f"Invalid URL ({request.method} {request.path})"
    return await _respond(request, api_error(404, message))


def create_fake_upstream(
    *,
    chunk_delay_s: float = 0.0,
    record: bool = True,
    max_recorded_body_bytes: int = MAX_RECORDED_BODY_BYTES,
) -> web.Application:
    """Build the fake OpenAI app; its state is ``app[FAKE_STATE_KEY]``."""
    canned_replies()  # load and split the fixtures now, not on the first request
    app = web.Application(middlewares=[_fake_upstream])
    app[FAKE_STATE_KEY] = FakeUpstreamState(
        chunk_delay_s=chunk_delay_s,
        record=record,
        max_recorded_body_bytes=max_recorded_body_bytes,
    )
    add = app.router.add_route
    add("POST", "/v1/chat/completions", _json_endpoint(_choose_chat))
    add("POST", "/v1/responses", _json_endpoint(_choose_responses))
    add("POST", "/v1/embeddings", _json_endpoint(_choose_embeddings))
    add("POST", "/v1/completions", _constant(lambda r: r.completion))
    add("POST", "/v1/moderations", _constant(lambda r: r.moderation))
    add("POST", "/v1/images/generations", _constant(lambda r: r.image))
    add("GET", "/v1/models", _constant(lambda r: r.models))
    add("GET", "/v1/models/{model_id}", model_handler)
    add("POST", "/v1/audio/transcriptions", transcriptions_handler)
    add("POST", "/v1/files", files_upload_handler)
    add("GET", "/v1/files/{file_id}", file_handler)
    add("GET", "/v1/files/{file_id}/content", file_content_handler)
    add("*", "/{tail:.*}", not_found_handler)
    return app


async def start_fake_upstream(
    host: str = "127.0.0.1", port: int = 0, *, app: web.Application | None = None
) -> tuple[web.AppRunner, URL]:
    """Serve the fake on ``host:port`` (0 picks a free port); return runner and root URL.

    Without ``app`` it serves ``create_fake_upstream(record=False)``, so a long bench run
    keeps counters but not every request. Stop it with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(
        app if app is not None else create_fake_upstream(record=False),
        access_log=None,
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return runner, URL.build(scheme="http", host=host, port=bound_port, path="/")


def run_fake_upstream(
    host: str, port: int, chunk_delay_s: float = 0.0
) -> None:  # pragma: no cover - runs only as `bench --mock`'s child process
    """Serve the fake OpenAI upstream until SIGTERM (for `bench --mock`)."""
    from ..server import new_event_loop

    web.run_app(
        create_fake_upstream(chunk_delay_s=chunk_delay_s, record=False),
        host=host,
        port=port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        loop=new_event_loop(),
    )
