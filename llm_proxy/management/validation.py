"""Strict JSON-body and query validation for the management API (no extra dependency).

A schema is a mapping of field name to `Field`; unknown fields, wrong types and missing
required fields raise `ServiceError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..errors import ApiError
from .service import ServiceError

MAX_MANAGEMENT_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Field:
    """One accepted field: its JSON type, whether required, whether null is allowed."""

    kind: type | tuple[type, ...]
    required: bool = False
    nullable: bool = False


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, with 413/400 for oversized or malformed input."""
    if request.content_length is not None and (
        request.content_length > MAX_MANAGEMENT_BODY_BYTES
    ):
        raise _too_large()
    body = await request.content.read(MAX_MANAGEMENT_BODY_BYTES + 1)
    if len(body) > MAX_MANAGEMENT_BODY_BYTES:
        raise _too_large()
    if not body.strip():
        raise ServiceError("The request body must be a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ServiceError("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ServiceError("The request body must be a JSON object.")
    return data


def check_fields(data: Mapping[str, Any], schema: Mapping[str, Field]) -> None:
    """Refuse unknown fields, missing required ones and values of the wrong type."""
    for name in data:
        if name not in schema:
            raise ServiceError(f"Unknown field {name!r}.", param=name)
    for name, spec in schema.items():
        if name not in data:
            if spec.required:
                raise ServiceError(f"Missing required field {name!r}.", param=name)
            continue
        _check_type(name, data[name], spec)


def query_text(request: web.Request, name: str) -> str | None:
    """A text query parameter (None when absent or empty), 400 when it holds NUL."""
    raw = request.query.get(name)
    if not raw:
        return None
    if "\x00" in raw:
        raise ServiceError(
            f"Query parameter {name!r} must not contain NUL.", param=name
        )
    return raw


def _check_type(name: str, value: Any, spec: Field) -> None:
    if value is None:
        if spec.nullable:
            return
        raise ServiceError(f"Field {name!r} must not be null.", param=name)
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    is_bool = isinstance(value, bool)
    if any(isinstance(value, kind) and (kind is bool or not is_bool) for kind in kinds):
        return
    expected = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
    raise ServiceError(f"Field {name!r} must be {expected}.", param=name)


def query_int(
    request: web.Request, name: str, default: int, *, low: int, high: int
) -> int:
    """An integer query parameter within [low, high], or a 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(
            f"Query parameter {name!r} must be an integer.", param=name
        ) from None
    if not low <= value <= high:
        raise ServiceError(
            f"Query parameter {name!r} must be between {low} and {high}.", param=name
        )
    return value


def query_bool(request: web.Request, name: str) -> bool | None:
    """A true/false query parameter, None when absent, 400 when neither."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    raise ServiceError(f"Query parameter {name!r} must be true or false.", param=name)


def _too_large() -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than {MAX_MANAGEMENT_BODY_BYTES} bytes.",
        code="request_too_large",
    )
