"""The usage stripper follows the SSE grammar: every framing, any chunking, no lost byte.

The streams are the captured OpenAI chat stream (`chat_stream_with_usage.sse`)
re-framed the way other OpenAI-compatible servers send it; what the stripper gives
must be the derived no-usage stream (`chat_stream_no_usage.sse`) in the same framing.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import orjson
import pytest

from llm_proxy.devtools.fake_upstream import (
    load_fixture,
    reframe_sse_event,
    split_sse_events,
)
from llm_proxy.proxy.capture import (
    MAX_PENDING_BYTES,
    UsageChunkStripper,
    strip_usage_events,
)

WITH_USAGE = split_sse_events(load_fixture("chat_stream_with_usage.sse"))
NO_USAGE = split_sse_events(load_fixture("chat_stream_no_usage.sse"))
USAGE_EVENT = len(WITH_USAGE) - 2  # the usage-only chunk comes just before [DONE]
KEEPALIVE = b": keep-alive\n\n"
TEXT = "10 + 5 equals 15."

# framing, spaced JSON, blank lines, keep-alive comments
VARIANTS = [
    ("lf", False, True, False),
    ("crlf", False, True, False),
    ("cr", False, True, False),
    ("mixed", False, True, False),
    ("lf", True, True, False),
    ("crlf", True, True, True),
    ("lf", False, False, False),
    ("crlf", False, False, False),
    ("cr", True, False, False),
    ("mixed", False, True, True),
]
Variant = tuple[str, bool, bool, bool]


def _frame(events: list[bytes | None], variant: Variant) -> list[bytes]:
    """The events in a variant's framing (None: an event left out, keep-alive kept)."""
    framing, spaced, blank_line, keepalive = variant
    framed: list[bytes] = []
    for index, event in enumerate(events):
        if keepalive:
            framed.append(reframe_sse_event(KEEPALIVE, index, framing=framing))
        if event is not None:
            framed.append(
                reframe_sse_event(
                    event,
                    index,
                    framing=framing,
                    spaced_json=spaced,
                    blank_line=blank_line,
                )
            )
    return framed


def upstream_events(variant: Variant) -> list[bytes]:
    """The stream upstream sends when the proxy injected `include_usage`."""
    return _frame(list(WITH_USAGE), variant)


def client_events(variant: Variant) -> list[bytes]:
    """What upstream sends without `include_usage`, in the same framing."""
    events: list[bytes | None] = list(NO_USAGE)
    events.insert(USAGE_EVENT, None)
    return _frame(events, variant)


def strip(chunks: Iterable[bytes]) -> bytes:
    stripper = UsageChunkStripper()
    out = [stripper.feed(chunk) for chunk in chunks]
    return b"".join(out) + stripper.flush()


def delivered_text(body: bytes) -> str:
    """The content deltas of a stream, read line by line (any line end)."""
    parts = []
    for line in body.splitlines():
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content", ""))
    return "".join(parts)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_each_framing_becomes_the_no_usage_stream_in_the_same_framing(
    variant: Variant,
) -> None:
    sent = upstream_events(variant)
    expected = b"".join(client_events(variant))
    assert strip([b"".join(sent)]) == expected
    assert strip(sent) == expected
    assert delivered_text(expected) == TEXT
    assert b"usage" not in expected


def test_the_lf_stream_becomes_the_captured_no_usage_fixture() -> None:
    assert strip(WITH_USAGE) == load_fixture("chat_stream_no_usage.sse")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_split_at_any_byte_gives_the_whole_buffer_output(variant: Variant) -> None:
    # The role chunk, a content chunk, then finish, usage and [DONE] (the other
    # content chunks are alike): every kind of event, cut at each of its bytes.
    events = upstream_events(variant)
    whole = b"".join(events[:3] + events[-5:])
    expected = strip([whole])
    for cut in range(len(whole) + 1):
        assert strip([whole[:cut], whole[cut:]]) == expected, cut


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_random_chunkings_and_single_bytes_give_the_whole_buffer_output(
    variant: Variant,
) -> None:
    whole = b"".join(upstream_events(variant))
    expected = b"".join(client_events(variant))
    rng = random.Random(repr(variant))
    for _ in range(40):
        cuts = sorted(rng.sample(range(1, len(whole)), rng.randint(2, 30)))
        pieces = [
            whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)
        ]
        assert strip(pieces) == expected, cuts
    assert strip(whole[i : i + 1] for i in range(len(whole))) == expected


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_each_event_goes_out_as_soon_as_it_is_complete(variant: Variant) -> None:
    """Nothing of a finished event waits for the next one (or for the end)."""
    stripper = UsageChunkStripper()
    out = b""
    sent = upstream_events(variant)
    for event in sent:
        out += stripper.feed(event)
        # Only the usage chunk is withheld: the output is what the client should
        # have so far, in full.
        expected = b"".join(client_events(variant))
        assert expected.startswith(out)
        if event.startswith(b"data: {") and b"prompt_tokens" not in event:
            assert out.endswith(_spaceless_tail(event)), event
    assert out + stripper.flush() == b"".join(client_events(variant))


def _spaceless_tail(event: bytes) -> bytes:
    """The last bytes of an event, after its `usage` member (kept as sent)."""
    return event[event.rindex(b"obfuscation") :]


def test_a_cr_lf_pair_split_across_chunks_is_one_line_end() -> None:
    event = reframe_sse_event(WITH_USAGE[1], framing="crlf")
    expected = reframe_sse_event(NO_USAGE[1], framing="crlf")
    head, _, _ = event.partition(b"\r\n")
    stripper = UsageChunkStripper()
    first = stripper.feed(head + b"\r")
    second = stripper.feed(b"\n\r")
    third = stripper.feed(b"\n")
    assert first + second + third + stripper.flush() == expected
    # The data line went out at its CR; the LF after it belongs to that line end.
    assert first == expected[: expected.index(b"\r") + 1]


def test_a_blank_line_after_a_whole_cr_lf_is_a_blank_line() -> None:
    stripper = UsageChunkStripper()
    assert stripper.feed(b"id: 7\r\n") == b""  # held for the data it precedes
    assert stripper.feed(b"\n") == b"id: 7\r\n\n"  # the blank line ends the event
    assert stripper.feed(b"id: 8\r") == b""
    assert stripper.feed(b"") == b""  # an empty read changes nothing
    assert stripper.feed(b"\n") == b""  # the LF of the CRLF: not a blank line
    assert stripper.feed(b"\r\n") == b"id: 8\r\n\r\n"


def test_a_usage_chunk_split_across_chunks_at_its_cr_lf_is_dropped_whole() -> None:
    event = reframe_sse_event(WITH_USAGE[USAGE_EVENT], framing="crlf")
    done = reframe_sse_event(WITH_USAGE[-1], framing="crlf")
    stripper = UsageChunkStripper()
    out = [stripper.feed(event[:-3]), stripper.feed(event[-3:-1])]
    out += [stripper.feed(event[-1:] + done), stripper.flush()]
    assert b"".join(out) == done


def test_spaces_and_key_order_do_not_hide_the_usage_chunk() -> None:
    usage = b'{"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}'
    stream = (
        b'data: {"id": "c", "usage": ' + usage + b', "choices": [ ]}\r\n\r\n'
        b'data: {"usage" : null , "id": "c", "choices": [{"delta": {"content": "x"}}]}'
        b"\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
    )
    assert strip([stream]) == (
        b'data: {"id": "c", "choices": [{"delta": {"content": "x"}}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )


def test_content_that_looks_like_a_usage_chunk_is_never_dropped() -> None:
    # The old byte test (`"choices":[]` and `"usage":{` anywhere) matched this chunk.
    chunk = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null,'
        b'"extra":{"choices":[],"usage":{"prompt_tokens":1}}}\n\n'
    )
    assert strip([chunk]) == chunk.replace(b'"usage":null,', b"")
    quoted = b'data: {"choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n'
    assert strip([quoted]) == quoted


def test_a_chunk_with_choices_keeps_a_non_null_usage() -> None:
    event = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}\n\n'
    assert strip_usage_events(event + b"data: [DONE]\n\n") == (
        event + b"data: [DONE]\n\n"
    )


def test_only_a_top_level_usage_null_is_removed() -> None:
    nested = b'{"choices":[{"delta":{"x":1,"usage":null}}]'
    event = b"data: " + nested + b',"usage":null,"id":"c"}\r\n\r\n'
    assert strip([event]) == b"data: " + nested + b',"id":"c"}\r\n\r\n'
    assert strip([b"data: " + nested + b"}\n\n"]) == b"data: " + nested + b"}\n\n"
    first = b'data: {"usage":null, "id":"c"}\n\n'
    assert strip([first]) == b'data: {"id":"c"}\n\n'
    alone = b'data: {"usage":null}\n\n'
    assert strip([alone]) == b"data: {}\n\n"


def test_comments_fields_and_a_bom_pass_through() -> None:
    stream = (
        b"\xef\xbb\xbf: hello\r\n\r\n"
        b"id: 1\r\nevent: chunk\r\n"
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\r\n\r\n'
        b": ping - 2026-12-01 08:50:32\r\n\r\n"
    )
    assert strip([stream]) == stream.replace(b',"usage":null', b"")
    bom_data = b'\xef\xbb\xbfdata: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert strip([bom_data, b"data: [DONE]\n\n"]) == b"data: [DONE]\n\n"


def test_a_usage_event_with_fields_and_comments_is_dropped_whole() -> None:
    usage = b'data: {"choices":[],"usage":{"total_tokens":3}}'
    stream = b"event: chunk\r\nid: 9\r\n" + usage + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    assert strip([stream]) == b"data: [DONE]\r\n\r\n"


def test_a_multi_line_data_field_is_read_as_one_payload() -> None:
    usage_chunk = (
        b'data: {"choices": [],\ndata: "usage": {"total_tokens": 3}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert strip([usage_chunk]) == b"data: [DONE]\n\n"
    rewritten = (
        b'data: {"choices": [{"delta": {"content": "x"}}],\n'
        b'data:  "usage": null, "id": "c"}\n\n'
    )
    assert strip([rewritten]) == rewritten.replace(b' "usage": null,', b"")


def test_events_without_blank_lines_are_decided_line_by_line() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n'
        b'data: {"choices":[],"usage":{"total_tokens":3}}\n'
        b"data: [DONE]\n"
    )
    stripper = UsageChunkStripper()
    first = stripper.feed(stream[: stream.index(b"\n") + 1])
    assert first == b'data: {"choices":[{"delta":{"content":"a"}}]}\n'
    rest = stripper.feed(stream[len(first) + len(b',"usage":null') :])
    assert rest + stripper.flush() == b"data: [DONE]\n"


def test_a_last_event_without_its_blank_line_is_still_delivered() -> None:
    stream = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}'
    assert strip([stream[:20], stream[20:]]) == stream.replace(b',"usage":null', b"")
    usage_chunk = b'data: {"choices":[],"usage":{"total_tokens":3}}\n'
    assert strip([usage_chunk]) == b""


def test_what_is_not_json_passes_unchanged() -> None:
    stream = (
        b"data: the usage of words\n\n"
        b'data: {"usage": broken\n\n'
        b'data: {"choices":[],"usage":{"n":"\xff"}}\n\n'
        b"data: [DONE]\n\n"
        b"retry: 10\ndata\n\n"
    )
    assert strip([stream]) == stream
    assert strip(stream[i : i + 1] for i in range(len(stream))) == stream


def test_an_endless_line_is_abandoned_at_the_bound_and_passed_through() -> None:
    stripper = UsageChunkStripper()
    head = b'data: {"usage":null,"x":"'
    assert stripper.feed(head) == b""
    assert not stripper.abandoned
    blob = b"x" * MAX_PENDING_BYTES
    assert stripper.feed(blob) == head + blob
    assert stripper.abandoned
    tail = b'"}\n\ndata: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert stripper.feed(tail) == tail
    assert stripper.flush() == b""


def test_an_event_that_never_ends_is_abandoned_at_the_bound() -> None:
    line = b'data: {"usage": not json\n'
    stream = line * (MAX_PENDING_BYTES // len(line) + 2)
    stripper = UsageChunkStripper()
    out = b"".join(
        stripper.feed(stream[i : i + 997]) for i in range(0, len(stream), 997)
    )
    assert stripper.abandoned
    assert out + stripper.flush() == stream


def test_after_a_line_that_is_not_json_each_line_is_decided_anew() -> None:
    stream = (
        b'data: {"usage": broken\n'
        b'data: {"choices":[],"usage":{"total_tokens":3}}\n'
        b"data: [DONE]\n"
    )
    stripper = UsageChunkStripper()
    assert stripper.feed(stream) == b'data: {"usage": broken\ndata: [DONE]\n'
    assert stripper.flush() == b""


def test_a_comment_inside_an_event_stays_with_it() -> None:
    event = b'event: chunk\n: note\ndata: {"choices":[{"delta":{}}],"usage":null}\n\n'
    assert strip([event]) == event.replace(b',"usage":null', b"")
    usage = b'event: chunk\n: note\ndata: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    assert strip([usage, b"data: [DONE]\n\n"]) == b"data: [DONE]\n\n"


def test_a_usage_null_that_cannot_be_found_is_left_in_place() -> None:
    # The top-level key is spelled with an escape: the only literal one is nested.
    escaped = b'data: {"x":{"usage":null},"us\\u0061ge":null}\n\n'
    assert strip([escaped]) == escaped
    split = b'data: {"x":{"usage":null},\ndata: "us\\u0061ge":null}\n\n'
    assert strip([split]) == split
    # "usage" as a value comes first; the member is found after it.
    valued = b'data: {"k":"usage","usage":null}\n\n'
    assert strip([valued]) == b'data: {"k":"usage"}\n\n'
