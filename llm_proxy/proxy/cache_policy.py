"""The response cache's rules: Cache-Control both ways, which calls may be kept and for
how long, an entry's key, and the `Cache-Status` (RFC 9211) values the proxy sends.

Pure functions of strings and bytes. `cache.py` does the Redis I/O, `cache_stage.py`
applies these rules to a call; docs/caching.md explains them to users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

CACHE_STATUS: Final = "Cache-Status"
CACHE_NAME: Final = "llm-proxy"
KEY_PREFIX: Final = "llm-proxy:cache"
MODELS: Final = "/v1/models"
# POST endpoints whose answer is a function of the request alone: kept on opt-in.
# Calls that create something (files, batches, uploads, responses) never are.
POST_PATHS: Final = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/moderations"}
)
# Request headers that reach the upstream and can change the answer's bytes. The
# others do not take part in the key (OpenAI-Organization and OpenAI-Project never
# reach the upstream: the project's key decides the scope).
VARYING: Final = (
    "accept",
    "accept-encoding",
    "content-type",
    "content-encoding",
    "openai-beta",
)
MAX_SECONDS: Final = 2**31 - 1  # RFC 9111's cap on delta-seconds

BYPASS: Final = f"{CACHE_NAME}; fwd=bypass"
UNAVAILABLE: Final = f"{CACHE_NAME}; fwd=bypass; detail=redis-unavailable"
# Answers the upstream marks with any of these are not kept.
_NOT_KEPT: Final = frozenset({"no-store", "private", "no-cache"})


@dataclass(frozen=True, slots=True)
class Directives:
    """What a client's Cache-Control asks of the cache."""

    no_store: bool = False  # neither answer from the cache nor keep the answer
    no_cache: bool = False  # do not answer from the cache (a fresh answer is kept)
    max_age: int | None = None  # the oldest answer accepted, and the longest kept

    @property
    def may_read(self) -> bool:
        """Whether a stored answer may be given to this client."""
        return not (self.no_store or self.no_cache) and self.max_age != 0


NO_DIRECTIVES: Final = Directives()


def _seconds(argument: str) -> int | None:
    """A delta-seconds value (quotes tolerated), capped; None when it is not one."""
    text = argument.strip().strip('"')
    if not text.isascii() or not text.isdigit():
        return None
    return min(int(text), MAX_SECONDS)


def _directives(value: str) -> list[tuple[str, str]]:
    """The (lower-case name, argument) pairs of a Cache-Control value."""
    pairs = []
    for part in value.split(","):
        name, _, argument = part.partition("=")
        pairs.append((name.strip().lower(), argument))
    return pairs


def parse_cache_control(value: str | None) -> Directives:
    """A request's Cache-Control; an invalid max-age accepts no stored answer."""
    if not value:
        return NO_DIRECTIVES
    no_store = no_cache = False
    max_age: int | None = None
    for name, argument in _directives(value):
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
        elif name == "max-age":
            seconds = _seconds(argument)
            if seconds is None:
                no_cache = True
            else:
                max_age = seconds
    return Directives(no_store, no_cache, max_age)


def is_models_path(path: str) -> bool:
    """`/v1/models` or `/v1/models/{model}`."""
    if path == MODELS:
        return True
    name = path[len(MODELS) + 1 :]
    return path.startswith(MODELS + "/") and bool(name) and "/" not in name


def call_ttl(
    method: str,
    path: str,
    directives: Directives,
    project_ttl: int | None,
    ttl_max: int,
) -> int | None:
    """How long this call's answer may be kept; None: the cache stays out of it.

    GET of the models is always cacheable; a POST to `POST_PATHS` only when the
    client sent a max-age or the project set `cache_ttl_seconds`. A project's 0 turns
    the cache off for it. The time is the smallest of the client's max-age, the
    project's setting and RESPONSE_CACHE_TTL_MAX.
    """
    if project_ttl == 0:
        return None
    if method == "GET":
        if not is_models_path(path):
            return None
    elif method != "POST" or path not in POST_PATHS:
        return None
    elif directives.max_age is None and project_ttl is None:
        return None
    ttl = ttl_max if project_ttl is None else min(project_ttl, ttl_max)
    return ttl if directives.max_age is None else min(ttl, directives.max_age)


def answer_ttl(cache_control: str | None, ttl: int) -> int:
    """How long an answer with this (upstream) Cache-Control may be kept, at most
    `ttl`; 0 when it says no-store, private or no-cache, or gives a bad max-age."""
    if not cache_control:
        return ttl
    shared: int | None = None
    own: int | None = None
    for name, argument in _directives(cache_control):
        if name in _NOT_KEPT:
            return 0
        if name in ("max-age", "s-maxage"):
            seconds = _seconds(argument)
            if seconds is None:
                return 0
            if name == "s-maxage":
                shared = seconds
            else:
                own = seconds
    limit = shared if shared is not None else own
    return ttl if limit is None else min(ttl, limit)


def entry_digest(
    *,
    generation: str,
    method: str,
    path: str,
    query: str,
    varying: Sequence[str],
    body: bytes,
) -> str:
    """SHA-256 over every part of a call that can change its answer, each part
    framed by its length so no two different calls share a digest."""
    digest = hashlib.sha256()
    for part in (generation, method, path, query, *varying):
        data = part.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    digest.update(b"%d:" % len(body))
    digest.update(body)
    return digest.hexdigest()


def entry_key(project_id: str, digest: str) -> str:
    """The Redis key of an entry: the project in the clear (to find its entries),
    everything else only as the digest."""
    return f"{KEY_PREFIX}:{project_id}:{digest}"


def forwarded(reason: str, stored: bool) -> str:
    """Cache-Status of a call sent upstream: `fwd=uri-miss|stale|request`, and
    `stored` when the answer is known to be kept before its body is sent."""
    status = f"{CACHE_NAME}; fwd={reason}"
    return f"{status}; stored" if stored else status


def hit(ttl_left: int) -> str:
    """Cache-Status of an answer from the cache, with its remaining freshness."""
    return f"{CACHE_NAME}; hit; ttl={ttl_left}"
