"""The file backend: one JSON event per line, size-based rotation, fsync per batch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..events.model import Event
from ..private_files import make_private_dirs, open_private_append
from .base import DeliveryError, SendResult
from .records import event_record


class FileBackend:
    """Appends JSONL to `path`; past `max_bytes` it rotates to `path.1` … `path.N`.

    `max_bytes=0` never rotates. Writes run in a worker thread; each batch is
    flushed and fsynced before the dispatcher acknowledges it. New files are 0600
    (rotated ones keep that mode), new folders 0700.
    """

    name = "file"

    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups

    async def start(self) -> None:
        """Create the folder of the log file (mode 0700)."""
        await asyncio.to_thread(make_private_dirs, self.path.parent)

    async def send(self, batch: Sequence[Event]) -> SendResult:
        data = b"".join(
            orjson.dumps(event_record(event), default=dict) + b"\n" for event in batch
        )
        await self.write(data)
        return SendResult()

    async def write(self, data: bytes) -> None:
        """`append` in a worker thread; a failed write is a `DeliveryError`."""
        try:
            await asyncio.to_thread(self.append, data)
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.path}: {exc}") from exc

    def append(self, data: bytes) -> None:
        """Append lines (rotating first if they would overflow); blocking."""
        if self.max_bytes and self._size() + len(data) > self.max_bytes:
            self._rotate()
        with open_private_append(self.path) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate(self) -> None:
        if self._size() == 0:
            return
        if self.backups == 0:
            self.path.unlink()
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    async def close(self) -> None:
        """Nothing stays open between batches."""
