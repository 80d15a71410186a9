"""The Redis bus's local spool: a JSONL file of events that wait for Redis."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..private_files import open_private_append

log = logging.getLogger(__name__)


class Spool:
    """Append-only JSONL file of encoded events waiting for Redis.

    Methods are blocking and run in a worker thread; only the writer task calls
    them, so they need no lock. `offset` is how far the file has been replayed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def count(self) -> int:
        """Count complete lines, first ending a line a crash may have cut short."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("ab") as f:
                f.write(b"\n")
        return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append one line per payload and fsync, so a crash keeps them."""
        with open_private_append(self.path) as f:  # 0600: it holds whole events
            f.write(b"".join(p + b"\n" for p in payloads))
            f.flush()
            os.fsync(f.fileno())

    def read(self, max_lines: int) -> tuple[list[bytes], int, int]:
        """Return (valid payloads, lines consumed, new offset) from `offset` on."""
        payloads: list[bytes] = []
        consumed = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            end = self.offset
            while consumed < max_lines:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                consumed += 1
                end += len(line)
                if is_json_object(line):
                    payloads.append(line.rstrip(b"\n"))
                else:
                    log.warning("skipping a corrupt line in spool %s", self.path)
        return payloads, consumed, end

    def truncate(self) -> None:
        """Remove the spool once everything in it reached Redis."""
        self.path.unlink(missing_ok=True)
        self.offset = 0


def is_json_object(line: bytes) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False
