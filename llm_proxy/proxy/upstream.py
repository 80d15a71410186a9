"""The pooled upstream session and sending one request on it.

One `aiohttp.ClientSession` per process: no total timeout, no cookie jar, no
decompression, none of aiohttp's default headers, and a bounded wait for a free pooled
connection. `send_upstream` is the one place where aiohttp's connection errors become
our 502/503/504 errors.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..backoff import RetryPolicy
from ..config import Settings
from ..errors import (
    UpstreamPoolExhaustedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ..keys import SETTINGS_KEY, UPSTREAM_SESSION_KEY

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.tracing import Trace

# aiohttp adds Accept, Accept-Encoding, User-Agent and a Content-Type that the client
# did not send, unless told to skip them; a session-wide skip list makes it rebuild and
# merge that list on every request (2.4 µs, about 2% of the proxy's time under load).
_NO_AUTO_HEADERS: Final = CIMultiDict[None](
    (name, None)
    for name in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
)

# Between connection retries: 50 ms doubling, times 0.5-1.5; UPSTREAM_RETRIES (the
# count) bounds the wait, so there is no cap.
CONNECT_RETRY: Final = RetryPolicy(base_s=0.05, max_s=math.inf, jitter=(0.5, 1.5))


class TransparentRequest(aiohttp.ClientRequest):
    """An upstream request with the client's headers only: none of aiohttp's defaults."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


class PoolWaitTimeout(aiohttp.ClientError):
    """No pooled upstream connection came free within the pool timeout."""


class BoundedWaitConnector(aiohttp.TCPConnector):
    """The TCP pool, with its wait for a free connection bounded on its own.

    aiohttp 3.14 has no pool-wait setting: `ClientTimeout.connect` bounds the wait and
    the creation of the connection together, so a slow TCP connect and a full pool
    would raise the same timeout. Bounding only the wait (entered only when the pool
    is full: no cost otherwise) keeps `sock_connect` the one limit on connecting, and
    `PoolWaitTimeout` is no `TimeoutError`, so it cannot pass for one.
    """

    def __init__(self, *, pool_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_timeout_s = pool_timeout_s

    async def _wait_for_available_connection(
        self, key: ConnectionKey, traces: list[Trace]
    ) -> None:
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError:
            raise PoolWaitTimeout(
                f"no free upstream connection within {self._pool_timeout_s} s"
            ) from None


def new_upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The one pooled session: no total timeout, no cookies, no decompression."""
    upstream = settings.upstream
    connector = BoundedWaitConnector(
        pool_timeout_s=upstream.pool_timeout_s,
        limit=upstream.max_connections,
        limit_per_host=0,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
        ttl_dns_cache=300,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=upstream.connect_timeout_s,
        sock_read=upstream.read_idle_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        request_class=TransparentRequest,
        raise_for_status=False,
    )


async def upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the pooled session on start, close it (and its sockets) on shutdown."""
    session = new_upstream_session(app[SETTINGS_KEY])
    app[UPSTREAM_SESSION_KEY] = session
    yield
    await session.close()


async def send_upstream(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: object,  # bytes, a BytesIO or an async iterable of chunks (relay.UpstreamBody)
    retries: int,
) -> aiohttp.ClientResponse:
    """Send once, retrying only connection failures that happened before any byte left.

    A full pool is not retried: waiting again would only queue the call longer.
    """
    for attempt in range(retries + 1):
        try:
            return await session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except PoolWaitTimeout as exc:
            raise UpstreamPoolExhaustedError() from exc
        except aiohttp.ClientConnectorError as exc:
            if attempt == retries:
                raise UpstreamUnavailableError() from exc
            await asyncio.sleep(CONNECT_RETRY.delay_s(attempt))
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError() from exc
    raise AssertionError("unreachable")  # pragma: no cover
