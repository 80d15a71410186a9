"""Token invalidation across processes: a Redis pub/sub poke after every auth change.

The database stays the truth. After the management service commits a change that can
revoke or alter authentication (a token revoked or created, a project deactivated,
deleted, re-keyed or changed), it calls `publish()`, which sends a small message on
`CHANNEL`. Every process keeps one subscriber connection; a message from another
process pokes `TokenSync`, whose next incremental reload (coalesced: one in flight,
at most one queued) applies the change. The process that made the change has already
applied it to its own `TokenStore`, so it ignores its own messages.

Pub/sub is at-most-once: a process that is disconnected misses what was sent meanwhile.
So on every (re)subscribe the subscriber pokes a reload, which applies whatever changed
while it was away, and the periodic reload (TOKEN_REFRESH_INTERVAL) stays the safety
net for a message lost otherwise. Reconnection backs off; an outage is logged once when
it starts and once when it ends; requests never wait for any of this.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..backoff import RetryPolicy
from ..ids import process_name

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHANNEL: Final = "llm-proxy:token-invalidation"
# Reconnection delays: doubling from the first to the last, with jitter, so a fleet
# does not reconnect in lockstep, and short enough that the fast path resumes soon.
BACKOFF_FIRST_S: Final = 0.1
BACKOFF_MAX_S: Final = 2.0
# A subscriber that heard nothing for HEARTBEAT_S pings; one that heard nothing (not
# even its pong) for DEAD_AFTER_S treats the connection as dead and reconnects.
HEARTBEAT_S: Final = 5.0
DEAD_AFTER_S: Final = 3 * HEARTBEAT_S
# A management call waits at most this long for its PUBLISH, and after a failure
# stops trying for PUBLISH_RETRY_S (the reload interval covers what is not sent).
PUBLISH_TIMEOUT_S: Final = 0.5
PUBLISH_RETRY_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class InvalidationStats:
    """What the metrics show of the channel."""

    subscribed: bool
    received: int  # messages from other processes (each one a poke)
    published: int
    publish_failures: int
    reconnects: int


def _redis_down() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class TokenInvalidation:
    """One process's publisher and subscriber on the invalidation channel.

    `poke` is called (on the event loop, never awaited) for every message from another
    process and after every successful (re)subscription.
    """

    def __init__(
        self,
        redis_url: str,
        poke: Callable[[], None],
        *,
        channel: str = CHANNEL,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        heartbeat_s: float = HEARTBEAT_S,
        dead_after_s: float = DEAD_AFTER_S,
    ) -> None:
        self._url = redis_url
        self._poke = poke
        self.channel = channel
        self._backoff = RetryPolicy(base_s=backoff_first_s, max_s=backoff_max_s)
        self._heartbeat_s = heartbeat_s
        self._dead_after_s = dead_after_s
        # Who sent a message: unique per process, also across workers and hosts.
        self.origin = process_name()
        self._redis: Redis | None = None  # publishes
        self._subscriber: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._down_since: float | None = None  # loop time the outage began
        self._publish_retry_at = 0.0
        self._publish_down = False
        self.received = 0
        self.published = 0
        self.publish_failures = 0
        self.reconnects = 0

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the subscriber in the background; nothing here waits for Redis."""
        if self._task is not None:
            return
        from redis.asyncio import Redis  # redis only when configured
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # The subscriber gets no retries inside redis-py: a failure reaches this
        # module at once, which reconnects with its own backoff and catches up with
        # a reload. The publisher gets one quick reconnect, for a pooled connection
        # that Redis closed (a restart) while it was idle.
        self._redis = Redis.from_url(
            self._url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=PUBLISH_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )
        self._subscriber = Redis.from_url(
            self._url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=PUBLISH_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._task = asyncio.create_task(self._run(), name="token-invalidation")

    async def close(self) -> None:
        """Stop the subscriber and close the connections."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._subscribed.clear()
        for client in (self._redis, self._subscriber):
            if client is not None:
                await client.aclose()
        self._redis = self._subscriber = None

    @property
    def subscribed(self) -> bool:
        """Whether messages reach this process now."""
        return self._subscribed.is_set()

    async def wait_subscribed(self) -> None:
        """Until the subscriber listens (tests, and start-up checks)."""
        await self._subscribed.wait()

    def stats(self) -> InvalidationStats:
        return InvalidationStats(
            self.subscribed,
            self.received,
            self.published,
            self.publish_failures,
            self.reconnects,
        )

    async def ready_check(self) -> str:
        """For /ready: `degraded` while messages cannot reach this process."""
        if self.subscribed:
            return "ok"
        if self._down_since is None:
            return "degraded: token invalidation channel not subscribed yet"
        down_s = asyncio.get_running_loop().time() - self._down_since
        return (
            f"degraded: token invalidation channel (Redis pub/sub) down for"
            f" {down_s:.0f} s; changes from other processes apply within"
            " TOKEN_REFRESH_INTERVAL meanwhile"
        )

    # -- publishing ---------------------------------------------------------------

    async def publish(self, kind: str, object_id: str) -> None:
        """Tell the other processes that `kind` ("token"/"project") `object_id`
        changed in the database. Never raises; waits at most PUBLISH_TIMEOUT_S."""
        redis = self._redis
        loop = asyncio.get_running_loop()
        if redis is None:
            return
        if not self.subscribed and loop.time() < self._publish_retry_at:
            # Redis failed just now and the subscriber has not reconnected since:
            # do not make every management call wait for it. Whoever missed this
            # catches up when it resubscribes, or at its next periodic reload.
            return
        payload = json.dumps({"kind": kind, "id": object_id, "origin": self.origin})
        try:
            await asyncio.wait_for(
                redis.publish(self.channel, payload), PUBLISH_TIMEOUT_S
            )
        except _redis_down() as exc:
            self.publish_failures += 1
            self._publish_retry_at = loop.time() + PUBLISH_RETRY_S
            if not self._publish_down:
                self._publish_down = True
                log.warning(
                    "cannot publish token invalidations to Redis (%s); other"
                    " processes apply changes within TOKEN_REFRESH_INTERVAL",
                    _describe(exc),
                )
            return
        self.published += 1
        if self._publish_down:
            self._publish_down = False
            log.info("publishing token invalidations to Redis again")

    # -- subscribing --------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._listen()
            except _redis_down() as exc:
                self._went_down(exc)
            except Exception as exc:  # not Redis's fault: say so, but keep listening
                log.exception("token invalidation subscriber failed")
                self._went_down(exc)
            if self._subscribed.is_set():  # was up: start the backoff afresh
                self._subscribed.clear()
                attempt = 0
            await asyncio.sleep(self._backoff.delay_s(attempt))
            attempt += 1

    async def _listen(self) -> None:
        """Subscribe and handle messages until the connection fails (raises)."""
        assert self._subscriber is not None
        loop = asyncio.get_running_loop()
        pubsub = self._subscriber.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            heard = loop.time()
            while True:
                message = await pubsub.get_message(timeout=self._heartbeat_s)
                now = loop.time()
                if message is not None:
                    heard = now
                    self._handle(message)
                elif now - heard >= self._dead_after_s:
                    raise ConnectionError(
                        f"no answer from Redis for {self._dead_after_s:.0f} s"
                    )
                else:
                    await pubsub.ping()
        finally:
            await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._came_up()
            self._poke()  # apply what changed before (or while) not subscribed
        elif kind == "message" and _origin(message.get("data")) != self.origin:
            self.received += 1
            self._poke()

    def _came_up(self) -> None:
        self._subscribed.set()
        if self._down_since is not None:
            down_s = asyncio.get_running_loop().time() - self._down_since
            log.info(
                "token invalidation channel back after %.1f s; reloading tokens",
                down_s,
            )
            self._down_since = None
            self.reconnects += 1

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return  # logged when the outage began
        self._down_since = asyncio.get_running_loop().time()
        log.warning(
            "token invalidation channel (Redis pub/sub) down: %s; changes from other"
            " processes apply within TOKEN_REFRESH_INTERVAL until it is back",
            _describe(exc),
        )


def _origin(data: object) -> str | None:
    """The sender of a message; None when it cannot be read (still a poke)."""
    try:
        decoded = json.loads(data)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    origin = decoded.get("origin") if isinstance(decoded, dict) else None
    return origin if isinstance(origin, str) else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _quietly(closing: Any) -> None:
    """Close a connection that may already be broken."""
    try:
        await closing
    except Exception:  # a broken connection may fail to close; it is dropped anyway
        log.debug("closing the invalidation subscriber failed", exc_info=True)
