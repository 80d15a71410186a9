"""Reading admin form fields and query parameters; paging arithmetic. No HTTP answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..management.service import ServiceError

PAGE_SIZE: Final = 20
MAX_INT: Final = 2**31 - 1


def text(form: Mapping[str, Any], name: str) -> str:
    """A text field, '' when absent (file uploads are not text)."""
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def optional_int(form: Mapping[str, Any], name: str) -> int | None:
    """An integer field; None when left empty; ServiceError when not a number."""
    raw = text(form, name).strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(f"{name} must be a whole number.", param=name) from None
    if not 0 < value <= MAX_INT:
        raise ServiceError(f"{name} must be between 1 and {MAX_INT}.", param=name)
    return value


def required_int(form: Mapping[str, Any], name: str) -> int:
    """An integer field that must be filled in."""
    value = optional_int(form, name)
    if value is None:
        raise ServiceError(f"{name} is required.", param=name)
    return value


def page_number(query: Mapping[str, str]) -> int:
    """`?page=N` (1-based); anything invalid means the first page."""
    try:
        return max(1, int(query.get("page", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True, slots=True)
class Pager:
    """Where a listing page sits among all pages."""

    page: int
    total: int
    size: int = PAGE_SIZE

    @property
    def offset(self) -> int:
        """Rows to skip."""
        return (self.page - 1) * self.size

    @property
    def pages(self) -> int:
        """How many pages there are (at least one)."""
        return max(1, -(-self.total // self.size))

    @property
    def previous(self) -> int | None:
        """The previous page number, if any."""
        return self.page - 1 if self.page > 1 else None

    @property
    def next(self) -> int | None:
        """The next page number, if any."""
        return self.page + 1 if self.page < self.pages else None
