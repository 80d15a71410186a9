"""The allowlist file: `api_providers.yaml` read into an `Allowlist`.

Walks the YAML node tree (not the loaded values) so every error names the file, the
line and the key; keys other proxies' files carry that mean nothing here are
refused with what to use instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, NoReturn
from urllib.parse import urlsplit

import yaml

from ..domain_errors import ProxyError
from .allowlist import (
    DEFAULT_API,
    KNOWN_METHODS,
    Allowlist,
    Endpoint,
    ModelPatterns,
    path_shape,
)

_TOP_KEYS: Final = ("apis", "default_api")
_API_KEYS: Final = ("allowed_endpoints", "allowed_methods", "base_url")
_ENDPOINT_KEYS: Final = ("methods", "models", "path")
_GO_ONLY_KEYS: Final = {
    "param_whitelist": "use per-endpoint 'models' globs instead",
    "allowed_origins": "origin checks are not supported",
    "required_headers": "required headers are not supported",
    "timeouts": "upstream timeouts are settings (environment), not allowlist keys",
    "connection": "connection limits are settings (environment), not allowlist keys",
}
_STR_TAG: Final = "tag:yaml.org,2002:str"


class AllowlistConfigError(ProxyError, ValueError):
    """An allowlist file that cannot be used; the message names file, line and key."""

    def __init__(self, source: str, line: int | None, detail: str) -> None:
        self.source = source
        self.line = line
        self.detail = detail
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {detail}")


def load_allowlist(path: Path, *, api: str | None = None) -> Allowlist:
    """Load the allowlist of `api` (default: the file's `default_api`) from YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AllowlistConfigError(str(path), None, f"cannot read: {exc}") from exc
    return parse_allowlist(text, source=str(path), api=api)


def parse_allowlist(
    text: str, *, source: str = "<string>", api: str | None = None
) -> Allowlist:
    """Parse allowlist YAML text; `source` names it in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise AllowlistConfigError(source, line, f"invalid YAML: {problem}") from exc
    if root is None:
        raise AllowlistConfigError(source, None, "the file is empty; expected 'apis:'")
    return _Parser(source).allowlist(root, api)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return str(node.tag).rsplit(":", 1)[-1]


class _Parser:
    """Walks the composed node tree, so every error can name the line it is on."""

    def __init__(self, source: str) -> None:
        self._source = source

    def fail(self, node: yaml.Node, detail: str) -> NoReturn:
        raise AllowlistConfigError(self._source, _line(node), detail)

    def allowlist(self, root: yaml.Node, api: str | None) -> Allowlist:
        top = self.mapping(root, "top level", _TOP_KEYS)
        if "apis" not in top:
            self.fail(root, "missing required key 'apis'")
        apis_node = top["apis"]
        apis = {
            name: self.api(name, node)
            for name, node in self.mapping(apis_node, "apis", None).items()
        }
        if not apis:
            self.fail(apis_node, "'apis' defines no api")
        name_node = top.get("default_api")
        if api is not None:
            name = api
            if name not in apis:
                self.fail(apis_node, f"requested api {name!r} is not under 'apis'")
        elif name_node is not None:
            name = self.string(name_node, "default_api")
            if name not in apis:
                self.fail(
                    name_node,
                    f"default_api {name!r} is not defined under 'apis'"
                    f" (defined: {', '.join(sorted(apis))})",
                )
        elif len(apis) == 1 or DEFAULT_API in apis:
            name = DEFAULT_API if DEFAULT_API in apis else next(iter(apis))
        else:
            self.fail(root, "'default_api' is required when several apis exist")
        base_url, endpoints = apis[name]
        return Allowlist(endpoints, api_name=name, upstream_base_url=base_url)

    def api(
        self, name: str, node: yaml.Node
    ) -> tuple[str | None, tuple[Endpoint, ...]]:
        where = f"apis.{name}"
        fields = self.mapping(node, where, _API_KEYS)
        base_url = None
        if "base_url" in fields:
            base_url = self.base_url(fields["base_url"], f"{where}.base_url")
        methods = None
        if "allowed_methods" in fields:
            methods = self.methods(
                fields["allowed_methods"], f"{where}.allowed_methods"
            )
        if "allowed_endpoints" not in fields:
            self.fail(node, f"{where}: missing required key 'allowed_endpoints'")
        where = f"{where}.allowed_endpoints"
        endpoints: list[Endpoint] = []
        shapes: set[str] = set()
        for i, item in enumerate(self.sequence(fields["allowed_endpoints"], where)):
            endpoint = self.endpoint(item, f"{where}[{i}]", methods)
            if path_shape(endpoint.path) in shapes:
                self.fail(item, f"{where}[{i}]: duplicate endpoint {endpoint.path!r}")
            shapes.add(path_shape(endpoint.path))
            endpoints.append(endpoint)
        return base_url, tuple(endpoints)

    def endpoint(
        self, node: yaml.Node, where: str, api_methods: frozenset[str] | None
    ) -> Endpoint:
        models = None
        methods = api_methods
        if isinstance(node, yaml.MappingNode):
            fields = self.mapping(node, where, _ENDPOINT_KEYS)
            if "path" not in fields:
                self.fail(node, f"{where}: missing required key 'path'")
            path_node = fields["path"]
            if "methods" in fields:
                methods = self.methods(fields["methods"], f"{where}.methods")
            if "models" in fields:
                models = self.models(fields["models"], f"{where}.models")
        else:
            path_node = node
        path = self.string(path_node, f"{where}.path")
        if methods is None:
            self.fail(
                node,
                f"{where}: endpoint {path!r} has no methods; set the api's"
                " 'allowed_methods' or the endpoint's 'methods'",
            )
        try:
            return Endpoint(path, methods, models)
        except ValueError as exc:
            self.fail(path_node, f"{where}: {exc}")

    def methods(self, node: yaml.Node, where: str) -> frozenset[str]:
        methods = set()
        for i, item in enumerate(self.sequence(node, where)):
            method = self.string(item, f"{where}[{i}]").upper()
            if method not in KNOWN_METHODS:
                self.fail(
                    item,
                    f"{where}[{i}]: unknown HTTP method {item.value!r}"
                    f" (expected one of: {', '.join(sorted(KNOWN_METHODS))})",
                )
            methods.add(method)
        return frozenset(methods)

    def models(self, node: yaml.Node, where: str) -> ModelPatterns:
        items = self.sequence(node, where)
        return ModelPatterns(
            tuple(self.string(item, f"{where}[{i}]") for i, item in enumerate(items))
        )

    def base_url(self, node: yaml.Node, where: str) -> str:
        value = self.string(node, where)
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.fail(node, f"{where}: {value!r} is not an http(s) URL")
        return value

    def mapping(
        self, node: yaml.Node, where: str, allowed: tuple[str, ...] | None
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{where}: expected a mapping, got {_kind(node)}")
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, f"{where} key")
            if allowed is not None and key not in allowed:
                self.unknown_key(key_node, key, where, allowed)
            if key in fields:
                self.fail(key_node, f"{where}: duplicate key {key!r}")
            fields[key] = value_node
        return fields

    def unknown_key(
        self, node: yaml.Node, key: str, where: str, allowed: tuple[str, ...]
    ) -> NoReturn:
        hint = _GO_ONLY_KEYS.get(key)
        if hint is None:
            hint = f"expected one of: {', '.join(allowed)}"
        self.fail(node, f"{where}: unknown key {key!r} ({hint})")

    def sequence(self, node: yaml.Node, where: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{where}: expected a list, got {_kind(node)}")
        if not node.value:
            self.fail(node, f"{where}: must not be empty")
        return list(node.value)

    def string(self, node: yaml.Node, where: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR_TAG:
            self.fail(node, f"{where}: expected a string, got {_kind(node)}")
        value = str(node.value)
        if not value:
            self.fail(node, f"{where}: must not be empty")
        return value
