"""The Helicone backend: one POST per event to the manual-logger ("custom log") API.

Docs: https://docs.helicone.ai/getting-started/integration-method/manual-logger-curl
(body: providerRequest / providerResponse / timing) and
https://docs.helicone.ai/guides/cookbooks/manual-logger-streaming. Helicone reads
token usage from the response body, so without logged bodies we send a minimal
OpenAI-shaped body carrying the event's usage. `Helicone-Request-Id` is the event id,
so a retried event keeps its identity.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from ..events.model import Event
from .base import DeliveryError, SendResult, is_transient_status
from .http import HttpPoster
from .records import event_time_s, event_usage, extra_field

DEFAULT_ENDPOINT: Final = "https://api.worker.helicone.ai/custom/v1/log"


def as_uuid(event_id: str) -> str:
    """The event id in UUID form when it is one (uuid4 hex), else unchanged."""
    try:
        return str(uuid.UUID(hex=event_id))
    except ValueError:
        return event_id


def _time(epoch_s: float) -> dict[str, int]:
    whole = int(epoch_s)
    return {"seconds": whole, "milliseconds": int((epoch_s - whole) * 1000)}


def _json(text: object) -> Any:
    if not isinstance(text, str):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def openai_usage(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our usage mapping in OpenAI's `usage` shape (with the token details)."""
    if not usage:
        return None
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens") or 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.get("reasoning_tokens") or 0
        },
    }


def helicone_log(event: Event, end_s: float) -> dict[str, Any]:
    """The manual-logger body of one event that ended at `end_s` (epoch seconds)."""
    request = _json(extra_field(event, "request_body"))
    response_text = extra_field(event, "response_body")
    truncated = bool(extra_field(event, "body_truncated"))
    usage = openai_usage(event_usage(event))
    request_json = request if isinstance(request, dict) else {"model": event.model}
    response: dict[str, Any] = {"status": event.status_code, "headers": {}}
    if event.stream and isinstance(response_text, str) and not truncated:
        response.update(json={}, textBody=response_text)
    else:
        # No raw stream to parse: Helicone must read usage from a JSON body.
        request_json = {k: v for k, v in request_json.items() if k != "stream"}
        body = None if truncated else _json(response_text)
        if not isinstance(body, dict):
            body = {"model": event.model}
        if usage is not None:
            body.setdefault("usage", usage)
        response["json"] = body
    timing: dict[str, Any] = {
        "startTime": _time(end_s - event.duration_ms / 1000),
        "endTime": _time(end_s),
    }
    if event.ttfb_ms is not None and event.stream:
        timing["timeToFirstToken"] = event.ttfb_ms
    return {
        "providerRequest": {
            "url": event.path,
            "json": request_json,
            "meta": _meta(event),
        },
        "providerResponse": response,
        "timing": timing,
    }


def _meta(event: Event) -> dict[str, str]:
    meta = {
        "Helicone-Request-Id": as_uuid(event.event_id),
        "Helicone-Property-Request-Id": event.request_id,
        "Helicone-Property-Endpoint": event.endpoint,
    }
    if event.project_id:
        meta["Helicone-User-Id"] = event.project_id
    if event.token_id:
        meta["Helicone-Property-Token-Id"] = event.token_id
    source = extra_field(event, "usage_source")
    if source:
        meta["Helicone-Property-Usage-Source"] = str(source)
    return meta


class HeliconeBackend:
    """Helicone has no batch endpoint: the events of a batch go concurrently."""

    name = "helicone"

    def __init__(self, poster: HttpPoster) -> None:
        self.poster = poster

    async def start(self) -> None:
        await self.poster.start()

    async def send(self, batch: Sequence[Event]) -> SendResult:
        outcomes = await asyncio.gather(*(self._send_one(e) for e in batch))
        result = SendResult()
        for event, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                continue
            reason, permanent = outcome
            if permanent:
                result.rejected.append((event, reason))
            else:
                result.retry.append(event)
                result.retry_reason = reason
        return result

    async def _send_one(self, event: Event) -> tuple[str, bool] | None:
        """None when accepted, else (reason, permanent)."""
        try:
            payload = helicone_log(event, event_time_s(event))
            status, body = await self.poster.post(payload)
        except DeliveryError as exc:
            return exc.reason, False
        if 200 <= status < 300:
            # The worker answers "ok"; a 200 with an error object was not stored.
            return None if body.strip() in (b"ok", b"") else (_text(body), False)
        return f"HTTP {status}: {_text(body)}", not is_transient_status(status)

    async def close(self) -> None:
        await self.poster.close()


def _text(body: bytes) -> str:
    return body[:200].decode("utf-8", errors="replace")
