"""Request-path helpers for usage accounting: bounded byte capture and SSE rewriting.

Everything here runs per chunk on the request path, so it does only cheap byte work
(`len`, `deque.append`, `bytes.find`) plus, when the proxy injected `include_usage`,
one orjson parse of each SSE payload that mentions `usage`: no tokenizer. The captured
bytes are parsed later, off the request path, by `accounting/usage.py`.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

log = logging.getLogger(__name__)

TAIL_BYTES: Final = 8 * 1024
# A stream whose event never ends (an endless line, or data lines that never make
# JSON) stops being rewritten once this much, or this many lines, would be held back.
MAX_PENDING_BYTES: Final = 64 * 1024
MAX_HELD_LINES: Final = 64
# After a `"usage"` key: a null value (JSON whitespace is space, tab, CR and LF, and
# a line holds no CR or LF), then what follows a first member.
_NULL_VALUE: Final = re.compile(rb"[ \t]*:[ \t]*null(?![A-Za-z0-9_])")
_COMMA_AFTER: Final = re.compile(rb"[ \t]*,[ \t]*")
_BLANKS: Final = b" \t"
_COMMA: Final = 0x2C
_BOM: Final = b"\xef\xbb\xbf"
# Endings whose last line is blank, whichever line ends come before it.
_ENDS_WITH_BLANK_LINE: Final = (b"\n\n", b"\r\n\r\n", b"\r\r\n", b"\n\r\n")
_LF: Final = 0x0A
_CR: Final = 0x0D
_SPACE: Final = 0x20
_COLON: Final = 0x3A
_BRACE: Final = 0x7B
_BRACE_END: Final = 0x7D
# The fate of a line: sent, held with its event, or dropped (and the default).
_NONE, _EMIT, _HOLD, _DROP = 0, 1, 2, 3
# What to do with a held event: keep it, cut `usage: null`, drop it, or wait.
_KEEP, _REWRITE, _UNDECIDED = 4, 5, 6
_INVALID: Final = object()  # what `_parse` gives for bytes that are not JSON
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
    """Removes what an injected `include_usage` added to a chat stream, per SSE event.

    Follows the SSE grammar: lines end in LF, CRLF or a lone CR (a CR|LF pair split
    across chunks is one line end) and a blank line ends an event. Each `data:` payload
    that mentions `usage` is parsed (several `data:` lines are one payload, joined by
    LF); a chunk whose `choices` is `[]` and whose `usage` is an object is dropped with
    its blank line, and a top-level `"usage": null` member is cut out of the line that
    holds it. Every other byte goes through unchanged, and at once: a data line is
    decided at its line end, so events that lack their blank line are not held
    either. What cannot be decided yet (a partial line, the lines of an event whose
    JSON is not complete) is held back, up to a bound; past it the stripper gives up
    (`abandoned`) and passes the stream through.
    """

    __slots__ = (
        "_after_cr",
        "_first",
        "_held",
        "_held_len",
        "_line",
        "_swallow",
        "_values",
        "abandoned",
    )

    def __init__(self) -> None:
        self._line = b""  # the partial line after the last line end
        self._held: list[bytes] = []  # whole lines of the event not yet decided
        self._held_len = 0
        self._values: list[tuple[int, int, int]] = []  # data lines: (held, start, end)
        self._after_cr = _NONE  # a chunk ended in CR: the fate of that line
        self._swallow = False  # a usage chunk was dropped: so is its blank line
        self._first = True  # the first line may begin with a BOM
        self.abandoned = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` (plus held-back ones) that can go to the client now."""
        if self.abandoned or not chunk:
            return chunk
        if (
            b"usage" not in chunk
            and chunk.endswith(_ENDS_WITH_BLANK_LINE)
            and not (self._line or self._held or self._after_cr or self._swallow)
        ):
            self._first = False
            return chunk  # whole events that nothing was added to
        out: list[bytes] = []
        pos = self._skip_lf(chunk, out) if self._after_cr else 0
        size = len(chunk)
        lf = chunk.find(b"\n", pos)
        cr = chunk.find(b"\r", pos)
        while lf >= 0 or cr >= 0:
            if cr < 0 or 0 <= lf < cr:
                end = lf
                nxt = lf + 1
                lf = chunk.find(b"\n", nxt)
            else:
                end = cr
                nxt = cr + 1
                if nxt < size and chunk[nxt] == _LF:
                    nxt += 1
                    lf = chunk.find(b"\n", nxt)
                cr = chunk.find(b"\r", nxt)
            line = chunk[pos:nxt]
            length = end - pos
            if self._line:
                length += len(self._line)
                line = self._line + line
                self._line = b""
            fate = self._on_line(line, length, out)
            if nxt == size and end + 1 == size and chunk[end] == _CR:
                self._after_cr = fate  # the next chunk may start with its LF
            pos = nxt
        if pos < size:
            self._line = self._line + chunk[pos:] if self._line else chunk[pos:]
        if (
            len(self._line) + self._held_len > MAX_PENDING_BYTES
            or len(self._held) > MAX_HELD_LINES
        ):
            self._abandon(out)
        return out[0] if len(out) == 1 else b"".join(out)

    def flush(self) -> bytes:
        """What is still held back at the end of the stream (decided as it stands)."""
        out: list[bytes] = []
        if self._line and not self.abandoned:
            line, self._line = self._line, b""
            self._on_line(line, len(line), out)
        out.extend(self._held)  # undecided: what did not parse goes out as it came
        self._clear()
        self._after_cr = _NONE
        return b"".join(out)

    def _skip_lf(self, chunk: bytes, out: list[bytes]) -> int:
        """Where lines start in `chunk`: after an LF that ends the previous CR's line."""
        fate, self._after_cr = self._after_cr, _NONE
        if fate == _NONE or not chunk.startswith(b"\n"):
            return 0
        if fate == _EMIT:
            out.append(b"\n")
        elif fate == _HOLD:
            self._hold(b"\n")
        return 1

    def _on_line(self, line: bytes, length: int, out: list[bytes]) -> int:
        """Handle one whole line (`line[:length]` is it without its line end)."""
        start = 0
        if self._first:
            self._first = False
            if line.startswith(_BOM):
                start = len(_BOM)
        if length == start:  # a blank line: it ends the event
            return self._on_blank_line(line, out)
        if line[start] == _COLON:  # a comment: part of the event around it, if any
            if not self._held:
                out.append(line)
                return _EMIT
            self._hold(line)
            return _HOLD
        self._swallow = False
        if not line.startswith(b"data", start) or (
            length > start + 4 and line[start + 4] != _COLON
        ):
            self._hold(line)  # event, id, retry: kept with the data they precede
            return _HOLD
        value = min(start + 5, length)
        if value < length and line[value] == _SPACE:
            value += 1
        return self._on_data_line(line, value, length, out)

    def _on_blank_line(self, line: bytes, out: list[bytes]) -> int:
        # Data still held did not parse at its last line, and will not now: it goes
        # out as it came, like the field lines and comments held with it.
        if self._held:
            out.extend(self._held)
            self._clear()
        elif self._swallow:
            self._swallow = False
            return _DROP
        out.append(line)
        return _EMIT

    def _on_data_line(
        self, line: bytes, value: int, length: int, out: list[bytes]
    ) -> int:
        if self._values:  # more of a payload whose JSON is not complete yet
            return self._on_more_data(line, value, length, out)
        if b"usage" not in line:
            if not _looks_whole(line, value, length):
                return self._hold_data(line, value, length)
        else:
            data = _parse(line[value:length])
            if data is _INVALID:
                return self._hold_data(line, value, length)
            verdict = _verdict_of(data)
            if verdict == _DROP:
                self._clear()
                self._swallow = True
                return _DROP
            if verdict == _REWRITE:
                line = _without_usage_null(line, value, length)
        if self._held:
            out.extend(self._held)
            self._clear()
        out.append(line)
        return _EMIT

    def _hold_data(self, line: bytes, value: int, length: int) -> int:
        self._hold(line)
        self._values.append((len(self._held) - 1, value, length))
        return _HOLD

    def _on_more_data(
        self, line: bytes, value: int, length: int, out: list[bytes]
    ) -> int:
        """A data line of an event held back: decide once the payload is JSON."""
        self._hold_data(line, value, length)
        verdict = self._verdict()
        if verdict == _UNDECIDED:
            verdict = self._restart_at_last_line(out)
        if verdict == _UNDECIDED:
            return _HOLD
        self._release(verdict, out)
        if verdict == _DROP:
            self._swallow = True
            return _DROP
        return _EMIT

    def _restart_at_last_line(self, out: list[bytes]) -> int:
        """The held lines do not make JSON: if the last line does, it starts anew.

        An upstream that ends events without a blank line sends one JSON per line;
        the lines before it go out as they are.
        """
        index, start, end = self._values[-1]
        line = self._held[index]
        if _parse(line[start:end]) is _INVALID:
            return _UNDECIDED
        out.extend(self._held[:index])
        self._held = [line]
        self._held_len = len(line)
        self._values = [(0, start, end)]
        return self._verdict()

    def _verdict(self) -> int:
        """What to do with the held event, from its parsed data."""
        data = _parse(self._joined(self._values))
        return _UNDECIDED if data is _INVALID else _verdict_of(data)

    def _joined(self, values: list[tuple[int, int, int]]) -> bytes:
        held = self._held
        if len(values) == 1:
            index, start, end = values[0]
            return held[index][start:end]
        return b"\n".join(held[index][start:end] for index, start, end in values)

    def _release(self, verdict: int, out: list[bytes]) -> None:
        if verdict == _REWRITE:
            self._cut_usage_null()
        if verdict != _DROP:
            out.extend(self._held)
        self._clear()

    def _cut_usage_null(self) -> None:
        """Cut the top-level `"usage": null` out of the held data lines, if it can.

        A cut is kept only when the payload without it parses and has no `usage`
        left; when none is, the event goes out unchanged.
        """
        held, values = self._held, self._values
        for place, (index, start, end) in enumerate(values):
            line = held[index]
            for cut_start, cut_end in _usage_null_members(line, start, end):
                held[index] = line[:cut_start] + line[cut_end:]
                trial = values.copy()
                trial[place] = (index, start, end - (cut_end - cut_start))
                data = _parse(self._joined(trial))
                if type(data) is dict and "usage" not in data:
                    return
                held[index] = line

    def _hold(self, line: bytes) -> None:
        self._held.append(line)
        self._held_len += len(line)

    def _clear(self) -> None:
        self._held = []
        self._held_len = 0
        self._values = []

    def _abandon(self, out: list[bytes]) -> None:
        """Stop rewriting: send what is held and pass the rest of the stream through."""
        log.warning(
            "usage stripping abandoned: %d bytes of one SSE event without an end",
            self._held_len + len(self._line),
        )
        out.extend(self._held)
        out.append(self._line)
        self._clear()
        self._line = b""
        self._swallow = False
        self.abandoned = True


def _looks_whole(line: bytes, value: int, length: int) -> bool:
    """Whether a data value is not the start of a JSON object cut across lines."""
    return value == length or line[value] != _BRACE or line[length - 1] == _BRACE_END


def _parse(payload: bytes) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _INVALID


def _verdict_of(data: object) -> int:
    """Drop a usage-only chunk, cut a top-level `usage: null`, keep anything else."""
    if type(data) is not dict or "usage" not in data:
        return _KEEP
    usage = data["usage"]
    if usage is None:
        return _REWRITE
    if type(usage) is dict and data.get("choices") == []:
        return _DROP
    return _KEEP


def _without_usage_null(line: bytes, start: int, end: int) -> bytes:
    """One data line whose payload has a top-level `usage: null`, without it.

    With one literal `"usage"` and no `\\u` escape (the only way to spell a key
    otherwise), that one is the top-level key: it is cut without a second parse.
    Otherwise each candidate is checked by parsing the payload without it.
    """
    at = line.find(b'"usage"', start, end)
    if (
        at >= 0
        and line.find(b'"usage"', at + 7, end) < 0
        and (b"\\" not in line or b"\\u" not in line)
    ):
        span = _usage_null_span(line, start, end, at)
        if span is not None:
            return line[: span[0]] + line[span[1] :]
    for cut_start, cut_end in _usage_null_members(line, start, end):
        cut = line[:cut_start] + line[cut_end:]
        data = _parse(cut[start : end - (cut_end - cut_start)])
        if type(data) is dict and "usage" not in data:
            return cut
    return line


def _usage_null_span(
    line: bytes, start: int, end: int, at: int
) -> tuple[int, int] | None:
    """The span of the member whose `"usage"` key is at `at`, if its value is null.

    The comma before it goes with it, or, for the first member of its object, the
    comma after it. A literal `"usage"` followed by a colon is always a key: inside a
    JSON string its quotes would be escaped.
    """
    null = _NULL_VALUE.match(line, at + 7, end)
    if null is None:
        return None
    before = at
    while before > start and line[before - 1] in _BLANKS:
        before -= 1
    if before > start and line[before - 1] == _COMMA:
        return before - 1, null.end()
    after = _COMMA_AFTER.match(line, null.end(), end)
    return at, after.end() if after is not None else null.end()


def _usage_null_members(line: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Spans of `line[start:end]` that are a `"usage": null` member and its comma."""
    at = line.find(b'"usage"', start, end)
    while at >= 0:
        span = _usage_null_span(line, start, end, at)
        if span is not None:
            yield span
        at = line.find(b'"usage"', at + 7, end)


def strip_usage_events(data: bytes) -> bytes:
    """A whole SSE body without what an injected `include_usage` added."""
    stripper = UsageChunkStripper()
    return stripper.feed(data) + stripper.flush()


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
