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
import contextlib
import functools
import gzip
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger(__name__)

BEHAVIOUR_HEADER: Final = "x-fake-behaviour"
MAX_RECORDED_BODY_BYTES: Final = 1 << 20
SLOW_STREAM_DELAY_S: Final = 0.01
_GATE_POLL_S: Final = 0.01
_JSON: Final = "application/json"
_JSON_UTF8: Final = "application/json; charset=utf-8"
_SSE: Final = "text/event-stream; charset=utf-8"
_COOKIE: Final = "__cf_bm=fake-upstream-cookie; path=/; HttpOnly; Secure; SameSite=None"
_FLAGS: Final = frozenset(
    {
        "stall-headers",
        "stall-after-first-event",
        "drop-mid-stream",
        "slow-stream",
        "gzip",
        "set-cookie",
        "echo",
        "usage-cached",
        "usage-tokens",
        "sse-framing",
        "sse-spaced-json",
        "sse-keepalive",
        "sse-no-blank-lines",
    }
)
# Line ends of each `sse-framing`; `mixed` takes them in turn, in an order where a lone
# CR is never followed by a lone LF (that pair would read as one CRLF line end).
SSE_FRAMINGS: Final[Mapping[str, tuple[bytes, ...]]] = {
    "lf": (b"\n",),
    "crlf": (b"\r\n",),
    "cr": (b"\r",),
    "mixed": (b"\r\n", b"\n", b"\r"),
}
_KEEPALIVE: Final = b": keep-alive"
_CHUNKING: Final = frozenset(
    {"stall-after-first-event", "drop-mid-stream", "slow-stream"}
)

Headers = tuple[tuple[str, str], ...]

# Header values are the "example values seen" of the captures (errors.md, section 3).
_OPENAI_HEADERS: Final[Headers] = (
    ("openai-version", "2020-10-01"),
    ("openai-processing-ms", "1"),
)
_SUCCESS_HEADERS: Final[Headers] = (
    *_OPENAI_HEADERS,
    ("x-ratelimit-limit-requests", "30000"),
    ("x-ratelimit-limit-tokens", "150000000"),
    ("x-ratelimit-remaining-requests", "29999"),
    ("x-ratelimit-remaining-tokens", "149999967"),
    ("x-ratelimit-reset-requests", "2ms"),
    ("x-ratelimit-reset-tokens", "0s"),
)
_RATE_LIMITED_HEADERS: Final[Headers] = (
    ("vary", "Origin"),
    ("retry-after", "4"),
    ("x-ratelimit-limit-requests", "500"),
    ("x-ratelimit-limit-tokens", "30000"),
    ("x-ratelimit-remaining-requests", "499"),
    ("x-ratelimit-remaining-tokens", "1961"),
    ("x-ratelimit-reset-requests", "120ms"),
    ("x-ratelimit-reset-tokens", "3.89s"),
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake upstream received it (body kept up to a bound)."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    body_size: int
    body_sha256: str

    @property
    def body_truncated(self) -> bool:
        """Whether only the first part of the body was kept."""
        return len(self.body) < self.body_size

    def json(self) -> Any:
        """Decode the recorded body as JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class FakeFile:
    """A file uploaded to ``POST /v1/files``."""

    id: str
    filename: str
    purpose: str
    size: int
    content: bytes
    created_at: int

    def to_json(self) -> bytes:
        """Render the OpenAI file object."""
        obj = {
            "object": "file",
            "id": self.id,
            "purpose": self.purpose,
            "filename": self.filename,
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": None,
            "status": "processed",
            "status_details": None,
        }
        return json.dumps(obj, indent=2).encode()


class FakeUpstreamState:
    """What the fake received and how its streams ended, plus the gate tests control.

    ``streams_cancelled`` counts streams the client left before the end (noticed on a
    failed write, while stalled on the gate, or by handler cancellation);
    ``disconnects`` also counts clients that left during ``stall-headers``.
    """

    def __init__(
        self,
        *,
        chunk_delay_s: float = 0.0,
        record: bool = True,
        max_recorded_body_bytes: int = MAX_RECORDED_BODY_BYTES,
    ) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.record = record
        self.max_recorded_body_bytes = max_recorded_body_bytes
        self.requests: list[RecordedRequest] = []
        self.requests_seen = 0
        self.files: dict[str, FakeFile] = {}
        self.stalled = 0
        self.streams_opened = 0
        self.streams_completed = 0
        self.streams_cancelled = 0
        self.streams_dropped = 0
        self.disconnects = 0
        self._gate: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None

    @property
    def gate(self) -> asyncio.Event:
        """The event stalled responses wait on; created on first use."""
        if self._gate is None:
            self._gate = asyncio.Event()
        return self._gate

    @property
    def open_streams(self) -> int:
        """Streams started and not yet ended."""
        ended = self.streams_completed + self.streams_cancelled + self.streams_dropped
        return self.streams_opened - ended

    def release(self) -> None:
        """Open the gate: every stalled response (and later ones) goes on."""
        self.gate.set()

    async def wait_for(
        self, predicate: Callable[[FakeUpstreamState], bool], timeout_s: float = 5.0
    ) -> None:
        """Wait until ``predicate(self)`` holds; raise ``TimeoutError`` after timeout."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    async def wait_gate(self, request: web.BaseRequest) -> None:
        """Wait for the gate; raise ``ConnectionResetError`` if the client leaves first."""
        gate = self.gate
        self._count("stalled", 1)
        try:
            # Polling the transport notices a client that left even when the server
            # runs without handler cancellation (aiohttp's default since 3.9).
            while not gate.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away while stalled")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_GATE_POLL_S):
                        await gate.wait()
        finally:
            self._count("stalled", -1)

    def _record(self, recorded: RecordedRequest) -> None:
        if self.record:
            self.requests.append(recorded)
        self._count("requests_seen", 1)

    def _count(self, counter: str, delta: int) -> None:
        setattr(self, counter, getattr(self, counter) + delta)
        if self._changed is not None:
            self._changed.set()
            self._changed = None


FAKE_STATE_KEY: Final = web.AppKey("fake_upstream_state", FakeUpstreamState)


@dataclass(frozen=True, slots=True)
class _Reply:
    chunks: tuple[bytes, ...]
    status: int = 200
    content_type: str = _JSON
    stream: bool = False
    headers: Headers = _SUCCESS_HEADERS


@dataclass(frozen=True, slots=True)
class _Call:
    body: bytes
    body_size: int
    behaviours: Mapping[str, str]


_CALL_KEY: Final = web.RequestKey("fake_upstream_call", _Call)


def load_fixture(name: str) -> bytes:
    """Return the bytes of a bundled fixture file, read once."""
    return _load_fixture(name)


@functools.cache
def _load_fixture(name: str) -> bytes:
    return (resources.files("llm_proxy") / "fake_fixtures" / name).read_bytes()


def split_sse_events(data: bytes) -> tuple[bytes, ...]:
    """Split an SSE body into events, each keeping its blank-line terminator."""
    parts = data.split(b"\n\n")
    events = [part + b"\n\n" for part in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return tuple(events)


def reframe_sse_event(
    event: bytes,
    index: int = 0,
    *,
    framing: str = "lf",
    spaced_json: bool = False,
    blank_line: bool = True,
) -> bytes:
    """One LF-framed event (of `split_sse_events`) in another framing.

    `index` is the event's place in its stream: `mixed` framing starts each event at
    the next line end of its cycle.
    """
    newlines = SSE_FRAMINGS[framing]
    lines = event.rstrip(b"\n").split(b"\n")
    if not blank_line:
        lines = [line for line in lines if line]
    else:
        lines.append(b"")
    return b"".join(
        (_spaced(line) if spaced_json else line) + newlines[(index + k) % len(newlines)]
        for k, line in enumerate(lines)
    )


def _spaced(line: bytes) -> bytes:
    """A `data:` line's JSON written with spaces after `,` and `:`."""
    if not line.startswith(b"data: {"):
        return line
    value = json.loads(line[6:])
    return b"data: " + json.dumps(value, ensure_ascii=False).encode()


def _framed(
    chunks: tuple[bytes, ...], behaviours: Mapping[str, str]
) -> tuple[bytes, ...]:
    """The events of a streamed reply in the framing the behaviours ask for."""
    framing = behaviours.get("sse-framing") or "lf"
    spaced = "sse-spaced-json" in behaviours
    blank_line = "sse-no-blank-lines" not in behaviours
    if (
        framing == "lf"
        and not spaced
        and blank_line
        and "sse-keepalive" not in behaviours
    ):
        return chunks
    framed: list[bytes] = []
    for index, event in enumerate(chunks):
        if "sse-keepalive" in behaviours:
            framed.append(reframe_sse_event(_KEEPALIVE, index, framing=framing))
        framed.append(
            reframe_sse_event(
                event, index, framing=framing, spaced_json=spaced, blank_line=blank_line
            )
        )
    return tuple(framed)


def _json_reply(body: bytes, headers: Headers = _SUCCESS_HEADERS) -> _Reply:
    return _Reply((body,), headers=headers)


def _sse_reply(name: str, headers: Headers = _SUCCESS_HEADERS) -> _Reply:
    return _Reply(split_sse_events(load_fixture(name)), 200, _SSE, True, headers)


def _error_body(
    message: str, type_: str, param: str | None, code: str | None, *, edge: bool
) -> bytes:
    """OpenAI error JSON: edge layer 4-space + newline, API layer 2-space (errors.md)."""
    obj = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if edge:
        return json.dumps(obj, indent=4).encode() + b"\n"
    return json.dumps(obj, indent=2).encode()


def _error(status: int, body: bytes, *, edge: bool, headers: Headers = ()) -> _Reply:
    content_type = _JSON_UTF8 if edge else _JSON
    extra = headers if edge else (*_OPENAI_HEADERS, *headers)
    return _Reply((body,), status, content_type, False, extra)


def _api_error(status: int, message: str, param: str | None = None) -> _Reply:
    body = _error_body(message, "invalid_request_error", param, None, edge=False)
    return _error(status, body, edge=False)


@dataclass(frozen=True, slots=True)
class _Replies:
    chat: _Reply
    chat_cached: _Reply
    chat_stream: _Reply
    chat_stream_usage: _Reply
    responses: _Reply
    responses_stream: _Reply
    embeddings: _Reply
    embeddings_base64: _Reply
    models: _Reply
    model: Mapping[str, _Reply]
    transcription: _Reply
    transcription_tokens: _Reply
    completion: _Reply
    moderation: _Reply
    image: _Reply
    rate_limited: _Reply
    server_error: _Reply
    invalid_json: _Reply


@functools.cache
def _replies() -> _Replies:
    fixture = load_fixture
    models = orjson.loads(fixture("models_list.json"))["data"]
    return _Replies(
        chat=_json_reply(fixture("chat_completion.json")),
        chat_cached=_json_reply(fixture("chat_completion_cached.json")),
        chat_stream=_sse_reply("chat_stream_no_usage.sse"),
        chat_stream_usage=_sse_reply("chat_stream_with_usage.sse"),
        responses=_json_reply(fixture("responses_create.json")),
        # The streamed Responses captures carried no x-ratelimit-* headers.
        responses_stream=_sse_reply("responses_stream.sse", _OPENAI_HEADERS),
        embeddings=_json_reply(fixture("embeddings.json")),
        embeddings_base64=_json_reply(fixture("embeddings_base64.json")),
        models=_json_reply(fixture("models_list.json")),
        model={m["id"]: _json_reply(json.dumps(m, indent=2).encode()) for m in models},
        transcription=_json_reply(fixture("audio_transcription.json")),
        transcription_tokens=_json_reply(fixture("audio_transcription_tokens.json")),
        completion=_json_reply(json.dumps(_COMPLETION, indent=2).encode() + b"\n"),
        moderation=_json_reply(json.dumps(_MODERATION, indent=2).encode() + b"\n"),
        image=_json_reply(json.dumps(_IMAGE, indent=2).encode() + b"\n"),
        rate_limited=_error(
            429, _RATE_LIMIT_BODY, edge=True, headers=_RATE_LIMITED_HEADERS
        ),
        server_error=_error(500, _SERVER_ERROR_BODY, edge=False),
        invalid_json=_api_error(400, _INVALID_JSON_MESSAGE),
    )


# Captured text: errors.md, "429: rate limit".
_RATE_LIMIT_BODY: Final = _error_body(
    "Rate limit reached for gpt-4.1 in organization org-XXXXXXXXXXXXXXXXXXXXXXXX on "
    "tokens per min (TPM): Limit 30000, Used 28039, Requested 3906. Please try again "
    "in 3.89s. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    None,
    "rate_limit_exceeded",
    edge=True,
)
# Reconstructed: errors.md, "500: server error".
_SERVER_ERROR_BODY: Final = _error_body(
    "The server had an error processing your request. Sorry about that! You can retry "
    "your request, or contact us through our help center at help.openai.com if you keep "
    "seeing this error. (Please include the request ID req_23c32c4251b3cab04bce519f14d4801f "
    "in your email.)",
    "server_error",
    None,
    None,
    edge=False,
)
_INVALID_JSON_MESSAGE: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you "
    "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
    "but what was sent was not valid JSON.)"
)
_NO_KEY_MESSAGE: Final = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
# Reconstructed from the spec examples (openai-openapi x-oaiMeta).
_COMPLETION: Final = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "text": "\n\nThis is indeed a test",
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
_MODERATION_CATEGORIES: Final = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_MODERATION: Final = {
    "id": "modr-0d9740456c391e43c445bf0f010940c7",
    "model": "omni-moderation-latest",
    "results": [
        {
            "flagged": False,
            "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
            "category_scores": dict.fromkeys(_MODERATION_CATEGORIES, 1e-06),
            "category_applied_input_types": dict.fromkeys(
                _MODERATION_CATEGORIES, ["text"]
            ),
        }
    ],
}
_IMAGE: Final = {
    "created": 1713833628,
    "data": [
        {
            "b64_json": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
            "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
        }
    ],
    "usage": {
        "total_tokens": 100,
        "input_tokens": 50,
        "output_tokens": 50,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
    },
}


def parse_behaviours(value: str | None) -> dict[str, str]:
    """Parse ``x-fake-behaviour: name[=arg], ...`` into ``{name: arg}``."""
    if not value:
        return {}
    behaviours: dict[str, str] = {}
    for token in value.split(","):
        name, _, arg = token.strip().partition("=")
        if name:
            behaviours[name.strip().lower()] = arg.strip()
    return behaviours


def _behaviour_problem(behaviours: Mapping[str, str]) -> str | None:
    for name, arg in behaviours.items():
        if name.startswith("status-"):
            code = name.removeprefix("status-")
            if not (code.isdigit() and 400 <= int(code) <= 599):
                return f"bad status behaviour {name!r}"
        elif name not in _FLAGS:
            return f"unknown behaviour {name!r}"
        elif arg and not _valid_argument(name, arg):
            return f"bad argument for {name!r}: {arg!r}"
    return None


def _valid_argument(name: str, arg: str) -> bool:
    if name == "drop-mid-stream":
        return arg.isdigit()
    if name == "sse-framing":
        return arg in SSE_FRAMINGS
    if name == "slow-stream":
        try:
            return 0.0 <= float(arg) <= 60.0
        except ValueError:
            return False
    return True  # the other behaviours take no argument and ignore one


def _status_behaviour(behaviours: Mapping[str, str]) -> int | None:
    for name in behaviours:
        if name.startswith("status-"):
            return int(name.removeprefix("status-"))
    return None


def _masked_key(authorization: str | None) -> str | None:
    """Mask a key the way OpenAI's 401 message does: prefix, stars, last four."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    key = authorization[7:].strip()
    if len(key) <= 12:
        return key
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def _unauthorized(request: web.Request) -> _Reply:
    key = _masked_key(request.headers.get("Authorization"))
    if key is None:
        message, code = _NO_KEY_MESSAGE, None
    else:
        message = (
            f"Incorrect API key provided: {key}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        code = "invalid_api_key"
    body = _error_body(message, "invalid_request_error", None, code, edge=True)
    return _error(401, body, edge=True, headers=(("vary", "Origin"),))


def _status_reply(status: int, request: web.Request) -> _Reply:
    if status == 401:
        return _unauthorized(request)
    if status == 429:
        return _replies().rate_limited
    if status == 500:
        return _replies().server_error
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    message = f"The fake upstream was asked to answer {status}."
    return _error(
        status, _error_body(message, type_, None, None, edge=False), edge=False
    )


def _echo_reply(recorded: RecordedRequest) -> _Reply:
    description = {
        "method": recorded.method,
        "path": recorded.path,
        "query_string": recorded.query_string,
        "headers": [[name, value] for name, value in recorded.headers.items()],
        "body_length": recorded.body_size,
        "body_sha256": recorded.body_sha256,
    }
    return _json_reply(orjson.dumps(description))


async def _read_body(request: web.Request, limit: int) -> tuple[bytes, int, str]:
    """Read the whole body; keep all of it unless it is a multipart upload.

    Returns the kept bytes (at most ``limit`` for multipart), the total size and the
    SHA-256 of the whole body.
    """
    if not request.body_exists:
        return b"", 0, hashlib.sha256().hexdigest()
    keep_all = not request.content_type.startswith("multipart/")
    digest = hashlib.sha256()
    parts: list[bytes] = []
    kept = total = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        total += len(chunk)
        if keep_all or kept < limit:
            parts.append(chunk)
            kept += len(chunk)
    body = b"".join(parts)
    return (body if keep_all else body[:limit]), total, digest.hexdigest()


@web.middleware
async def _fake_upstream(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request, then apply the behaviours that replace the endpoint."""
    state = request.app[FAKE_STATE_KEY]
    limit = state.max_recorded_body_bytes
    body, size, sha = await _read_body(request, limit)
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
    problem = _behaviour_problem(behaviours)
    if problem is not None:
        request[_CALL_KEY] = _Call(body, size, {})
        return await _respond(request, _api_error(400, f"fake upstream: {problem}"))
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
        return await _respond(request, _echo_reply(recorded))
    status = _status_behaviour(behaviours)
    if status is not None:
        return await _respond(request, _status_reply(status, request))
    return await handler(request)


def _response_headers(reply: _Reply, behaviours: Mapping[str, str]) -> dict[str, str]:
    headers = dict(reply.headers)
    headers["Content-Type"] = reply.content_type
    headers["x-request-id"] = "req_" + secrets.token_hex(16)
    if "set-cookie" in behaviours:
        headers["Set-Cookie"] = _COOKIE
    return headers


@functools.lru_cache(maxsize=64)
def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, mtime=0)


async def _respond(request: web.Request, reply: _Reply) -> web.StreamResponse:
    """Send a reply, as one body or chunk by chunk as the behaviours ask."""
    behaviours = request[_CALL_KEY].behaviours
    headers = _response_headers(reply, behaviours)
    if reply.stream:
        chunks = _framed(reply.chunks, behaviours)
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
    choose: Callable[[_Replies, dict[str, Any], _Call], _Reply],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Adapt ``choose(replies, payload, call)`` into a handler for a JSON-body POST."""

    async def json_endpoint_handler(request: web.Request) -> web.StreamResponse:
        call = request[_CALL_KEY]
        payload = _json_payload(call)
        if payload is None:
            return await _respond(request, _replies().invalid_json)
        return await _respond(request, choose(_replies(), payload, call))

    return json_endpoint_handler


def _choose_chat(replies: _Replies, payload: dict[str, Any], call: _Call) -> _Reply:
    if payload.get("stream") is True:
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return replies.chat_stream_usage
        return replies.chat_stream
    return replies.chat_cached if "usage-cached" in call.behaviours else replies.chat


def _choose_responses(replies: _Replies, payload: dict[str, Any], _: _Call) -> _Reply:
    return (
        replies.responses_stream if payload.get("stream") is True else replies.responses
    )


def _choose_embeddings(replies: _Replies, payload: dict[str, Any], _: _Call) -> _Reply:
    if payload.get("encoding_format") == "base64":
        return replies.embeddings_base64
    return replies.embeddings


def _constant(
    pick: Callable[[_Replies], _Reply],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that always answers the same precomputed reply."""

    async def constant_handler(request: web.Request) -> web.StreamResponse:
        return await _respond(request, pick(_replies()))

    return constant_handler


async def transcriptions_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``: the upload was read (and sized) already."""
    replies = _replies()
    tokens = "usage-tokens" in request[_CALL_KEY].behaviours
    reply = replies.transcription_tokens if tokens else replies.transcription
    return await _respond(request, reply)


async def model_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model_id}``: one model of the list, or OpenAI's 404."""
    model_id = request.match_info["model_id"]
    reply = _replies().model.get(model_id)
    if reply is None:
        message = (
            f"The model `{model_id}` does not exist or you do not have access to it."
        )
        body = _error_body(
            message, "invalid_request_error", None, "model_not_found", edge=True
        )
        reply = _error(404, body, edge=True, headers=(("vary", "Origin"),))
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
    return await _respond(request, _json_reply(upload.to_json()))


def _file_or_404(request: web.Request) -> FakeFile | _Reply:
    file_id = request.match_info["file_id"]
    upload = request.app[FAKE_STATE_KEY].files.get(file_id)
    if upload is None:
        return _api_error(404, f"No such File object: {file_id}", param="id")
    return upload


async def file_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}``."""
    found = _file_or_404(request)
    reply = found if isinstance(found, _Reply) else _json_reply(found.to_json())
    return await _respond(request, reply)


async def file_content_handler(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``: the bytes kept from the upload."""
    found = _file_or_404(request)
    if isinstance(found, FakeFile):
        found = _Reply((found.content,), content_type="application/octet-stream")
    return await _respond(request, found)


async def not_found_handler(request: web.Request) -> web.StreamResponse:
    """Any other method and path: OpenAI's "Invalid URL" 404."""
    message = f"Invalid URL ({request.method} {request.path})"
    return await _respond(request, _api_error(404, message))


def create_fake_upstream(
    *,
    chunk_delay_s: float = 0.0,
    record: bool = True,
    max_recorded_body_bytes: int = MAX_RECORDED_BODY_BYTES,
) -> web.Application:
    """Build the fake OpenAI app; its state is ``app[FAKE_STATE_KEY]``."""
    _replies()  # load and split the fixtures now, not on the first request
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
