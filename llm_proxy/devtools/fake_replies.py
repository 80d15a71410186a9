"""The fake upstream's answers: captured bodies and headers, SSE re-framing, errors.

`canned_replies()` loads every fixture of ``fake_fixtures/`` once and splits the streamed
ones into events; `status_reply` and `echo_reply` build the answers that behaviours
ask for; `parse_behaviours` reads the ``x-fake-behaviour`` header.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

import orjson
from aiohttp import web

from .fake_state import RecordedRequest

JSON_TYPE: Final = "application/json"
_JSON_UTF8: Final = "application/json; charset=utf-8"
_SSE: Final = "text/event-stream; charset=utf-8"
# Line ends of each `sse-framing`; `mixed` takes them in turn, in an order where a lone
# CR is never followed by a lone LF (that pair would read as one CRLF line end).
SSE_FRAMINGS: Final[Mapping[str, tuple[bytes, ...]]] = {
    "lf": (b"\n",),
    "crlf": (b"\r\n",),
    "cr": (b"\r",),
    "mixed": (b"\r\n", b"\n", b"\r"),
}
_KEEPALIVE: Final = b": keep-alive"

Headers = tuple[tuple[str, str], ...]

# Header values are the "example values seen" of the captures (errors.md, section 3).
_OPENAI_HEADERS: Final[Headers] = (
    ("openai-version", "2020-10-01"),
    ("openai-processing-ms", "1"),
)
SUCCESS_HEADERS: Final[Headers] = (
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


@dataclass(frozen=True, slots=True)
class Reply:
    chunks: tuple[bytes, ...]
    status: int = 200
    content_type: str = JSON_TYPE
    stream: bool = False
    headers: Headers = SUCCESS_HEADERS


def load_fixture(name: str) -> bytes:
    """Return the bytes of a bundled fixture file, read once."""
    return _load_fixture(name)


@functools.cache
def _load_fixture(name: str) -> bytes:
    return (resources.files("llm_proxy.devtools") / "fake_fixtures" / name).read_bytes()


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


def framed(
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


def json_reply(body: bytes, headers: Headers = SUCCESS_HEADERS) -> Reply:
    return Reply((body,), headers=headers)


def _sse_reply(name: str, headers: Headers = SUCCESS_HEADERS) -> Reply:
    return Reply(split_sse_events(load_fixture(name)), 200, _SSE, True, headers)


def error_body(
    message: str, type_: str, param: str | None, code: str | None, *, edge: bool
) -> bytes:
    """OpenAI error JSON: edge layer 4-space + newline, API layer 2-space (errors.md)."""
    obj = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if edge:
        return json.dumps(obj, indent=4).encode() + b"\n"
    return json.dumps(obj, indent=2).encode()


def error_reply(
    status: int, body: bytes, *, edge: bool, headers: Headers = ()
) -> Reply:
    content_type = _JSON_UTF8 if edge else JSON_TYPE
    extra = headers if edge else (*_OPENAI_HEADERS, *headers)
    return Reply((body,), status, content_type, False, extra)


def api_error(status: int, message: str, param: str | None = None) -> Reply:
    body = error_body(message, "invalid_request_error", param, None, edge=False)
    return error_reply(status, body, edge=False)


@dataclass(frozen=True, slots=True)
class Replies:
    chat: Reply
    chat_cached: Reply
    chat_stream: Reply
    chat_stream_usage: Reply
    responses: Reply
    responses_stream: Reply
    embeddings: Reply
    embeddings_base64: Reply
    models: Reply
    model: Mapping[str, Reply]
    transcription: Reply
    transcription_tokens: Reply
    completion: Reply
    moderation: Reply
    image: Reply
    rate_limited: Reply
    server_error: Reply
    invalid_json: Reply


@functools.cache
def canned_replies() -> Replies:
    fixture = load_fixture
    models = orjson.loads(fixture("models_list.json"))["data"]
    return Replies(
        chat=json_reply(fixture("chat_completion.json")),
        chat_cached=json_reply(fixture("chat_completion_cached.json")),
        chat_stream=_sse_reply("chat_stream_no_usage.sse"),
        chat_stream_usage=_sse_reply("chat_stream_with_usage.sse"),
        responses=json_reply(fixture("responses_create.json")),
        # The streamed Responses captures carried no x-ratelimit-* headers.
        responses_stream=_sse_reply("responses_stream.sse", _OPENAI_HEADERS),
        embeddings=json_reply(fixture("embeddings.json")),
        embeddings_base64=json_reply(fixture("embeddings_base64.json")),
        models=json_reply(fixture("models_list.json")),
        model={m["id"]: json_reply(json.dumps(m, indent=2).encode()) for m in models},
        transcription=json_reply(fixture("audio_transcription.json")),
        transcription_tokens=json_reply(fixture("audio_transcription_tokens.json")),
        completion=json_reply(json.dumps(_COMPLETION, indent=2).encode() + b"\n"),
        moderation=json_reply(json.dumps(_MODERATION, indent=2).encode() + b"\n"),
        image=json_reply(json.dumps(_IMAGE, indent=2).encode() + b"\n"),
        rate_limited=error_reply(
            429, _RATE_LIMIT_BODY, edge=True, headers=_RATE_LIMITED_HEADERS
        ),
        server_error=error_reply(500, _SERVER_ERROR_BODY, edge=False),
        invalid_json=api_error(400, _INVALID_JSON_MESSAGE),
    )


# Captured text: errors.md, "429: rate limit".
_RATE_LIMIT_BODY: Final = error_body(
    "Rate limit reached for gpt-4.1 in organization org-XXXXXXXXXXXXXXXXXXXXXXXX on "
    "tokens per min (TPM): Limit 30000, Used 28039, Requested 3906. Please try again "
    "in 3.89s. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    None,
    "rate_limit_exceeded",
    edge=True,
)
# Reconstructed: errors.md, "500: server error".
_SERVER_ERROR_BODY: Final = error_body(
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


def behaviour_problem(behaviours: Mapping[str, str]) -> str | None:
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


def status_behaviour(behaviours: Mapping[str, str]) -> int | None:
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


def _unauthorized(request: web.Request) -> Reply:
    key = _masked_key(request.headers.get("Authorization"))
    if key is None:
        message, code = _NO_KEY_MESSAGE, None
    else:
        message = (
            f"Incorrect API key provided: {key}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        code = "invalid_api_key"
    body = error_body(message, "invalid_request_error", None, code, edge=True)
    return error_reply(401, body, edge=True, headers=(("vary", "Origin"),))


def status_reply(status: int, request: web.Request) -> Reply:
    if status == 401:
        return _unauthorized(request)
    if status == 429:
        return canned_replies().rate_limited
    if status == 500:
        return canned_replies().server_error
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    message = f"The fake upstream was asked to answer {status}."
    return error_reply(
        status, error_body(message, type_, None, None, edge=False), edge=False
    )


def echo_reply(recorded: RecordedRequest) -> Reply:
    description = {
        "method": recorded.method,
        "path": recorded.path,
        "query_string": recorded.query_string,
        "headers": [[name, value] for name, value in recorded.headers.items()],
        "body_length": recorded.body_size,
        "body_sha256": recorded.body_sha256,
    }
    return json_reply(orjson.dumps(description))
