"""HTTP backends: a shared POST-with-classification helper and the generic collector.

The generic backend POSTs each batch as a JSON array of event records to any URL
(`LOGGING_URL`), with an optional bearer key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from ..events.model import Event
from .base import DeliveryError, SendResult, is_transient_status
from .records import event_record


class HttpPoster:
    """One pooled client session; POST JSON and classify failures."""

    def __init__(
        self, endpoint: str, api_key: str | None, *, timeout_s: float, limit: int = 8
    ) -> None:
        self.endpoint = endpoint
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session (needs a running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def post(self, payload: Any) -> tuple[int, bytes]:
        """POST `payload` as JSON: (status, body), or `DeliveryError` (transient)."""
        if self._session is None:
            raise RuntimeError("HttpPoster.post() before start()")
        data = orjson.dumps(payload, default=dict)
        try:
            async with self._session.post(
                self.endpoint, data=data, headers=self._headers
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def raise_for_status(status: int, body: bytes) -> None:
    """Turn a non-2xx answer into a transient or permanent `DeliveryError`."""
    if 200 <= status < 300:
        return
    snippet = body[:200].decode("utf-8", errors="replace")
    raise DeliveryError(
        f"HTTP {status}: {snippet}", permanent=not is_transient_status(status)
    )


class HttpBackend:
    """POST a JSON array of event records to any collector URL."""

    name = "http"

    def __init__(self, poster: HttpPoster) -> None:
        self.poster = poster

    async def start(self) -> None:
        await self.poster.start()

    async def send(self, batch: Sequence[Event]) -> SendResult:
        status, body = await self.poster.post([event_record(e) for e in batch])
        raise_for_status(status, body)
        return SendResult()

    async def close(self) -> None:
        await self.poster.close()
