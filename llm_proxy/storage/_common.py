"""Value conversions both SQL backends share: LIKE patterns, metadata and policy
JSON, paging.

Also what makes a usage row storable on both alike: text without NUL (PostgreSQL's
text and jsonb refuse it), bounded in length, and integers that fit PostgreSQL's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import orjson

from .base import RejectedRowsError, TokenPolicy, UsageEvent

# Usage rows carry client-chosen text (the request's model, an unknown path): each
# column keeps this many characters, so one 1 MiB model is not stored per call.
MAX_TEXT_CHARS: Final = 512
MAX_EVENT_ID_CHARS: Final = 200  # the primary key: refused past this, never cut
INT4: Final = range(-(2**31), 2**31)  # PostgreSQL INTEGER; SQLite is held to it too
_USAGE_TEXT: Final = (
    "project_id",
    "token_id",
    "endpoint",
    "method",
    "model",
    "usage_source",
)
_USAGE_INTEGERS: Final = (
    "status_code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)


def like_pattern(search: str | None) -> str | None:
    """A LIKE pattern (escape character backslash) matching `search` as a substring."""
    if search is None:
        return None
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def dump_metadata(metadata: Mapping[str, Any]) -> str:
    """Project metadata as compact JSON text."""
    return json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False)


def load_metadata(text: str) -> dict[str, Any]:
    """Project metadata from its stored JSON text."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored project metadata is not a JSON object")
    return value


def dump_origins(origins: tuple[str, ...]) -> str:
    """A project's allowed origins as a JSON array."""
    return json.dumps(list(origins), separators=(",", ":"))


def load_origins(text: str) -> tuple[str, ...]:
    """A project's allowed origins from their stored JSON array."""
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError("stored allowed origins are not a JSON array")
    return tuple(str(origin) for origin in value)


def dump_policy(policy: TokenPolicy | None) -> str | None:
    """A policy as compact JSON of what it narrows; None (NULL) when it narrows nothing."""
    if policy is None:
        return None
    data: dict[str, Any] = {}
    if policy.bind:
        data["bind"] = dict(policy.bind)
    if policy.allowed_models is not None:
        data["allowed_models"] = list(policy.allowed_models)
    if policy.max_output_tokens_cap is not None:
        data["max_output_tokens_cap"] = policy.max_output_tokens_cap
    if not policy.allow_streaming:
        data["allow_streaming"] = False
    return orjson.dumps(data).decode() if data else None


def load_policy(text: str | None) -> TokenPolicy | None:
    """A policy from its stored JSON (orjson: a reload reads up to a page per slice)."""
    if text is None:
        return None
    data = orjson.loads(text)
    models = data.get("allowed_models")
    return TokenPolicy(
        bind=data.get("bind") or {},
        allowed_models=None if models is None else tuple(models),
        max_output_tokens_cap=data.get("max_output_tokens_cap"),
        allow_streaming=data.get("allow_streaming", True),
    )


def check_page(limit: int, offset: int) -> None:
    """Reject negative paging values, which the two databases treat differently."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0 (got {limit}, {offset})")


def clean_text(value: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`value` with NUL and lone surrogates as U+FFFD / '?', cut to `limit` characters.

    Returns `value` itself when nothing needed changing.
    """
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode()
    return value if len(value) <= limit else value[:limit]


def storable_usage_event(event: UsageEvent) -> UsageEvent:
    """`event` as both databases store it alike; `RejectedRowsError` if it cannot be.

    Text is cleaned (`clean_text`); a value of the wrong type, an integer outside
    PostgreSQL's INTEGER or an event id that is empty or too long refuses the row.
    """
    event_id = event.event_id
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
        raise RejectedRowsError(f"usage event id {event_id!r:.60} is not storable")
    for name in _USAGE_INTEGERS:
        number = getattr(event, name)
        if number is not None and (not isinstance(number, int) or number not in INT4):
            raise RejectedRowsError(
                f"usage event {event_id}: {name} {number!r:.40} is not a 32-bit integer"
            )
    if not isinstance(event.duration_ms, int | float):
        raise RejectedRowsError(f"usage event {event_id}: duration_ms is not a number")
    changes = _cleaned_text(event)
    if "\x00" in event_id:
        changes["event_id"] = event_id.replace("\x00", "\ufffd")
    return replace(event, **changes) if changes else event


def _cleaned_text(event: UsageEvent) -> dict[str, Any]:
    """The text fields of `event` that `clean_text` changes, cleaned."""
    changes: dict[str, Any] = {}
    for name in _USAGE_TEXT:
        text = getattr(event, name)
        if text is None:
            continue
        if not isinstance(text, str):
            raise RejectedRowsError(
                f"usage event {event.event_id}: {name} is not text: {text!r:.40}"
            )
        cleaned = clean_text(text)
        if cleaned is not text:
            changes[name] = cleaned
    return changes
