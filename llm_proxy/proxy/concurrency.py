"""Calls in flight per token and per project: O(1) synchronous counters, no queue.

Knows nothing of requests or HTTP; the /v1 chain's `ConcurrencyStage` (middlewares.py)
calls `try_enter` before a call goes upstream and `leave` when it ends, whatever the
outcome. A key is kept only while it has calls in flight, so memory is bounded by them.
"""

from __future__ import annotations

from typing import Literal

Scope = Literal["token", "project"]


class InFlight:
    """In-flight counts per token id and per project id; no entry at zero."""

    __slots__ = ("_projects", "_tokens")

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._projects: dict[str, int] = {}

    def __len__(self) -> int:
        """How many tokens and projects have calls in flight."""
        return len(self._tokens) + len(self._projects)

    def try_enter(
        self, token_id: str, token_cap: int, project_id: str, project_cap: int
    ) -> Scope | None:
        """Count one more call, or name the cap that refuses it (and count nothing)."""
        tokens = self._tokens.get(token_id, 0)
        if tokens >= token_cap:
            return "token"
        projects = self._projects.get(project_id, 0)
        if projects >= project_cap:
            return "project"
        self._tokens[token_id] = tokens + 1
        self._projects[project_id] = projects + 1
        return None

    def leave(self, token_id: str, project_id: str) -> None:
        """One call admitted by `try_enter` has ended."""
        _decrement(self._tokens, token_id)
        _decrement(self._projects, project_id)

    def token_count(self, token_id: str) -> int:
        """Calls of this token in flight."""
        return self._tokens.get(token_id, 0)

    def project_count(self, project_id: str) -> int:
        """Calls of this project's tokens in flight."""
        return self._projects.get(project_id, 0)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
