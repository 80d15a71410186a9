"""The Lunary backend: a batch of `start` + `end`/`error` runs to the ingest API.

Docs: https://lunary.ai/docs/integrations/custom (POST `/v1/runs/ingest`, body
`{"events": [...]}`; a bare array is refused). Lunary answers 200 with a per-event
`results` list, so a refused event is dead-lettered while the rest count as
delivered; "already exists" means an earlier attempt got through, so it counts as
delivered too (retries stay idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from ..accounting.usage import json_text, sse_text
from ..clock import utc_iso
from ..events.model import Event
from .base import DeliveryError, SendResult
from .helicone import as_uuid
from .http import HttpPoster, raise_for_status
from .records import event_time_s, event_usage, extra_field

DEFAULT_ENDPOINT: Final = "https://api.lunary.ai/v1/runs/ingest"
_DUPLICATE: Final = "already exists"


def _iso(epoch_s: float) -> str:
    return utc_iso(datetime.fromtimestamp(epoch_s, UTC), "milliseconds")


def _input(event: Event) -> Any:
    text = extra_field(event, "request_body")
    try:
        request = orjson.loads(text) if isinstance(text, str) else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict):
        return None
    for key in ("messages", "input", "prompt"):
        if key in request:
            return request[key]
    return None


def _output(event: Event) -> Any:
    text = extra_field(event, "response_body")
    if not isinstance(text, str):
        return None
    body = text.encode()
    content = sse_text(body) if event.stream else json_text(body)
    return {"role": "assistant", "content": content} if content else None


def lunary_runs(event: Event) -> list[dict[str, Any]]:
    """The `start` and `end` (or `error`) runs of one event."""
    run_id = as_uuid(event.event_id)
    end_s = event_time_s(event)
    kind = "embed" if event.endpoint.endswith("/embeddings") else "llm"
    start = {
        "type": kind,
        "event": "start",
        "runId": run_id,
        "name": event.model,
        "timestamp": _iso(end_s - event.duration_ms / 1000),
        "input": _input(event),
        "userId": event.project_id,
        "tags": ["llm-proxy"],
        "metadata": {
            "tokenId": event.token_id,
            "requestId": event.request_id,
            "endpoint": event.endpoint,
            "statusCode": event.status_code,
            "usageSource": extra_field(event, "usage_source"),
        },
    }
    end: dict[str, Any] = {"type": kind, "runId": run_id, "timestamp": _iso(end_s)}
    if event.status_code >= 400 or event.error:
        end["event"] = "error"
        end["error"] = {"message": event.error or f"HTTP {event.status_code}"}
    else:
        end["event"] = "end"
        end["output"] = _output(event)
    usage = event_usage(event)
    if usage:
        end["tokensUsage"] = {
            "prompt": usage.get("prompt_tokens", 0),
            "completion": usage.get("completion_tokens", 0),
            "promptCached": usage.get("cached_tokens") or 0,
        }
    return [start, end]


class LunaryBackend:
    """One POST per batch; per-event results decide what is dead-lettered."""

    name = "lunary"

    def __init__(self, poster: HttpPoster) -> None:
        self.poster = poster

    async def start(self) -> None:
        await self.poster.start()

    async def send(self, batch: Sequence[Event]) -> SendResult:
        runs = [run for event in batch for run in lunary_runs(event)]
        status, body = await self.poster.post({"events": runs})
        raise_for_status(status, body)
        return SendResult(rejected=_refused(batch, body))

    async def close(self) -> None:
        await self.poster.close()


def _refused(batch: Sequence[Event], body: bytes) -> list[tuple[Event, str]]:
    """Events whose run Lunary refused (a duplicate is not a refusal)."""
    try:
        results = orjson.loads(body).get("results")
    except (orjson.JSONDecodeError, AttributeError):
        raise DeliveryError(f"unreadable Lunary answer: {body[:200]!r}") from None
    errors: dict[str, str] = {}
    for result in results if isinstance(results, list) else ():
        if not isinstance(result, dict) or result.get("success", True):
            continue
        reason = str(result.get("error", "refused"))
        if _DUPLICATE not in reason:
            errors.setdefault(str(result.get("id")), reason)
    return [
        (event, errors[as_uuid(event.event_id)])
        for event in batch
        if as_uuid(event.event_id) in errors
    ]
