"""Request-path helpers for usage accounting: bounded byte capture and SSE rewriting.

Everything here runs per chunk on the request path, so it does only cheap byte work
(`len`, `deque.append`, `bytes.find`): no JSON decoding, no tokenizer. The captured
bytes are parsed later, off the request path, by `usage.py`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import orjson

TAIL_BYTES: Final = 8 * 1024
# A stream that never shows an event boundary (not OpenAI-style SSE) stops being
# rewritten once this much is pending, rather than being held back from the client.
MAX_PENDING_BYTES: Final = 64 * 1024
_EVENT_END: Final = b"\n\n"
_USAGE_KEY: Final = b'"usage":'
_USAGE_NULL: Final = b',"usage":null'
_EMPTY_CHOICES: Final = b'"choices":[]'
_INCLUDE_USAGE: Final = b'"stream_options":{"include_usage":true}'
USAGE_ENDPOINTS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})


class ResponseCapture:
    """Bounded copies of a response body: its first `head_max` bytes and its tail.

    The head holds the whole body when it is small (a JSON answer, a short stream),
    the tail the last `tail_max` bytes or a little more (whole chunks are kept, never
    copied), where the `usage` of a large body or a long stream is found.
    """

    __slots__ = (
        "head",
        "head_len",
        "head_max",
        "tail",
        "tail_len",
        "tail_max",
        "total",
    )

    def __init__(self, head_max: int, tail_max: int = TAIL_BYTES) -> None:
        self.head: list[bytes] = []
        self.head_len = 0
        self.head_max = head_max
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.tail_max = tail_max
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        """Keep what the bounds allow of one relayed chunk."""
        size = len(chunk)
        self.total += size
        if self.head_len < self.head_max:
            room = self.head_max - self.head_len
            piece = chunk if size <= room else chunk[:room]
            self.head.append(piece)
            self.head_len += len(piece)
        tail = self.tail
        tail.append(chunk)
        self.tail_len += size
        while self.tail_len - len(tail[0]) >= self.tail_max:
            self.tail_len -= len(tail.popleft())

    @property
    def complete(self) -> bool:
        """Whether the head holds every byte of the body."""
        return self.head_len == self.total

    def head_bytes(self) -> bytes:
        """The first bytes of the body (all of it when `complete`)."""
        return b"".join(self.head)

    def tail_bytes(self) -> bytes:
        """The last bytes of the body (at least `tail_max`, when there are as many)."""
        return b"".join(self.tail)


class UsageChunkStripper:
    """Removes what an injected `include_usage` added to a chat stream.

    Works on whole SSE events (`\\n\\n`-terminated): the usage-only chunk
    (`"choices":[]` with a usage object) is dropped and every `,"usage":null` is
    removed, so the client gets the bytes upstream sends without `include_usage`.
    Only an event whose terminator has not arrived yet is held back.
    """

    __slots__ = ("_pending", "_passthrough")

    def __init__(self) -> None:
        self._pending = b""
        self._passthrough = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` (plus held-back ones) that can go to the client now."""
        if self._passthrough:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(_EVENT_END)
        if end < 0:
            if len(data) > MAX_PENDING_BYTES:
                self._passthrough = True
                self._pending = b""
                return data
            self._pending = data
            return b""
        end += len(_EVENT_END)
        ready, self._pending = data[:end], data[end:]
        return strip_usage_events(ready) if _USAGE_KEY in ready else ready

    def flush(self) -> bytes:
        """What is still held back at the end of the stream."""
        data, self._pending = self._pending, b""
        return strip_usage_events(data) if _USAGE_KEY in data else data


def strip_usage_events(data: bytes) -> bytes:
    """Drop usage-only events and `,"usage":null` from whole SSE events."""
    events = data.split(_EVENT_END)
    last = len(events) - 1  # the piece after the final separator has none of its own
    return b"".join(
        event.replace(_USAGE_NULL, b"") + (_EVENT_END if i < last else b"")
        for i, event in enumerate(events)
        if not (_EMPTY_CHOICES in event and b'"usage":{' in event)
    )


def inject_include_usage(body: bytes, payload: Mapping[str, Any]) -> bytes | None:
    """The body with `stream_options.include_usage: true`, or None to leave it alone.

    Only a client that did not decide gets it: an explicit `include_usage` (true or
    false) or a non-object, non-null `stream_options` is left as sent. When `stream_options`
    is absent the key is spliced in before the closing brace, so every other byte
    stays as the client sent it.
    """
    if "stream_options" not in payload:
        end = body.rfind(b"}")
        return body[:end] + b"," + _INCLUDE_USAGE + body[end:]
    options = payload["stream_options"]
    if options is None:  # `null` decides nothing: the same as leaving it out
        return orjson.dumps({**payload, "stream_options": {"include_usage": True}})
    if isinstance(options, dict) and "include_usage" not in options:
        merged = {**payload, "stream_options": {**options, "include_usage": True}}
        return orjson.dumps(merged)
    return None
