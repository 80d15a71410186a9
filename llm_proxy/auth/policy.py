"""A token's policy as the request path checks it: compiled at reload, merged once.

The stored policy (bound header metadata, allowed model globs, an output-token cap,
whether streaming is allowed) becomes a `CallPolicy` when the token table applies a
row: globs are compiled here, never per call, and each distinct glob list only once.
A principal carries the merge of its project's defaults and its token's own, in which
the token can only narrow: a model must match both lists, the lower cap wins, and
streaming needs both to allow it. Knows no HTTP: `proxy/policy.py` applies it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Protocol

_GLOB_CHARS: Final = frozenset("*?[")
BINDING_PREFIX: Final = "X-Proxy-"
# What a bound value that is not ASCII compiles to (the rules never store one): no
# HTTP header value can hold a line feed, so it never matches.
NEVER_SENT: Final = "\n"
# Distinct glob lists kept compiled; tokens minted alike share one entry.
MODEL_RULE_CACHE: Final = 4096


class PolicyFields(Protocol):
    """A stored policy's fields (`storage.TokenPolicy`)."""

    @property
    def bind(self) -> Mapping[str, str]: ...
    @property
    def allowed_models(self) -> tuple[str, ...] | None: ...
    @property
    def max_output_tokens_cap(self) -> int | None: ...
    @property
    def allow_streaming(self) -> bool: ...


def binding_header(key: str) -> str:
    """The request header of a bound key: `user_id` -> `X-Proxy-User-Id`."""
    return BINDING_PREFIX + "-".join(word.capitalize() for word in key.split("_"))


@dataclass(frozen=True, slots=True)
class Binding:
    """One bound key: the header that must carry `expected` on every call.

    `expected` is ASCII, so `hmac.compare_digest` takes it as text.
    """

    header: str
    expected: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ModelRule:
    """One list of allowed models: exact names in a set, the globs in one regex."""

    names: frozenset[str]
    pattern: re.Pattern[str] | None

    def allows(self, model: str) -> bool:
        """True when `model` is one of the names or matches a glob (case-sensitive)."""
        if model in self.names:
            return True
        return self.pattern is not None and self.pattern.match(model) is not None


@lru_cache(maxsize=MODEL_RULE_CACHE)
def model_rule(globs: tuple[str, ...]) -> ModelRule:
    """The compiled rule of a glob list (`fnmatch.fnmatchcase` semantics)."""
    names = frozenset(g for g in globs if _GLOB_CHARS.isdisjoint(g))
    patterns = [g for g in globs if g not in names]
    joined = "|".join(f"(?:{fnmatch.translate(g)})" for g in patterns)
    return ModelRule(names, re.compile(joined) if patterns else None)


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """What the request path checks for one principal; built only when it narrows."""

    bindings: tuple[Binding, ...] = ()
    models: tuple[ModelRule, ...] = ()  # every rule must allow the model
    max_output_tokens: int | None = None
    allow_streaming: bool = True

    @property
    def reads_form(self) -> bool:
        """Whether a multipart form's `model` or `stream` field matters here."""
        return bool(self.models) or not self.allow_streaming

    def allows_model(self, model: str) -> bool:
        """True when every model list allows `model`."""
        for rule in self.models:  # a loop: cheaper than all() over a generator
            if not rule.allows(model):
                return False
        return True


def compile_policy(policy: PolicyFields | None) -> CallPolicy | None:
    """The request path's form of a stored policy; None when it narrows nothing."""
    if policy is None:
        return None
    bindings = tuple(
        Binding(binding_header(key), value if value.isascii() else NEVER_SENT)
        for key, value in sorted(policy.bind.items())
    )
    globs = policy.allowed_models
    models = () if globs is None else (model_rule(tuple(globs)),)
    cap = policy.max_output_tokens_cap
    if not bindings and not models and cap is None and policy.allow_streaming:
        return None
    return CallPolicy(bindings, models, cap, policy.allow_streaming)


def merge_policies(
    project: CallPolicy | None, token: CallPolicy | None
) -> CallPolicy | None:
    """The project's defaults narrowed by the token's own policy."""
    if project is None or token is None:
        return token if project is None else project
    caps = [c for c in (project.max_output_tokens, token.max_output_tokens) if c]
    return CallPolicy(
        bindings=project.bindings + token.bindings,
        models=project.models + token.models,
        max_output_tokens=min(caps) if caps else None,
        allow_streaming=project.allow_streaming and token.allow_streaming,
    )
