"""The audit JSONL file (AUDIT_LOG_FILE): one record per line, as the bus carries it.

The lines are the records' JSON (`type` "audit", `event_id`, `timestamp`, `action`,
`actor`, `outcome`, `client_ip`, `request_id`, `project_id`, `token_id`, `reason`,
`metadata`); the file is written, rotated and fsynced like FILE_EVENT_LOG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..dispatchers.base import SendResult
from ..dispatchers.file import FileBackend
from ..events.audit import AuditRecorded
from ..events.model import encode_event


class AuditFileBackend:
    """Appends audit records to a JSONL file (0600), rotating past `max_bytes`."""

    name = "audit-file"

    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 5) -> None:
        self._file = FileBackend(path, max_bytes=max_bytes, backups=backups)

    @property
    def path(self) -> Path:
        """Where the records go."""
        return self._file.path

    async def start(self) -> None:
        """Create the folder of the file (mode 0700)."""
        await self._file.start()

    async def send(self, batch: Sequence[AuditRecorded]) -> SendResult[AuditRecorded]:
        await self._file.write(b"".join(encode_event(e) + b"\n" for e in batch))
        return SendResult[AuditRecorded]()

    async def close(self) -> None:
        """Nothing stays open between batches."""
