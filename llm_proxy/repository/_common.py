"""Value conversions both SQL backends share: LIKE patterns, metadata JSON, paging."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def like_pattern(search: str | None) -> str | None:
    """A LIKE pattern (escape character backslash) matching `search` as a substring."""
    if search is None:
        return None
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def dump_metadata(metadata: Mapping[str, Any]) -> str:
    """Project metadata as compact JSON text."""
    return json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False)


def load_metadata(text: str) -> dict[str, Any]:
    """Project metadata from its stored JSON text."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored project metadata is not a JSON object")
    return value


def check_page(limit: int, offset: int) -> None:
    """Reject negative paging values, which the two databases treat differently."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0 (got {limit}, {offset})")
