"""Token usage from captured response bytes, or estimated with tiktoken when missing.

Pure functions, run off the request path. Extraction takes the last non-null `usage`
(never a sum: some providers repeat cumulative usage in every chunk), reads Responses
API usage from `response.completed`, and keeps cached and reasoning token details.
tiktoken is imported and its encodings loaded lazily, on the first estimate.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import orjson

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

UPSTREAM: Final = "upstream"
ESTIMATED: Final = "estimated"
PARTIAL: Final = "partial"
FALLBACK_ENCODING: Final = "o200k_base"
# The chat format's framing per message and for the reply priming (OpenAI cookbook,
# "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE: Final = 3
TOKENS_REPLY_PRIMING: Final = 3
_BOM: Final = b"\xef\xbb\xbf"
_TERMINAL_RESPONSE_EVENTS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


@dataclass(slots=True)  # not frozen: one is built per proxied call, and that is slower
class Usage:
    """Token counts of one call and where they come from (`usage_source`)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    source: str = UPSTREAM
    seconds: float | None = None  # a duration-billed call (whisper): audio seconds

    def as_dict(self) -> dict[str, Any]:
        """The JSON form carried by events (details only when known)."""
        data: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.seconds is not None:
            data = {"type": "duration", "seconds": self.seconds, **data}
        if self.cached_tokens is not None:
            data["cached_tokens"] = self.cached_tokens
        if self.reasoning_tokens is not None:
            data["reasoning_tokens"] = self.reasoning_tokens
        return data


def _int(value: object) -> int | None:
    """`value` when it is an int (not a bool, which is an int subclass)."""
    return value if type(value) is int else None


def _is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """A JSON object: parsed JSON gives plain dicts, so check that first (cheaper)."""
    return type(value) is dict or isinstance(value, Mapping)


def _detail(obj: Mapping[str, Any], key: str, field: str) -> int | None:
    details = obj.get(key)
    return _int(details.get(field)) if _is_mapping(details) else None


# The key names of a usage object: chat completions and embeddings, then the
# Responses API (prompt, completion, and the details holding cached and reasoning).
_USAGE_KEYS: Final = (
    (
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    ),
    ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
)


def usage_from_object(obj: object) -> Usage | None:
    """Usage from an OpenAI `usage` object (chat, responses, embeddings, audio)."""
    if not _is_mapping(obj):
        return None
    for prompt_key, completion_key, prompt_details, completion_details in _USAGE_KEYS:
        prompt = _int(obj.get(prompt_key))
        if prompt is None:
            continue
        completion = _int(obj.get(completion_key)) or 0
        return Usage(
            prompt,
            completion,
            _int(obj.get("total_tokens")) or prompt + completion,
            _detail(obj, prompt_details, "cached_tokens"),
            _detail(obj, completion_details, "reasoning_tokens"),
        )
    return _duration_usage(obj)


def _duration_usage(obj: Mapping[str, Any]) -> Usage | None:
    """whisper's `{"type": "duration", "seconds": 7}`: billed by time, no tokens."""
    seconds = obj.get("seconds")
    if obj.get("type") != "duration" or type(seconds) not in (int, float):
        return None
    return Usage(0, 0, 0, seconds=seconds)


def decode_body(body: bytes, content_encoding: str | None) -> bytes | None:
    """The body without its Content-Encoding (gzip/deflate), None if undecodable."""
    encoding = (content_encoding or "").strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error):
        return None
    return None


@dataclass(frozen=True, slots=True)
class Answered:
    """What the upstream said it answered with: its model and creation time."""

    model: str | None = None
    created: int | None = None


NOT_ANSWERED: Final = Answered()
# Stream events of the Responses API that carry the whole response object.
_RESPONSE_EVENTS: Final = _TERMINAL_RESPONSE_EVENTS | {
    "response.created",
    "response.in_progress",
}


def answered_from_object(data: Mapping[str, Any]) -> Answered:
    """The `model` and `created` (`created_at` in the Responses API) of an answer."""
    if data.get("type") in _RESPONSE_EVENTS:
        response = data.get("response")
        data = response if _is_mapping(response) else {}
    model = data.get("model")
    created = _int(data.get("created"))
    return Answered(
        model if isinstance(model, str) else None,
        created if created is not None else _int(data.get("created_at")),
    )


def usage_from_json(body: bytes) -> Usage | None:
    """Usage from a whole JSON response body."""
    return answer_from_json(body)[0]


def answer_from_json(body: bytes) -> tuple[Usage | None, Answered]:
    """Usage and what was answered, from a whole JSON response body (one parse)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, NOT_ANSWERED
    if not isinstance(data, dict):
        return None, NOT_ANSWERED
    return usage_from_object(data.get("usage")), answered_from_object(data)


def answered_from_sse(head: bytes) -> Answered:
    """What was answered, from the first event of a stream that names its model."""
    for payload in sse_data(head):
        if b'"model"' not in payload:
            continue
        for data in _objects(payload):
            answered = answered_from_object(data)
            if answered.model is not None:
                return answered
    return NOT_ANSWERED


def usage_from_json_tail(tail: bytes) -> Usage | None:
    """Usage from the last bytes of a large JSON body: the last `"usage": {...}`."""
    key = tail.rfind(b'"usage"')
    start = tail.find(b"{", key) if key >= 0 else -1
    if start < 0:
        return None
    depth = 0
    for index in range(start, len(tail)):
        char = tail[index]
        if char == 0x7B:  # {
            depth += 1
        elif char == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return usage_from_json(b'{"usage":' + tail[start : index + 1] + b"}")
    return None


def sse_data(body: bytes) -> Iterator[bytes]:
    """The data of each SSE event, in order (`[DONE]` and empty data skipped).

    Follows the SSE grammar: lines end in LF, CRLF or CR, a leading BOM is skipped,
    an event's `data:` lines are joined with LF and a blank line ends the event. The
    end of the body ends the last event too, so a stream cut before its last blank
    line still counts.
    """
    data: list[bytes] = []
    for line in body.removeprefix(_BOM).splitlines():
        if not line:
            if data:
                yield from _event_data(data)
                data = []
        elif line.startswith(b"data"):
            if len(line) == 4:
                data.append(b"")
            elif line[4] == 0x3A:  # :
                data.append(line[6:] if line[5:6] == b" " else line[5:])
    if data:
        yield from _event_data(data)


def _event_data(values: list[bytes]) -> Iterator[bytes]:
    payload = (values[0] if len(values) == 1 else b"\n".join(values)).strip()
    if payload and payload != b"[DONE]":
        yield payload


def _loads(payload: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _objects(payload: bytes) -> list[dict[str, Any]]:
    """The JSON objects of one event's data.

    An upstream that never sends blank lines makes one event of the whole stream:
    data that is not JSON as a whole is read line by line.
    """
    data = _loads(payload)
    if data is not None:
        return [data]
    if b"\n" not in payload:
        return []
    pieces = (_loads(piece) for piece in payload.split(b"\n"))
    return [piece for piece in pieces if piece is not None]


def usage_from_sse(body: bytes) -> Usage | None:
    """The last non-null usage of a chat, completions or Responses API stream."""
    for payload in reversed(list(sse_data(body))):
        if b'"usage"' not in payload:
            continue
        for data in reversed(_objects(payload)):
            if data.get("type") in _TERMINAL_RESPONSE_EVENTS:
                response = data.get("response")
                data = response if isinstance(response, dict) else {}
            usage = usage_from_object(data.get("usage"))
            if usage is not None:
                return usage
    return None


def sse_text(body: bytes) -> str:
    """The assistant text an SSE body delivered (chat, completions, Responses)."""
    parts: list[str] = []
    for data in (obj for payload in sse_data(body) for obj in _objects(payload)):
        if data.get("type") == "response.output_text.delta":
            delta = data.get("delta")
            parts.append(delta if isinstance(delta, str) else "")
            continue
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            parts.append(_choice_text(choice))
    return "".join(parts)


def _choice_text(choice: object) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def json_text(body: bytes) -> str:
    """The assistant text of a non-streamed chat, completions or Responses answer."""
    data = _loads(body)
    if data is None:
        return ""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            parts.append(_content_text(choice["message"].get("content")))
        else:
            parts.append(_choice_text(choice))
    output = data.get("output")
    for item in output if isinstance(output, list) else ():
        if isinstance(item, dict):
            parts.append(_content_text(item.get("content")))
    return "".join(parts)


def _content_text(content: object) -> str:
    """Text of a message `content`: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = (part.get("text") for part in content if isinstance(part, dict))
    return "".join(text for text in texts if isinstance(text, str))


def prompt_texts(request: Mapping[str, Any]) -> tuple[list[str], int]:
    """The texts of a request's prompt and the framing tokens to add to them."""
    messages = request.get("messages")
    if isinstance(messages, list):
        texts = [_message_text(m) for m in messages]
        return texts, TOKENS_PER_MESSAGE * len(texts) + TOKENS_REPLY_PRIMING
    texts = []
    for key in ("instructions", "input", "prompt"):
        texts.extend(_input_texts(request.get(key)))
    return texts, 0


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        return ""
    role = message.get("role")
    return (role if isinstance(role, str) else "") + _content_text(
        message.get("content")
    )


def _input_texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        return []
    texts: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            texts.append(_message_text(item))
    return texts


@functools.lru_cache(maxsize=64)
def encoding_for(model: str | None) -> tiktoken.Encoding:
    """The tiktoken encoding of `model`, o200k_base when tiktoken does not know it.

    Loading reads the BPE file from TIKTOKEN_CACHE_DIR (or downloads it), so call
    this from a worker thread, never from the event loop.
    """
    import tiktoken  # lazy: only processes that estimate pay for the import

    if model:
        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            pass
    return tiktoken.get_encoding(FALLBACK_ENCODING)


def count_tokens(model: str | None, texts: list[str]) -> int:
    """Tokens of `texts` in the model's encoding (special tokens counted as text)."""
    encoding = encoding_for(model)
    return sum(len(encoding.encode_ordinary(text)) for text in texts if text)


def estimate_usage(
    model: str | None,
    request: Mapping[str, Any] | None,
    completion_text: str,
    *,
    source: str,
    completion_scale: float = 1.0,
) -> Usage:
    """Estimate usage from the request's prompt and the delivered text.

    `completion_scale` extrapolates when only part of the delivered text was kept
    (bytes delivered / bytes kept). Reasoning tokens are invisible here, so an
    estimate undercounts reasoning models; `source` says it is an estimate.
    """
    texts, framing = prompt_texts(request or {})
    prompt = count_tokens(model, texts) + (framing if texts else 0)
    completion = round(count_tokens(model, [completion_text]) * completion_scale)
    return Usage(prompt, completion, prompt + completion, source=source)
