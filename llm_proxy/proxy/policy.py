"""A token's policy on the request path: bound headers, models, streaming, output cap.

Applied by the relay only for a principal whose policy narrows something (one `is
None` test for the others). Bound headers are checked before the body is read and
taken out of the upstream request; the body rules use the JSON the relay peeks at
anyway. Every refusal is an OpenAI-shaped error raised before the upstream is called,
so it spends no quota and no rate-limit slot; policy codes are in `POLICY_CODES`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from ..auth.policy import CallPolicy
from ..errors import ApiError
from .exchange import Exchange

# The request fields that bound a call's output, in the order they are checked.
OUTPUT_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Endpoints that generate output, and the field a capped token must send there.
CAPPED_FIELD: Final[Mapping[str, str]] = {
    "/v1/chat/completions": "max_completion_tokens",
    "/v1/completions": "max_tokens",
    "/v1/responses": "max_output_tokens",
}
_NUMBERS: Final = (int, float)  # a tuple: isinstance takes it faster than a union
POLICY_CODES: Final = frozenset(
    {
        "binding_mismatch",
        "model_required",
        "model_not_allowed",
        "streaming_not_allowed",
        "output_tokens_cap_exceeded",
        "output_tokens_cap_required",
    }
)


def enforce_bindings(
    policy: CallPolicy, given: CIMultiDictProxy[str], upstream: CIMultiDict[str]
) -> None:
    """403 unless each bound header came once with its value; then drop them.

    The comparison takes constant time; `compare_digest` compares ASCII text only,
    and a value that is not ASCII cannot be the bound one anyway.
    """
    for binding in policy.bindings:
        values = given.getall(binding.header, ())
        if not (
            len(values) == 1
            and values[0].isascii()
            and hmac.compare_digest(values[0], binding.expected)
        ):
            raise _binding_error(binding.header, present=bool(values))
        upstream.popall(binding.header, None)


def check_body(
    policy: CallPolicy, payload: dict[str, object] | None, exchange: Exchange
) -> None:
    """Refuse a body the policy does not allow; `payload` is None when not JSON."""
    if policy.models:
        model = exchange.model
        if model is None:
            raise _refusal(
                400,
                "This token may use only some models, and the proxy cannot read this "
                'request\'s model: send a JSON body with a string "model", or, in a '
                "multipart form, a model form field before the file.",
                "model_required",
                "model",
            )
        if not policy.allows_model(model):
            raise _refusal(
                403,
                f"The model {model!r} is not allowed for this token.",
                "model_not_allowed",
                "model",
            )
    if not policy.allow_streaming and exchange.stream:
        raise _refusal(
            403,
            "This token may not stream: send the request without stream: true.",
            "streaming_not_allowed",
            "stream",
        )
    if policy.max_output_tokens is not None:
        _check_cap(policy.max_output_tokens, payload or {}, exchange.endpoint)


def _check_cap(cap: int, payload: dict[str, object], endpoint: str | None) -> None:
    named = False
    for name in OUTPUT_FIELDS:
        value = payload.get(name)
        if value is None or isinstance(value, bool):
            continue
        named = True
        if isinstance(value, _NUMBERS) and value > cap:
            raise _refusal(
                400,
                f"{name} is {value}, over this token's cap of {cap} output tokens.",
                "output_tokens_cap_exceeded",
                name,
            )
    required = None if named else CAPPED_FIELD.get(endpoint or "")
    if required is not None:
        raise _refusal(
            400,
            f"This token is capped at {cap} output tokens: set {required} "
            f"(at most {cap}).",
            "output_tokens_cap_required",
            required,
        )


def _binding_error(header: str, *, present: bool) -> ApiError:
    problem = "does not match this token's binding" if present else "is missing"
    return _refusal(
        403,
        f"The {header} header {problem}: this token is bound to one value of it, "
        "sent once on every request.",
        "binding_mismatch",
        None,
    )


def _refusal(status: int, message: str, code: str, param: str | None) -> ApiError:
    kind = "permission_error" if status == 403 else "invalid_request_error"
    return ApiError(status, message, type=kind, code=code, param=param)
