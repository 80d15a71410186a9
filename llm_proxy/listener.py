"""Client connections: a header deadline, a header-size cap, a connection cap, shutdown.

aiohttp has no deadline for a request's header, bounds the header block only at about
1 MB, accepts connections until accept() fails, and takes two grace periods to cut a
stream at shutdown. These subclasses of its `RequestHandler` and `Server` add what is
missing; `ListenerRunner` serves an app with them, for `serve()` and for tests alike.
They use aiohttp 3.14 internals (`_ErrInfo`, the handler's `_waiter` and timers), so
tests/hostile/test_slowloris.py asserts the effective limits on a live connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import resource
from dataclasses import replace
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from .config import ConfigError, ListenerSettings, Settings
from .errors import error_body
from .keys import EXCHANGE_KEY

log = logging.getLogger(__name__)

# Idle time allowed between two requests on one connection (nginx's keepalive_timeout,
# and what `web.run_app` used); a bare aiohttp runner would wait 3630 s.
KEEPALIVE_TIMEOUT_S: Final = 75.0
# Descriptors kept for all but client and upstream connections: listening sockets, log
# and event files, SQLite and its journal, the database and Redis pools' extras,
# dispatcher pools, stdio and the event loop's own.
RESERVED_FDS: Final = 128
# Counted as the limit when RLIMIT_NOFILE says unlimited (Linux caps it at nr_open).
UNLIMITED_FILES: Final = 1 << 20
# How long a handler cut at shutdown may take to run its `finally` blocks (its event).
CUT_WAIT_S: Final = 1.0
SHUTDOWN_ERROR: Final = "shutdown"
HANDLER_KWARGS: Final = frozenset(
    inspect.signature(RequestHandler.__init__).parameters
) - {"self", "manager", "loop"}


def _raw_error(
    status: str,
    message: str,
    code: str,
    extra: str = "",
    error_type: str = "invalid_request_error",
) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body = error_body(message, type=error_type, code=code)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


HEADER_TIMEOUT_RESPONSE: Final = _raw_error(
    "408 Request Timeout",
    "The request header did not arrive in time.",
    "request_header_timeout",
)
OVER_CAPACITY_RESPONSE: Final = _raw_error(
    "503 Service Unavailable",
    "The proxy serves as many connections as it can; try again shortly.",
    "too_many_connections",
    "Retry-After: 1\r\n",
    "api_error",
)


def header_too_large(limit: int) -> web.Response:
    """431 in OpenAI's shape, closing the connection."""
    message = f"The request header block is larger than {limit} bytes."
    response = web.Response(
        status=431,
        body=error_body(message, code="request_header_too_large"),
        content_type="application/json",
        headers={"Connection": "close"},  # aiohttp omits it on its HTTP/1.0 errors
    )
    response.force_close()
    return response


# -- the connection cap ---------------------------------------------------------------


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def fd_budget(settings: Settings, open_files: int) -> int:
    """Descriptors left for client connections under `open_files`."""
    pooled = settings.upstream.max_connections + settings.db_pool_max_size
    return open_files - pooled - RESERVED_FDS


def resolve_listener(settings: Settings, open_files: int) -> ListenerSettings:
    """The listener settings with the connection cap decided (`auto` → the fd budget).

    An explicit MAX_CLIENT_CONNECTIONS above the budget is kept (the pools may never
    fill) but logged; `auto` with no room left fails, naming what to change.
    """
    listener = settings.listener
    budget = fd_budget(settings, open_files)
    if listener.max_connections is None:
        if budget < 1:
            raise ConfigError(
                f"MAX_CLIENT_CONNECTIONS=auto leaves no client connections: the "
                f"file-descriptor limit {open_files} is used up by "
                f"UPSTREAM_MAX_CONNECTIONS={settings.upstream.max_connections}, "
                f"DATABASE_POOL_SIZE={settings.db_pool_max_size} and {RESERVED_FDS} "
                "reserved; raise the limit (ulimit -n) or lower those"
            )
        return replace(listener, max_connections=budget)
    if listener.max_connections > budget:
        log.warning(
            "MAX_CLIENT_CONNECTIONS=%d exceeds the %d descriptors left by the "
            "file-descriptor limit %d; accept() may fail before the cap is reached",
            listener.max_connections,
            max(budget, 0),
            open_files,
        )
    return listener


class _Refusal(asyncio.Protocol):
    """A connection over the cap: a 503, then closed; it never reaches aiohttp."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        stream.write(OVER_CAPACITY_RESPONSE)
        stream.close()


class ListenerServer(web.Server):
    """aiohttp's low-level server with a connection cap and guarded handlers."""

    def __init__(
        self,
        handler: Any,
        *,
        listener: ListenerSettings,
        **kwargs: Any,
    ) -> None:
        if listener.max_connections is None:
            raise ValueError("resolve_listener() decides the connection cap first")
        # aiohttp's own Server silently drops every handler kwarg when one is unknown.
        unknown = set(kwargs) - HANDLER_KWARGS - {"request_factory", "loop"}
        unknown.discard("handler_cancellation")
        if unknown:
            raise TypeError(f"unknown request handler settings: {sorted(unknown)}")
        super().__init__(handler, **kwargs)
        self.listener = listener
        self.max_connections: int = listener.max_connections
        self.open_connections = 0
        self.refused_connections = 0

    def __call__(self) -> RequestHandler:
        """The protocol for one accepted connection (a refusal when over the cap)."""
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            # asyncio only needs a Protocol; aiohttp never sees the refused connection.
            return _Refusal()  # type: ignore[return-value]
        handler = GuardedRequestHandler(
            self, self.listener, loop=self._loop, **self._kwargs
        )
        # Counted from here to the handler's connection_lost. Plain TCP always calls
        # both; a TLS site would need the count moved to connection_made.
        self.open_connections += 1
        return handler

    def connection_closed(self) -> None:
        """A guarded connection ended: its place under the cap is free."""
        self.open_connections -= 1


class ListenerRunner(web.AppRunner):
    """`web.AppRunner` whose server applies the listener limits."""

    __slots__ = ("_listener",)

    def __init__(
        self, app: web.Application, listener: ListenerSettings, **kwargs: Any
    ) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        super().__init__(app, **kwargs)
        self._listener = listener

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup
        return ListenerServer(
            plain.request_handler,
            listener=self._listener,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )


# -- one connection ------------------------------------------------------------------


def _head_size(message: Any) -> int:
    """Bytes of a parsed request head: request line and header lines."""
    size = len(message.method) + len(message.path) + 12
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with a header deadline and a header-size cap.

    The deadline runs from the connection's start, then from the first byte of each
    later request; bytes trickling in do not extend it. It is lifted once the head is
    parsed. A head still incomplete at the deadline gets 408 (a connection that sent
    nothing is just closed); one over `max_header_bytes` gets 431.
    """

    __slots__ = (
        "_listener_server",
        "_header_timeout_s",
        "_max_header_bytes",
        "_head_deadline",
        "_head_handle",
        "_head_bytes",
        "_last_payload",
        "_rejected",
        "_counted",
    )

    def __init__(
        self, manager: ListenerServer, listener: ListenerSettings, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._listener_server = manager
        self._header_timeout_s = listener.header_timeout_s
        self._max_header_bytes = listener.max_header_bytes
        self._head_deadline = 0.0  # 0: no head being waited for
        self._head_handle: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._last_payload: StreamReader = EMPTY_PAYLOAD
        self._rejected = False
        self._counted = True

    @property
    def header_timeout_s(self) -> float:
        """Seconds a request's head may take to arrive."""
        return self._header_timeout_s

    @property
    def max_header_bytes(self) -> int:
        """Largest request head accepted."""
        return self._max_header_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The header deadline covers a new connection; the keep-alive timer starts
        # only after a response, so a slow first head is cut with a 408, not silently.
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_handle is not None:
            self._head_handle.cancel()
            self._head_handle = None
        if self._counted:
            self._counted = False
            self._listener_server.connection_closed()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected or self._force_close or self._close:
            return
        in_head = self._last_payload.is_eof()
        if in_head:
            if data and self._head_deadline == 0.0:
                self._start_next_head()
            self._head_bytes += len(data)
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._heads_parsed(self._request_count - parsed)
        elif in_head and self._head_bytes > self._max_header_bytes:
            self._reject_head(len(self._messages))

    def _start_next_head(self) -> None:
        """The first byte of a request on a kept-alive connection: its deadline runs."""
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._loop.time() + self._header_timeout_s
        if self._head_handle is None:
            self._head_handle = self._loop.call_at(
                self._head_deadline, self._on_head_timer
            )

    def _heads_parsed(self, count: int) -> None:
        """`count` messages were queued: check their size (only when it may be over)."""
        if self._head_bytes > self._max_header_bytes:
            first = len(self._messages) - count
            for index in range(first, len(self._messages)):
                message = self._messages[index][0]
                if isinstance(message, _ErrInfo):
                    continue
                if _head_size(message) > self._max_header_bytes:
                    self._reject_head(index)
                    return
        self._last_payload = self._messages[-1][1]
        # Lifted: the next head's deadline starts with its first byte. A partial head
        # that came in the same read as this one's end is not seen here (the parser
        # keeps it); it is bounded by the keep-alive timer, or by the deadline once
        # one more byte arrives.
        self._head_deadline = 0.0
        self._head_bytes = 0

    def _reject_head(self, index: int) -> None:
        """Answer 431 in place of message `index` and what follows; read no more."""
        while len(self._messages) > index:
            self._messages.pop()
        exc = BadHttpMessage("request header block too large")
        self._messages.append((_ErrInfo(431, exc, exc.message), EMPTY_PAYLOAD))
        self._rejected = True
        self._head_deadline = 0.0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_head_timer(self) -> None:
        self._head_handle = None
        deadline = self._head_deadline
        if deadline == 0.0 or self._force_close or self.transport is None:
            return
        now = self._loop.time()
        if now < deadline:  # the deadline moved on since this timer was set
            self._head_handle = self._loop.call_at(deadline, self._on_head_timer)
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            # A pipelined head behind a request still being answered: its own wait
            # starts when that answer is done.
            self._arm_head_deadline()
            return
        if self._head_bytes:
            self.transport.write(HEADER_TIMEOUT_RESPONSE)
        log.debug("request header not complete after %ss", self._header_timeout_s)
        self.force_close()

    def _make_error_handler(self, err_info: _ErrInfo) -> Any:
        if err_info.status != 431:
            return super()._make_error_handler(err_info)
        limit = self._max_header_bytes

        async def header_too_large_handler(_: BaseRequest) -> web.StreamResponse:
            return header_too_large(limit)

        return header_too_large_handler

    # -- shutdown ------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """Let the request in flight finish within `timeout`, then cut it.

        aiohttp waits `timeout` twice (once for the handler, once more after asking
        it to stop, which a stream relay never notices). Here the handler is
        cancelled when the first wait ends, its call labelled `shutdown`, and it gets
        `CUT_WAIT_S` to run its `finally` blocks.
        """
        self._force_close = True
        for handle in (self._keepalive_handle, self._head_handle):
            if handle is not None:
                handle.cancel()
        self._keepalive_handle = self._head_handle = None
        if self._request_in_progress:
            self._handler_waiter = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._handler_waiter
            self._handler_waiter = None
        if self._request_in_progress and self._current_request is not None:
            _label_shutdown(self._current_request)
        task = self._task_handler
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CUT_WAIT_S)
        self.force_close()


def _label_shutdown(request: BaseRequest) -> None:
    """Mark the call being cut so its event says `shutdown`, not a client hang-up."""
    exchange = request.get(EXCHANGE_KEY)
    if exchange is not None and exchange.error is None:
        exchange.error = SHUTDOWN_ERROR
