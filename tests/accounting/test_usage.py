"""Usage accounting units: byte capture, SSE rewriting, extraction and estimation."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest

from llm_proxy.accounting.usage import (
    ESTIMATED,
    PARTIAL,
    Usage,
    decode_body,
    encoding_for,
    estimate_usage,
    json_text,
    prompt_texts,
    sse_text,
    usage_from_json,
    usage_from_json_tail,
    usage_from_object,
    usage_from_sse,
)
from llm_proxy.devtools.fake_upstream import (
    SSE_FRAMINGS,
    load_fixture,
    reframe_sse_event,
    split_sse_events,
)
from llm_proxy.proxy.capture import (
    MAX_PENDING_BYTES,
    ResponseCapture,
    UsageChunkStripper,
    inject_include_usage,
    strip_usage_events,
)

WITH_USAGE = load_fixture("chat_stream_with_usage.sse")
NO_USAGE = load_fixture("chat_stream_no_usage.sse")


def _strip_in_pieces(data: bytes, size: int) -> bytes:
    stripper = UsageChunkStripper()
    out = [stripper.feed(data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(out) + stripper.flush()


@pytest.mark.parametrize("size", [1, 7, 100, 4096, len(WITH_USAGE)])
def test_stripper_turns_the_usage_stream_into_the_no_usage_stream(size: int) -> None:
    assert _strip_in_pieces(WITH_USAGE, size) == NO_USAGE


def test_stripper_holds_back_only_an_unfinished_event() -> None:
    first, second, *_ = split_sse_events(WITH_USAGE)
    stripper = UsageChunkStripper()
    assert stripper.feed(first + second[:10]) == first.replace(b',"usage":null', b"")
    assert stripper.feed(second[10:]) == second.replace(b',"usage":null', b"")


def test_stripper_passes_through_a_stream_without_event_boundaries() -> None:
    stripper = UsageChunkStripper()
    blob = b"x" * (MAX_PENDING_BYTES + 1)
    assert stripper.feed(blob) == blob
    assert stripper.feed(b'"usage":null\n\n') == b'"usage":null\n\n'
    assert stripper.flush() == b""


def test_stripper_keeps_usage_on_a_chunk_that_also_has_choices() -> None:
    event = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}\n\n'
    assert (
        strip_usage_events(event + b"data: [DONE]\n\n") == event + b"data: [DONE]\n\n"
    )


def test_stripper_drops_a_usage_event_cut_before_its_terminator() -> None:
    events = split_sse_events(WITH_USAGE)
    cut = b"".join(events[:-2]) + events[-2].rstrip(b"\n")
    expected = b"".join(events[:-2]).replace(b',"usage":null', b"")
    assert _strip_in_pieces(cut, 50) == expected


def test_inject_include_usage_splices_only_when_the_client_did_not_decide() -> None:
    body = b'{"model":"m","stream":true}  \n'
    injected = inject_include_usage(body, orjson.loads(body))
    assert injected == (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}  \n'
    )
    merged = inject_include_usage(
        b"{}", {"stream": True, "stream_options": {"include_obfuscation": False}}
    )
    assert merged is not None
    assert orjson.loads(merged)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    explicit = {"stream": True, "stream_options": {"include_usage": False}}
    assert inject_include_usage(b"{}", explicit) is None
    assert inject_include_usage(b"{}", {"stream_options": "x"}) is None


def test_capture_keeps_a_bounded_head_and_tail() -> None:
    capture = ResponseCapture(head_max=10, tail_max=8)
    for piece in (b"0123", b"4567", b"89ab", b"cdef", b"ghij"):
        capture.feed(piece)
    assert capture.head_bytes() == b"0123456789"
    assert not capture.complete and capture.total == 20
    assert capture.tail_bytes().endswith(b"cdefghij")
    assert len(capture.tail_bytes()) <= 8 + 4


def test_capture_of_a_small_body_is_complete() -> None:
    capture = ResponseCapture(head_max=100)
    capture.feed(b"{}")
    assert capture.complete and capture.head_bytes() == b"{}"


def test_usage_from_chat_json_keeps_cached_and_reasoning_tokens() -> None:
    usage = usage_from_json(load_fixture("chat_completion.json"))
    assert usage is not None and usage.reasoning_tokens == 128
    assert usage.cached_tokens == 0 and usage.source == "upstream"
    cached = usage_from_json(load_fixture("chat_completion_cached.json"))
    assert cached is not None
    assert (cached.prompt_tokens, cached.cached_tokens) == (1149, 1024)


def test_usage_from_responses_embeddings_and_audio() -> None:
    responses = usage_from_json(load_fixture("responses_create.json"))
    assert responses is not None and responses.reasoning_tokens == 64
    embeddings = usage_from_json(load_fixture("embeddings_base64.json"))
    assert embeddings is not None and embeddings.completion_tokens == 0
    duration = usage_from_json(load_fixture("audio_transcription.json"))
    assert duration is not None and duration.seconds == 7
    assert duration.as_dict() == {
        "type": "duration",
        "seconds": 7,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }
    tokens = usage_from_json(load_fixture("audio_transcription_tokens.json"))
    assert tokens is not None and tokens.total_tokens > 0


def test_usage_from_bad_bodies_is_none() -> None:
    assert usage_from_json(b"not json") is None
    assert usage_from_json(b"[1, 2]") is None
    assert usage_from_object("nope") is None
    assert usage_from_json_tail(b"no usage here") is None
    assert usage_from_json_tail(b'"usage": {"prompt_tokens": 1') is None


def test_usage_from_the_tail_of_a_large_json_body() -> None:
    body = load_fixture("chat_completion.json")
    usage = usage_from_json_tail(body[body.rindex(b'"usage"') - 30 :])
    assert usage == usage_from_json(body)


def test_usage_from_sse_takes_the_last_non_null_usage() -> None:
    usage = usage_from_sse(WITH_USAGE)
    assert usage is not None and usage.as_dict() == {
        "prompt_tokens": 23,
        "completion_tokens": 8,
        "total_tokens": 31,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert usage_from_sse(NO_USAGE) is None
    broken = b'data: {"usage": broken\n\n' + WITH_USAGE
    assert usage_from_sse(broken) == usage
    cumulative = (
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
    )
    last = usage_from_sse(cumulative)
    assert last is not None and (last.completion_tokens, last.total_tokens) == (9, 14)


def test_usage_from_a_responses_stream_comes_from_response_completed() -> None:
    usage = usage_from_sse(load_fixture("responses_stream.sse"))
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        14,
        9,
        23,
    )


def test_sse_text_is_the_delivered_assistant_text() -> None:
    assert sse_text(WITH_USAGE) == sse_text(NO_USAGE) == "10 + 5 equals 15."
    assert sse_text(load_fixture("responses_stream.sse")).startswith("2")
    legacy = b'data: {"choices":[{"text":"hel"},{"text":"lo"}]}\n\ndata: [1]\n\n'
    assert sse_text(legacy + b"data: {bad\n\n") == "hello"


def _framed(name: str, framing: str, *, blank_line: bool = True) -> bytes:
    events = split_sse_events(load_fixture(name))
    return b"".join(
        reframe_sse_event(
            e, i, framing=framing, spaced_json=True, blank_line=blank_line
        )
        for i, e in enumerate(events)
    )


@pytest.mark.parametrize("framing", sorted(SSE_FRAMINGS))
@pytest.mark.parametrize("blank_line", [True, False])
def test_usage_and_text_are_read_from_every_framing(
    framing: str, blank_line: bool
) -> None:
    chat = _framed("chat_stream_with_usage.sse", framing, blank_line=blank_line)
    assert usage_from_sse(chat) == usage_from_sse(WITH_USAGE) is not None
    assert sse_text(chat) == "10 + 5 equals 15."
    responses = _framed("responses_stream.sse", framing, blank_line=blank_line)
    assert usage_from_sse(responses) == usage_from_sse(
        load_fixture("responses_stream.sse")
    )
    assert sse_text(responses) == sse_text(load_fixture("responses_stream.sse"))
    # Cut before the last blank line (or in the middle of the last line end).
    assert usage_from_sse(chat.rstrip(b"\r\n")) == usage_from_sse(WITH_USAGE)


def test_a_multi_line_data_field_is_one_payload() -> None:
    stream = (
        b'data: {"choices": [{"delta": {"content": "a"}}],\r\n'
        b'data: "usage": null}\r\n\r\n'
        b"event: chunk\rid: 2\r: comment\r"
        b'data: {"choices": [],\r'
        b'data:"usage": {"prompt_tokens": 4, "completion_tokens": 2}}\r\r'
        b"data: [DONE]\r\r"
    )
    usage = usage_from_sse(stream)
    assert usage is not None and (usage.prompt_tokens, usage.total_tokens) == (4, 6)
    assert sse_text(stream) == "a"


def test_a_bom_and_events_without_blank_lines_are_read() -> None:
    stream = (
        b'\xef\xbb\xbfdata: {"choices":[{"delta":{"content":"a"}}]}\n'
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n'
        b"data: [DONE]\n"
    )
    assert sse_text(stream) == "ab"
    usage = usage_from_sse(stream)
    assert usage is not None and usage.total_tokens == 3


def test_json_text_reads_chat_and_responses_answers() -> None:
    assert json_text(load_fixture("chat_completion.json")) == "3"
    assert json_text(load_fixture("responses_create.json")) == "3"
    assert json_text(b"[]") == ""
    assert json_text(b'{"choices":[{"text":"a"}],"output":["x"]}') == "a"


def test_prompt_texts_cover_chat_responses_and_embeddings() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, "junk"]}
    texts, framing = prompt_texts(chat)
    assert texts == ["userhi", ""] and framing == 9
    parts = {"messages": [{"role": "user", "content": [{"text": "a"}, {"x": 1}]}]}
    assert prompt_texts(parts)[0] == ["usera"]
    responses = {"instructions": "be brief", "input": ["x", {"content": "y"}, 3]}
    assert prompt_texts(responses) == (["be brief", "x", "y"], 0)
    assert prompt_texts({"input": {"odd": 1}}) == ([], 0)


def test_decode_body_undoes_gzip_and_deflate() -> None:
    assert decode_body(gzip.compress(b"{}"), "gzip") == b"{}"
    assert decode_body(zlib.compress(b"{}"), "deflate") == b"{}"
    assert decode_body(b"{}", None) == b"{}"
    assert decode_body(b"junk", "gzip") is None
    assert decode_body(b"{}", "br") is None


def test_estimate_counts_prompt_and_completion_with_tiktoken(
    tiktoken_encodings: None,
) -> None:
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
    usage = estimate_usage("gpt-4o", request, "hello world", source=PARTIAL)
    assert usage == Usage(1 + 1 + 6, 2, 10, source=PARTIAL)
    doubled = estimate_usage(
        "gpt-4o", None, "hello world", source=ESTIMATED, completion_scale=2.0
    )
    assert (doubled.prompt_tokens, doubled.completion_tokens) == (0, 4)


def test_encoding_follows_the_model_with_an_o200k_fallback(
    tiktoken_encodings: None,
) -> None:
    assert encoding_for("gpt-4").name == "cl100k_base"
    assert encoding_for("gpt-4o-mini").name == "o200k_base"
    assert encoding_for("some-other-provider-model").name == "o200k_base"
    assert encoding_for(None).name == "o200k_base"


def test_inject_include_usage_treats_null_stream_options_as_absent() -> None:
    body = b'{"model": "m", "stream": true, "stream_options": null}'
    injected = inject_include_usage(body, orjson.loads(body))
    assert injected is not None
    assert orjson.loads(injected)["stream_options"] == {"include_usage": True}
    text = b'{"model": "m", "stream": true, "stream_options": "x"}'
    assert inject_include_usage(text, orjson.loads(text)) is None
