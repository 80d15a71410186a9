"""The response cache on the /v1 path: the stage that plans a call's use of it, the
lookup before the upstream, and the answer kept after it (docs/caching.md).

`ResponseCacheStage.enter` decides from the method, the path, the client's
Cache-Control and the token's project whether the cache takes part; if it does, the
call gets a `CachePlan`, which the relay calls twice: `lookup` once the body is read
(one Redis GET; a hit is answered at once) and `answered` once the upstream's headers
are in (may the answer be kept; the Cache-Status that says so). `leave` hands a
complete 200 JSON answer to the cache's writer: no await, the client has it already.
"""

from __future__ import annotations

import time
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from ..auth.tokens import Principal
from ..keys import PRINCIPAL_KEY
from .cache import CacheUnavailable, Entry, ResponseCache
from .cache_policy import (
    BYPASS,
    CACHE_NAME,
    CACHE_STATUS,
    UNAVAILABLE,
    VARYING,
    Directives,
    answer_ttl,
    call_ttl,
    entry_digest,
    entry_key,
    forwarded,
    hit,
    parse_cache_control,
)
from .exchange import Exchange
from .headers import downstream_headers, media_type

REQUESTED_FRESH: Final = f"{CACHE_NAME}; fwd=request"
# Ours per call, never kept with an answer.
_PER_CALL: Final = ("X-Request-ID", hdrs.CONTENT_LENGTH, hdrs.AGE)


def _note(exchange: Exchange, outcome: str, status: str) -> None:
    """The call's cache outcome (for its event) and its Cache-Status header."""
    exchange.cache = outcome
    _send_status(exchange, status)


def _send_status(exchange: Exchange, status: str) -> None:
    """Cache-Status goes out with the call's other own headers (the relay adds them)."""
    exchange.rate_headers = {**exchange.rate_headers, CACHE_STATUS: status}


class ResponseCacheStage:
    """Plans each call's use of the cache; keeps the answers that may be kept."""

    __slots__ = ("cache",)

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        principal = request[PRINCIPAL_KEY]
        given = request.headers.getall(hdrs.CACHE_CONTROL, ())
        directives = parse_cache_control(",".join(given))
        ttl = call_ttl(
            request.method,
            exchange.path,
            directives,
            principal.project_cache_ttl_s,
            self.cache.ttl_max_s,
        )
        if ttl is None:
            self.cache.stats.bypasses += 1
            _note(exchange, "bypass", BYPASS)
            return
        store_ttl = 0 if directives.no_store else ttl
        if store_ttl <= 0 and not directives.may_read:
            self.cache.stats.bypasses += 1
            _note(exchange, "bypass", REQUESTED_FRESH)
            return
        exchange.cache_plan = CachePlan(self.cache, principal, directives, store_ttl)

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """A complete 200 JSON answer that may be kept goes to the writer."""
        plan = exchange.cache_plan
        if plan is not None and error is None:
            plan.keep(exchange)


class CachePlan:
    """One call's use of the cache, from its lookup to the answer kept."""

    __slots__ = (
        "cache",
        "directives",
        "headers",
        "key",
        "principal",
        "reason",
        "store_ttl",
    )

    def __init__(
        self,
        cache: ResponseCache,
        principal: Principal,
        directives: Directives,
        store_ttl: int,
    ) -> None:
        self.cache = cache
        self.principal = principal
        self.directives = directives
        self.store_ttl = store_ttl
        self.key = ""
        # Why the call goes upstream (its Cache-Status `fwd`); None: the plan is over.
        self.reason: str | None = None
        self.headers: tuple[tuple[str, str], ...] = ()

    async def lookup(
        self, request: web.Request, exchange: Exchange, body: object
    ) -> web.Response | None:
        """The answer from the cache, or None: the call goes upstream.

        Only a call whose whole body was read (up to 1 MiB of JSON) and that asks
        for no stream takes part; its key is computed here from the exact bytes.
        """
        if exchange.stream or not (body is None or isinstance(body, bytes)):
            self._done(exchange, "bypass", BYPASS)
            return None
        digest = self._digest(request, exchange, body)
        self.key = entry_key(self.principal.project_id, digest)
        if not self.directives.may_read:
            self.cache.stats.bypasses += 1
            exchange.cache = "bypass"
            self.reason = "request"
            return None
        try:
            entry = await self.cache.get(self.key)
        except CacheUnavailable:
            self._done(exchange, "bypass", UNAVAILABLE)
            return None
        age = self.cache.wall_clock() - entry.stored_at if entry else 0.0
        max_age = self.directives.max_age
        if entry is not None and (max_age is None or age <= max_age):
            return self._replay(entry, age, exchange)
        self.cache.stats.misses += 1
        exchange.cache = "miss"
        self.reason = "uri-miss" if entry is None else "stale"
        return None

    def _digest(
        self, request: web.Request, exchange: Exchange, body: bytes | None
    ) -> str:
        headers = request.headers
        return entry_digest(
            generation=self.principal.project_generation,
            method=request.method,
            path=exchange.path,
            query=request.raw_path.partition("?")[2],
            varying=[",".join(headers.getall(name, ())) for name in VARYING],
            body=body or b"",
        )

    def _done(self, exchange: Exchange, outcome: str, status: str) -> None:
        self.cache.stats.bypasses += 1
        self.reason = None
        _note(exchange, outcome, status)

    def _replay(self, entry: Entry, age: float, exchange: Exchange) -> web.Response:
        """The stored answer, with this call's own headers."""
        self.reason = None
        self.cache.stats.hits += 1
        headers = CIMultiDict(entry.headers)
        headers.update(exchange.rate_headers)
        headers[CACHE_STATUS] = hit(max(round(entry.ttl_s - age), 0))
        headers[hdrs.AGE] = str(max(int(age), 0))
        headers["X-Request-ID"] = exchange.request_id
        exchange.cache = "hit"
        exchange.status = entry.status
        exchange.response_kind = "json"
        exchange.content_encoding = headers.get(hdrs.CONTENT_ENCODING)
        exchange.bytes_out = len(entry.body)
        exchange.ttfb_s = time.perf_counter() - exchange.started
        return web.Response(status=entry.status, body=entry.body, headers=headers)

    def answered(self, upstream: aiohttp.ClientResponse, exchange: Exchange) -> None:
        """Upstream's status and headers are in: may the answer be kept? The call's
        Cache-Status says so (`stored` only when its length is known to fit)."""
        reason = self.reason
        if reason is None:
            return
        ttl = 0
        if (
            upstream.status == 200
            and media_type(upstream.headers.get(hdrs.CONTENT_TYPE))
            == "application/json"
        ):
            ttl = answer_ttl(upstream.headers.get(hdrs.CACHE_CONTROL), self.store_ttl)
        length = upstream.content_length
        if ttl and length is not None and length > self.cache.max_bytes:
            self.cache.stats.too_large += 1
            ttl = 0
        self.store_ttl = ttl
        if ttl:
            self.headers = _kept_headers(upstream.headers, exchange)
        _send_status(exchange, forwarded(reason, ttl > 0 and length is not None))

    def keep(self, exchange: Exchange) -> None:
        """Hand the answer to the writer if it came whole, fits, and may be kept."""
        if self.reason is None or self.store_ttl <= 0:
            return
        capture = exchange.capture
        if exchange.status != 200 or exchange.error is not None or capture is None:
            return
        if not capture.complete or capture.total > self.cache.max_bytes:
            self.cache.stats.too_large += 1
            return
        entry = Entry(
            200,
            self.headers,
            capture.head_bytes(),
            self.cache.wall_clock(),
            self.store_ttl,
        )
        self.cache.put(self.key, entry)


def _kept_headers(
    upstream: CIMultiDictProxy[str], exchange: Exchange
) -> tuple[tuple[str, str], ...]:
    """The headers this answer is sent with, less those that are ours per call."""
    sent = downstream_headers(upstream, exchange, False)
    for name in (*exchange.rate_headers, *_PER_CALL):
        sent.popall(name, None)
    return tuple(sent.items())
