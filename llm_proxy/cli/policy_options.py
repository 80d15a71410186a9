"""The policy options of `manage token generate` and `manage project create|update`.

They become the API's policy fields (`bind`, `allowed_models`, `max_output_tokens_cap`,
`allow_streaming`); the rules are the server's, whose 400 names the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..management.policy import MAX_OUTPUT_TOKENS_CAP
from .base import F


def _bind_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """`--bind user_id=alice` (repeatable) as {"user_id": "alice"}."""
    pairs: dict[str, str] = {}
    for value in values:
        key, sign, bound = value.partition("=")
        if not sign or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param=param)
        pairs[key] = bound
    return pairs


def policy_options(*, bind: bool = False, clearing: bool = False) -> Callable[[F], F]:
    """The options of a token's policy (`bind`) or a project's defaults; `clearing`
    adds the ones that remove a default again (`project update`)."""
    options = [
        click.option(
            "--allowed-model",
            "allowed_models",
            multiple=True,
            metavar="GLOB",
            help="A model the token may use, a name or a glob such as 'gpt-4o*' "
            "(repeatable; default: any model).",
        ),
        click.option(
            "--max-output-tokens-cap",
            type=click.IntRange(1, MAX_OUTPUT_TOKENS_CAP),
            help="Refuse calls asking for more output tokens (max_tokens, "
            "max_completion_tokens, max_output_tokens) than this.",
        ),
        click.option(
            "--streaming/--no-streaming",
            default=None,
            help="Allow or refuse stream: true (default: allowed).",
        ),
    ]
    if bind:
        options.insert(
            0,
            click.option(
                "--bind",
                multiple=True,
                callback=_bind_pairs,
                metavar="KEY=VALUE",
                help="Metadata every call must repeat in a header: user_id=alice "
                "needs 'X-Proxy-User-Id: alice' (repeatable).",
            ),
        )
    if clearing:
        options += [
            click.option("--any-model", is_flag=True, help="Remove the model list."),
            click.option("--no-output-cap", is_flag=True, help="Remove the cap."),
        ]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def policy_body(
    *,
    bind: dict[str, str] | None = None,
    allowed_models: tuple[str, ...] = (),
    max_output_tokens_cap: int | None = None,
    streaming: bool | None = None,
    any_model: bool = False,
    no_output_cap: bool = False,
) -> dict[str, Any]:
    """The API fields of the options given (an option left out changes nothing)."""
    body: dict[str, Any] = {}
    if bind:
        body["bind"] = bind
    if any_model and allowed_models:
        raise click.UsageError("--any-model and --allowed-model exclude each other")
    if no_output_cap and max_output_tokens_cap is not None:
        raise click.UsageError(
            "--no-output-cap and --max-output-tokens-cap exclude each other"
        )
    if allowed_models or any_model:
        body["allowed_models"] = list(allowed_models) if allowed_models else None
    if max_output_tokens_cap is not None or no_output_cap:
        body["max_output_tokens_cap"] = max_output_tokens_cap
    if streaming is not None:
        body["allow_streaming"] = streaming
    return body
