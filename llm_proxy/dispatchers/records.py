"""The JSON record of a `RequestCompleted` event that backends receive.

The documented log format (`timestamp`, `project_id`, `endpoint`, `method`,
`status_code`, `duration_ms`, `metadata{prompt_tokens, completion_tokens,
total_tokens, model, created}`) plus every field of the event, flat: fields that
travel in the event's `extra` (`usage_source`, `error_class`, bodies) are lifted to
the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..clock import iso_epoch_s
from ..events.model import BaseEvent, Event


def event_record(event: Event) -> dict[str, Any]:
    """A flat, JSON-ready dict of one event."""
    data = event.to_json_dict()
    extra = data.pop("extra", None) or {}
    for key, value in extra.items():
        data.setdefault(key, value)
    data.setdefault("usage_source", None)
    usage = event_usage(event)
    data["metadata"] = {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "model": data.get("model"),
        "created": data.get("created") or epoch_s(event),
    }
    return data


def event_time_s(event: BaseEvent) -> float:
    """The event's timestamp (when the call ended) in epoch seconds, 0 if unreadable.

    Unreadable includes a foreign producer's number or null where ISO text belongs.
    """
    try:
        return iso_epoch_s(event.timestamp)
    except (ValueError, TypeError):
        return 0.0


def epoch_s(event: Event) -> int:
    """The event's timestamp in whole epoch seconds."""
    return int(event_time_s(event))


def event_usage(event: Event) -> Mapping[str, Any]:
    """The event's usage object, empty when there is none.

    Also empty when a foreign producer sent something else than an object there: the
    backends skip it (the file record carries it as it came) instead of crashing.
    """
    usage = event.usage
    return usage if isinstance(usage, Mapping) else {}


def extra_field(event: Event, name: str) -> Any:
    """A field that may be first-class on the event or carried in its `extra`."""
    value = getattr(event, name, None)
    if value is None and isinstance(event.extra, Mapping):
        value = event.extra.get(name)
    return value
