"""The rules of a token's policy and of a project's defaults, and how the API shows them.

A policy arrives as the fields a client sent (`bind`, `allowed_models`,
`max_output_tokens_cap`, `allow_streaming`; a project has no `bind`) from the REST
API, the admin pages or the CLI, and leaves as a `TokenPolicy`, or None when it
narrows nothing. Every bound value must be safe as a header value, since the proxy
compares it with one. A field that breaks a rule raises `PolicyError` naming it (the
service answers it as its own `ServiceError`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from ..domain_errors import DomainError
from ..storage import TokenPolicy

TOKEN_POLICY_FIELDS: Final = (
    "bind",
    "allowed_models",
    "max_output_tokens_cap",
    "allow_streaming",
)
PROJECT_POLICY_FIELDS: Final = TOKEN_POLICY_FIELDS[1:]
MAX_BIND_KEYS: Final = 8
MAX_BIND_VALUE_CHARS: Final = 256
MAX_MODEL_GLOBS: Final = 64
MAX_GLOB_CHARS: Final = 128
MAX_OUTPUT_TOKENS_CAP: Final = 10_000_000
BIND_KEY: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Printable ASCII, neither starting nor ending with a space (HTTP trims those).
HEADER_SAFE: Final = re.compile(r"[!-~](?:[ -~]*[!-~])?")
GLOB: Final = re.compile(r"[!-~]+")


class PolicyError(DomainError):
    """A policy field breaks a rule; `param` names it."""


def policy_fields(data: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The policy fields `data` holds (a field sent as null is kept: it clears)."""
    return {name: data[name] for name in names if name in data}


def changed_policy(
    current: TokenPolicy | None, fields: Mapping[str, Any], *, bind: bool
) -> TokenPolicy | None:
    """`current` (None for a new token or project) with the given fields replaced,
    checked; a field sent as null goes back to no limit. None: nothing is narrowed."""
    allowed = TOKEN_POLICY_FIELDS if bind else PROJECT_POLICY_FIELDS
    for name in fields:
        if name not in allowed:
            raise PolicyError(f"Unknown field {name!r}.", param=name)
    base = current or TokenPolicy()
    policy = TokenPolicy(
        bind=_bind(fields["bind"]) if "bind" in fields else base.bind,
        allowed_models=_models(fields["allowed_models"])
        if "allowed_models" in fields
        else base.allowed_models,
        max_output_tokens_cap=_cap(fields["max_output_tokens_cap"])
        if "max_output_tokens_cap" in fields
        else base.max_output_tokens_cap,
        allow_streaming=_streaming(fields["allow_streaming"])
        if "allow_streaming" in fields
        else base.allow_streaming,
    )
    return None if policy == TokenPolicy() else policy


def policy_json(policy: TokenPolicy | None, *, bind: bool) -> dict[str, Any]:
    """The policy fields of a token (`bind`) or project answer."""
    shown = policy or TokenPolicy()
    data: dict[str, Any] = {"bind": dict(shown.bind)} if bind else {}
    models = shown.allowed_models
    data["allowed_models"] = None if models is None else list(models)
    data["max_output_tokens_cap"] = shown.max_output_tokens_cap
    data["allow_streaming"] = shown.allow_streaming
    return data


def _bind(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError("bind must be an object of keys to values.", param="bind")
    if len(value) > MAX_BIND_KEYS:
        raise PolicyError(f"bind holds at most {MAX_BIND_KEYS} keys.", param="bind")
    for key, item in value.items():
        if not BIND_KEY.fullmatch(key):
            raise PolicyError(
                f"bind key {key[:80]!r} must be snake_case: a lower-case letter, then "
                "up to 63 lower-case letters, digits or underscores.",
                param="bind",
            )
        if not isinstance(item, str) or not _header_safe(item):
            raise PolicyError(
                f"bind value of {key!r} must be 1 to {MAX_BIND_VALUE_CHARS} printable "
                "ASCII characters, without spaces at either end.",
                param="bind",
            )
    return dict(value)


def _header_safe(value: str) -> bool:
    return (
        len(value) <= MAX_BIND_VALUE_CHARS and HEADER_SAFE.fullmatch(value) is not None
    )


def _models(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MODEL_GLOBS:
        raise PolicyError(
            f"allowed_models must be a list of 1 to {MAX_MODEL_GLOBS} model names or "
            "globs (null: any model).",
            param="allowed_models",
        )
    for glob in value:
        if not isinstance(glob, str) or not _is_glob(glob):
            raise PolicyError(
                f"each of allowed_models must be 1 to {MAX_GLOB_CHARS} printable ASCII "
                "characters without spaces (a name, or a glob with * ? [...]).",
                param="allowed_models",
            )
    return tuple(dict.fromkeys(value))


def _is_glob(glob: str) -> bool:
    return len(glob) <= MAX_GLOB_CHARS and GLOB.fullmatch(glob) is not None


def _cap(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(
            "max_output_tokens_cap must be an integer.", param="max_output_tokens_cap"
        )
    if not 1 <= value <= MAX_OUTPUT_TOKENS_CAP:
        raise PolicyError(
            f"max_output_tokens_cap must be between 1 and {MAX_OUTPUT_TOKENS_CAP}, "
            f"got {value}.",
            param="max_output_tokens_cap",
        )
    return value


def _streaming(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise PolicyError(
            "allow_streaming must be true or false.", param="allow_streaming"
        )
    return value
