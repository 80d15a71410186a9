"""The origins that any active project allows, for preflights, which carry no token.

The token table keeps it as projects are put, changed and removed (one project's list
at a time, counted per origin), so a preflight costs one lookup, never a walk over the
projects. Knows no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..origins import entry_key, matches


class OriginIndex:
    """Every origin listed by an active project, with how many projects list it."""

    __slots__ = ("_by_project", "_exact", "_wildcards")

    def __init__(self) -> None:
        self._by_project: dict[str, tuple[str, ...]] = {}
        self._exact: dict[str, int] = {}
        self._wildcards: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcards)

    def set(self, project_id: str, entries: tuple[str, ...]) -> None:
        """A project's listed origins now (empty when it lists none or is inactive)."""
        known = self._by_project.get(project_id, ())
        if known == entries:
            return
        self._count(known, -1)
        self._count(entries, 1)
        if entries:
            self._by_project[project_id] = entries
        else:
            del self._by_project[project_id]

    def discard(self, project_id: str) -> None:
        """Forget a deleted project's origins."""
        self.set(project_id, ())

    def allows(self, origin: str) -> bool:
        """Whether some active project lists `origin` (exactly or by a wildcard)."""
        return matches(origin, self._exact, self._wildcards)

    def _count(self, entries: Iterable[str], step: int) -> None:
        for entry in entries:
            wildcard, key = entry_key(entry)
            counts = self._wildcards if wildcard else self._exact
            left = counts.get(key, 0) + step
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)
