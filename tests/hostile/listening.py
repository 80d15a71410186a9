"""The app on a real port behind `listener.py`'s protections, started as `serve()` does."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from llm_proxy.config import ListenerSettings
from llm_proxy.listener import ListenerRunner, ListenerServer


class ListenerTestServer(TestServer):
    """`TestServer` whose runner is `ListenerRunner` (pass to `aiohttp_client`)."""

    def __init__(
        self, app: web.Application, listener: ListenerSettings, **runner_kwargs: Any
    ) -> None:
        super().__init__(app)
        self.listener = listener
        self.runner_kwargs = runner_kwargs

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ListenerRunner(
            self.app, self.listener, **{**kwargs, **self.runner_kwargs}
        )

    @property
    def listener_server(self) -> ListenerServer:
        """The low-level server: its connections and counters."""
        assert self.runner is not None
        server = self.runner.server
        assert isinstance(server, ListenerServer)
        return server
