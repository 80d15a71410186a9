"""Which methods, paths and models the proxy forwards upstream: the matcher.

Owns raw-path normalisation, the compiled endpoint table (built in code here, or read
from an `api_providers.yaml` file by `allowlist_file.py`) and model globs; knows
nothing about aiohttp or tokens.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final
from urllib.parse import unquote

MAX_PATH_LENGTH: Final = 2048
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)
DEFAULT_API: Final = "openai"

# Characters a decoded path segment may hold: RFC 3986 unreserved plus the sub-delims
# and ':' '@', minus ';' (path parameters, the Tomcat `..;/` trick). Everything else
# (space, '%', '\\', '?', '#', quotes, controls, non-ASCII) makes the path a 404.
_SEGMENT_CHARS: Final = r"A-Za-z0-9\-._~:@!$&'()*+,="
_SAFE_PATH: Final = re.compile(rf"(?:/[{_SEGMENT_CHARS}]+)+|/")
_DOT_SEGMENT: Final = re.compile(r"/\.\.?(?=/|\Z)")
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_VALUE: Final = r"(?!\.\.?(?:/|\Z))[A-Za-z0-9._:\-]+"
_LITERAL: Final = re.compile(rf"[{_SEGMENT_CHARS}]+")


def normalise_path(raw_path: str) -> str | None:
    """Decode a raw request path for matching, or return None (answer 404).

    Takes the path exactly as received (aiohttp's `request.raw_path`); a query string
    is split off and ignored. Refused: paths over `MAX_PATH_LENGTH`; encoded '/' or
    '\\' (`%2f`, `%5c`); an encoded '%' (`%25`, so nothing can be decoded twice);
    after decoding, empty segments (`//`, and a trailing '/': `/v1/models/` is not
    `/v1/models`), `.` or `..` segments in any spelling, and any character outside
    `_SEGMENT_CHARS` (controls, NUL, backslash, ';', non-ASCII, malformed escapes).
    Escapes of ordinary characters are decoded and accepted: `/v1/mod%65ls` is
    `/v1/models`, which is no traversal. Forward the returned path upstream so that
    what was checked is what upstream sees.
    """
    path = raw_path.split("?", 1)[0] if "?" in raw_path else raw_path
    if len(path) > MAX_PATH_LENGTH:
        return None
    if "%" in path:
        lowered = path.lower()
        if "%2f" in lowered or "%25" in lowered:
            return None
        path = unquote(path, errors="replace")  # bad UTF-8 -> U+FFFD -> refused below
    if _SAFE_PATH.fullmatch(path) is None:
        return None
    if "/." in path and _DOT_SEGMENT.search(path) is not None:
        return None
    return path


@dataclass(frozen=True, slots=True)
class ModelPatterns:
    """Glob patterns for a request body's "model", with `fnmatch.fnmatchcase` rules."""

    patterns: tuple[str, ...]
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.patterns or not all(self.patterns):
            raise ValueError(
                "model patterns must be a non-empty list of non-empty globs"
            )
        # One alternation of fnmatch.translate() outputs: the regexes fnmatchcase uses.
        joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns)
        object.__setattr__(self, "_regex", re.compile(joined))

    def allows(self, model: str | None) -> bool:
        """True when `model` matches one of the patterns; a missing model never does."""
        return model is not None and self._regex.match(model) is not None


def model_allowed(patterns: ModelPatterns | None, model: str | None) -> bool:
    """True when no model rule applies or `model` matches it."""
    return patterns is None or patterns.allows(model)


def _template_regex(path: str) -> re.Pattern[str] | None:
    """Validate an endpoint template; compile it if it has `{name}` placeholders."""
    if not path.startswith("/"):
        raise ValueError(f"endpoint {path!r} must start with '/'")
    if len(path) > MAX_PATH_LENGTH:
        raise ValueError(f"endpoint {path[:40]!r}... is longer than {MAX_PATH_LENGTH}")
    parts: list[str] = []
    for segment in path[1:].split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"endpoint {path!r} has an empty, '.' or '..' segment"
                " (no '//' and no trailing '/')"
            )
        parts.append(_segment_regex(path, segment))
    if "{" not in path:
        return None
    return re.compile("/" + "/".join(parts))


def _segment_regex(path: str, segment: str) -> str:
    pieces: list[str] = []
    pos = 0
    for placeholder in _PLACEHOLDER.finditer(segment):
        pieces.append(_literal(path, segment[pos : placeholder.start()]))
        pieces.append(_PLACEHOLDER_VALUE)
        pos = placeholder.end()
    pieces.append(_literal(path, segment[pos:]))
    return "".join(pieces)


def _literal(path: str, text: str) -> str:
    if not text:
        return ""
    if "{" in text or "}" in text:
        raise ValueError(
            f"endpoint {path!r} has an unbalanced or malformed '{{name}}' placeholder"
        )
    if _LITERAL.fullmatch(text) is None:
        raise ValueError(f"endpoint {path!r} has characters not allowed in a path")
    return re.escape(text)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One allowed path (exact, or with `{name}` segments) and its methods."""

    path: str  # also the stable metrics label
    methods: frozenset[str]
    models: ModelPatterns | None = None
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(f"endpoint {self.path!r} allows no methods")
        unknown = sorted(self.methods - KNOWN_METHODS)
        if unknown:
            raise ValueError(f"unknown HTTP method {unknown[0]!r}")
        object.__setattr__(self, "_regex", _template_regex(self.path))


class MatchKind(StrEnum):
    """What the allowlist says about a request."""

    ALLOWED = "allowed"
    NOT_FOUND = "not_found"  # answer 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # answer 405 with `Allow`


@dataclass(frozen=True, slots=True)
class Match:
    """The allowlist's verdict; precomputed, so matching allocates nothing."""

    kind: MatchKind
    endpoint: str | None = None  # the template, e.g. "/v1/files/{id}"
    models: ModelPatterns | None = None
    allowed_methods: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        """True when the request may go upstream (subject to the model rule)."""
        return self.kind is MatchKind.ALLOWED

    @property
    def allow_header(self) -> str:
        """The value for an `Allow` response header."""
        return ", ".join(self.allowed_methods)


NOT_FOUND: Final = Match(MatchKind.NOT_FOUND)


def path_shape(path: str) -> str:
    """Templates differing only in placeholder names match the same paths."""
    return _PLACEHOLDER.sub("{}", path)


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    allowed: Match
    refused: Match
    prefix: str  # literal text before the first placeholder: a cheap pre-filter
    regex: re.Pattern[str] | None


def _route(endpoint: Endpoint) -> _Route:
    methods = tuple(sorted(endpoint.methods))
    return _Route(
        methods=endpoint.methods,
        allowed=Match(MatchKind.ALLOWED, endpoint.path, endpoint.models, methods),
        refused=Match(MatchKind.METHOD_NOT_ALLOWED, endpoint.path, None, methods),
        prefix=endpoint.path.split("{", 1)[0],
        regex=endpoint._regex,
    )


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The compiled endpoint table of one upstream API.

    `match` is one dict lookup for exact paths; templated paths are tried only among
    those with the same number of segments, in declaration order, after a prefix
    check. An exact path wins over a template. Matching is never by prefix, and
    methods are compared case-sensitively (RFC 9110 section 9.1).
    """

    endpoints: tuple[Endpoint, ...]
    api_name: str = DEFAULT_API
    upstream_base_url: str | None = None
    _exact: dict[str, _Route] = field(init=False, repr=False, compare=False)
    _templates: dict[int, tuple[_Route, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        exact: dict[str, _Route] = {}
        templates: dict[int, list[_Route]] = {}
        shapes: set[str] = set()
        for endpoint in self.endpoints:
            shape = path_shape(endpoint.path)
            if shape in shapes:
                raise ValueError(f"duplicate endpoint {endpoint.path!r}")
            shapes.add(shape)
            route = _route(endpoint)
            if route.regex is None:
                exact[endpoint.path] = route
            else:
                templates.setdefault(endpoint.path.count("/"), []).append(route)
        object.__setattr__(self, "_exact", exact)
        frozen = {depth: tuple(routes) for depth, routes in templates.items()}
        object.__setattr__(self, "_templates", frozen)

    def match(self, method: str, path: str) -> Match:
        """Judge a request; `path` must come from `normalise_path`."""
        route = self._exact.get(path)
        if route is None:
            route = self._match_template(path)
            if route is None:
                return NOT_FOUND
        return route.allowed if method in route.methods else route.refused

    def _match_template(self, path: str) -> _Route | None:
        for route in self._templates.get(path.count("/"), ()):
            if (
                path.startswith(route.prefix)
                and route.regex
                and route.regex.fullmatch(path)
            ):
                return route
        return None


def _endpoints(methods: str, *paths: str) -> list[Endpoint]:
    allowed = frozenset(methods.split())
    return [Endpoint(path, allowed) for path in paths]


def default_allowlist() -> Allowlist:
    """OpenAI's inference, file, batch and upload endpoints; GET and POST only."""
    return Allowlist(
        (
            *_endpoints(
                "POST",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/embeddings",
                "/v1/moderations",
                "/v1/images/generations",
                "/v1/images/edits",
                "/v1/images/variations",
                "/v1/audio/speech",
                "/v1/audio/transcriptions",
                "/v1/audio/translations",
                "/v1/responses",
                "/v1/uploads",
                "/v1/uploads/{id}/parts",
                "/v1/uploads/{id}/complete",
                "/v1/uploads/{id}/cancel",
            ),
            *_endpoints(
                "GET",
                "/v1/models",
                "/v1/models/{model}",
                "/v1/files/{id}",
                "/v1/files/{id}/content",
                "/v1/responses/{id}",
                "/v1/responses/{id}/input_items",
                "/v1/batches/{id}",
            ),
            *_endpoints("GET POST", "/v1/files", "/v1/batches"),
        )
    )
