"""What the fake upstream received and how its streams ended, and the gate tests hold."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

MAX_RECORDED_BODY_BYTES: Final = 1 << 20
GATE_POLL_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake upstream received it (body kept up to a bound)."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    body_size: int
    body_sha256: str

    @property
    def body_truncated(self) -> bool:
        """Whether only the first part of the body was kept."""
        return len(self.body) < self.body_size

    def json(self) -> Any:
        """Decode the recorded body as JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class FakeFile:
    """A file uploaded to ``POST /v1/files``."""

    id: str
    filename: str
    purpose: str
    size: int
    content: bytes
    created_at: int

    def to_json(self) -> bytes:
        """Render the OpenAI file object."""
        obj = {
            "object": "file",
            "id": self.id,
            "purpose": self.purpose,
            "filename": self.filename,
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": None,
            "status": "processed",
            "status_details": None,
        }
        return json.dumps(obj, indent=2).encode()


class FakeUpstreamState:
    """What the fake received and how its streams ended, plus the gate tests control.

    ``streams_cancelled`` counts streams the client left before the end (noticed on a
    failed write, while stalled on the gate, or by handler cancellation);
    ``disconnects`` also counts clients that left during ``stall-headers``.
    """

    def __init__(
        self,
        *,
        chunk_delay_s: float = 0.0,
        record: bool = True,
        max_recorded_body_bytes: int = MAX_RECORDED_BODY_BYTES,
    ) -> None:
        self.chunk_delay_s = chunk_delay_s
        self.record = record
        self.max_recorded_body_bytes = max_recorded_body_bytes
        self.requests: list[RecordedRequest] = []
        self.requests_seen = 0
        self.files: dict[str, FakeFile] = {}
        self.stalled = 0
        self.streams_opened = 0
        self.streams_completed = 0
        self.streams_cancelled = 0
        self.streams_dropped = 0
        self.disconnects = 0
        self._gate: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None

    @property
    def gate(self) -> asyncio.Event:
        """The event stalled responses wait on; created on first use."""
        if self._gate is None:
            self._gate = asyncio.Event()
        return self._gate

    @property
    def open_streams(self) -> int:
        """Streams started and not yet ended."""
        ended = self.streams_completed + self.streams_cancelled + self.streams_dropped
        return self.streams_opened - ended

    def release(self) -> None:
        """Open the gate: every stalled response (and later ones) goes on."""
        self.gate.set()

    async def wait_for(
        self, predicate: Callable[[FakeUpstreamState], bool], timeout_s: float = 5.0
    ) -> None:
        """Wait until ``predicate(self)`` holds; raise ``TimeoutError`` after timeout."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    async def wait_gate(self, request: web.BaseRequest) -> None:
        """Wait for the gate; raise ``ConnectionResetError`` if the client leaves first."""
        gate = self.gate
        self._count("stalled", 1)
        try:
            # Polling the transport notices a client that left even when the server
            # runs without handler cancellation (aiohttp's default since 3.9).
            while not gate.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away while stalled")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GATE_POLL_S):
                        await gate.wait()
        finally:
            self._count("stalled", -1)

    def _record(self, recorded: RecordedRequest) -> None:
        if self.record:
            self.requests.append(recorded)
        self._count("requests_seen", 1)

    def _count(self, counter: str, delta: int) -> None:
        setattr(self, counter, getattr(self, counter) + delta)
        if self._changed is not None:
            self._changed.set()
            self._changed = None


FAKE_STATE_KEY: Final = web.AppKey("fake_upstream_state", FakeUpstreamState)


async def read_body(request: web.Request, limit: int) -> tuple[bytes, int, str]:
    """Read the whole body; keep all of it unless it is a multipart upload.

    Returns the kept bytes (at most ``limit`` for multipart), the total size and the
    SHA-256 of the whole body.
    """
    if not request.body_exists:
        return b"", 0, hashlib.sha256().hexdigest()
    keep_all = not request.content_type.startswith("multipart/")
    digest = hashlib.sha256()
    parts: list[bytes] = []
    kept = total = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        total += len(chunk)
        if keep_all or kept < limit:
            parts.append(chunk)
            kept += len(chunk)
    body = b"".join(parts)
    return (body if keep_all else body[:limit]), total, digest.hexdigest()
