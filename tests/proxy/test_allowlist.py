"""Path normalisation, endpoint matching, model globs and allowlist YAML loading."""

from __future__ import annotations

import fnmatch
import textwrap
from pathlib import Path

import pytest

from llm_proxy.proxy.allowlist import (
    MAX_PATH_LENGTH,
    NOT_FOUND,
    Allowlist,
    Endpoint,
    MatchKind,
    ModelPatterns,
    default_allowlist,
    model_allowed,
    normalise_path,
)
from llm_proxy.proxy.allowlist_file import (
    AllowlistConfigError,
    load_allowlist,
    parse_allowlist,
)

EXAMPLE = Path(__file__).parents[2] / "deploy" / "api_providers.example.yaml"

HOSTILE_PATHS = [
    "/v1/../manage/tokens",
    "/v1/./models",
    "/v1/models/.",
    "/v1/models/..",
    "/v1/%2e%2e/manage",
    "/v1/%2E%2E/manage",
    "/v1/%2E./manage",
    "/v1/.%2e/manage",
    "/v1/%2e/models",
    "/v1/files%2f..%2fx",
    "/v1/files%2F..%2Fx",
    "/v1/files%5c..%5cx",
    "/v1/files\\..\\x",
    "/v1/chat/completions/../../admin",
    "/v1//models",
    "//v1/models",
    "/v1/models/",
    "/v1/models%00",
    "/v1/models\x00",
    "/v1/models%0a",
    "/v1/models\r\nX-Injected: 1",
    "/v1/models%7f",
    "/v1/%252e%252e/manage",  # double encoding
    "/v1/models%25",
    "/v1/models%",  # malformed escapes
    "/v1/models%zz",
    "/v1/models%4",
    "/v1/..;/manage",  # path parameters (Tomcat-style)
    "/v1/models;x=1",
    "/v1/mod els",
    "/v1/models%20",
    "/v1/m\u043edels",  # Cyrillic 'o'
    "/v1/models\uff0fx",  # fullwidth solidus
    "/v1/m%D0%BEdels",  # Cyrillic 'o', encoded
    "/v1/%c0%ae%c0%ae/manage",  # overlong UTF-8 '.'
    "/v1/%c0%afmanage",  # overlong UTF-8 '/'
    "/v1/models%e2%80%ae",  # right-to-left override
    "/v1/\u2024\u2024/manage",  # one-dot leaders
    "/v1/models#frag",
    "/v1/models%3fx=1",
    "v1/models",
    "",
    "http://evil.example/v1/models",
    "/v1/" + "a" * MAX_PATH_LENGTH,
]


@pytest.mark.parametrize("raw", HOSTILE_PATHS)
def test_normalise_path_refuses_hostile_paths(raw: str) -> None:
    assert normalise_path(raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models?limit=5", "/v1/models"),
        ("/v1/models?x=../../etc", "/v1/models"),
        # Escapes of ordinary characters decode to a path that is then checked like
        # any other: not a traversal, so it is allowed.
        ("/v1/mod%65ls", "/v1/models"),
        ("/v1/models/ft%3Agpt-4o%3Aacme", "/v1/models/ft:gpt-4o:acme"),
        (
            "/v1/models/ft:gpt-4o-mini:org::abc123",
            "/v1/models/ft:gpt-4o-mini:org::abc123",
        ),
        ("/v1/files/.hidden", "/v1/files/.hidden"),
        ("/v1/files/...", "/v1/files/..."),
        ("/", "/"),
    ],
)
def test_normalise_path_decodes_legitimate_paths(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected


def test_normalise_path_accepts_path_at_length_limit() -> None:
    raw = "/" + "a" * (MAX_PATH_LENGTH - 1)
    assert normalise_path(raw) == raw


@pytest.mark.parametrize("raw", HOSTILE_PATHS)
def test_allowlist_never_allows_hostile_paths(raw: str) -> None:
    path = normalise_path(raw)
    assert path is None or not default_allowlist().match("GET", path).allowed


@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("POST", "/v1/chat/completions", "/v1/chat/completions"),
        ("GET", "/v1/models", "/v1/models"),
        ("GET", "/v1/models/gpt-4o", "/v1/models/{model}"),
        ("GET", "/v1/models/ft:gpt-4o:acme:x:1", "/v1/models/{model}"),
        ("GET", "/v1/files", "/v1/files"),
        ("POST", "/v1/files", "/v1/files"),
        ("GET", "/v1/files/file-abc", "/v1/files/{id}"),
        ("GET", "/v1/files/file-abc/content", "/v1/files/{id}/content"),
        ("GET", "/v1/responses/resp_1/input_items", "/v1/responses/{id}/input_items"),
        ("POST", "/v1/uploads/upload_1/parts", "/v1/uploads/{id}/parts"),
        ("POST", "/v1/batches", "/v1/batches"),
    ],
)
def test_default_allowlist_allows_openai_endpoints(
    method: str, path: str, endpoint: str
) -> None:
    match = default_allowlist().match(method, path)
    assert match.allowed
    assert match.kind is MatchKind.ALLOWED
    assert match.endpoint == endpoint
    assert match.models is None


@pytest.mark.parametrize(
    "path",
    [
        "/v1/filesX",
        "/v1/files/a/b/c",
        "/v1/files/",
        "/v1/files/..",
        "/v1/chat/completionsX",
        "/v1/chat",
        "/v1",
        "/",
        "/v1/files/a b",
        "/V1/MODELS",
        "/manage/tokens",
        "/v1/fine_tuning/jobs",
    ],
)
def test_allowlist_rejects_unknown_path(path: str) -> None:
    assert default_allowlist().match("GET", path) is NOT_FOUND


def test_default_allowlist_allows_no_delete_and_only_get_post() -> None:
    methods = set().union(*(e.methods for e in default_allowlist().endpoints))
    assert methods == {"GET", "POST"}


def test_allowlist_answers_405_with_allow_list() -> None:
    allowlist = default_allowlist()
    match = allowlist.match("DELETE", "/v1/files/file-abc")
    assert match.kind is MatchKind.METHOD_NOT_ALLOWED
    assert not match.allowed
    assert match.endpoint == "/v1/files/{id}"
    assert match.allow_header == "GET"
    both = allowlist.match("PUT", "/v1/files")
    assert both.allowed_methods == ("GET", "POST")
    assert both.allow_header == "GET, POST"


def test_allowlist_compares_methods_case_sensitively() -> None:
    match = default_allowlist().match("get", "/v1/models")
    assert match.kind is MatchKind.METHOD_NOT_ALLOWED


def test_allowlist_match_returns_precomputed_results() -> None:
    allowlist = default_allowlist()
    first = allowlist.match("GET", "/v1/files/a")
    assert allowlist.match("GET", "/v1/files/b") is first


def test_allowlist_exact_path_wins_over_template() -> None:
    allowlist = Allowlist(
        (
            Endpoint("/v1/files/{id}", frozenset({"GET"})),
            Endpoint("/v1/files/search", frozenset({"POST"})),
        )
    )
    assert allowlist.match("POST", "/v1/files/search").endpoint == "/v1/files/search"
    assert allowlist.match("GET", "/v1/files/other").endpoint == "/v1/files/{id}"


def test_allowlist_supports_placeholder_inside_segment() -> None:
    allowlist = Allowlist((Endpoint("/v1/files/file-{id}.json", frozenset({"GET"})),))
    assert allowlist.match("GET", "/v1/files/file-abc.json").allowed
    assert not allowlist.match("GET", "/v1/files/abc.json").allowed
    assert not allowlist.match("GET", "/v1/files/file-.json").allowed


def test_allowlist_rejects_duplicate_endpoints() -> None:
    with pytest.raises(ValueError, match="duplicate endpoint"):
        Allowlist(
            (
                Endpoint("/v1/files/{id}", frozenset({"GET"})),
                Endpoint("/v1/files/{file_id}", frozenset({"POST"})),
            )
        )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("v1/models", "must start with '/'"),
        ("/v1/models/", "empty"),
        ("/v1//models", "empty"),
        ("/v1/../models", "'..'"),
        ("/v1/files/{id", "unbalanced"),
        ("/v1/files/id}", "unbalanced"),
        ("/v1/files/{}", "unbalanced"),
        ("/v1/files/{1d}", "unbalanced"),
        ("/v1/mod els", "not allowed"),
        ("/v1/models%20", "not allowed"),
        ("/" + "a" * MAX_PATH_LENGTH, "longer"),
    ],
)
def test_endpoint_rejects_bad_templates(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Endpoint(path, frozenset({"GET"}))


def test_endpoint_rejects_unknown_or_missing_methods() -> None:
    with pytest.raises(ValueError, match="FETCH"):
        Endpoint("/v1/models", frozenset({"FETCH"}))
    with pytest.raises(ValueError, match="no methods"):
        Endpoint("/v1/models", frozenset())


MODEL_CASES = [
    ("text-embedding-3-small", True),
    ("text-embedding-3-large", True),
    ("text-embedding-ada-002", False),
    ("TEXT-EMBEDDING-3-small", False),
    ("gpt-4o", True),
    ("gpt-4o-mini", False),
    ("gpt-4o\n", False),
    ("o1", True),
    ("o12", False),
    ("", False),
]
PATTERNS = ("text-embedding-3-*", "gpt-4o", "o?")


@pytest.mark.parametrize(("model", "expected"), MODEL_CASES)
def test_model_patterns_follow_fnmatchcase(model: str, expected: bool) -> None:
    assert model_allowed(ModelPatterns(PATTERNS), model) is expected
    assert any(fnmatch.fnmatchcase(model, p) for p in PATTERNS) is expected


def test_model_allowed_without_rule_or_without_model() -> None:
    assert model_allowed(None, None)
    assert model_allowed(None, "anything")
    assert not model_allowed(ModelPatterns(("gpt-*",)), None)


@pytest.mark.parametrize("patterns", [(), ("",)])
def test_model_patterns_reject_empty(patterns: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ModelPatterns(patterns)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "api_providers.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_load_allowlist_reads_example_file() -> None:
    allowlist = load_allowlist(EXAMPLE)
    assert allowlist.api_name == "openai"
    assert allowlist.upstream_base_url == "https://api.openai.com"
    chat = allowlist.match("POST", "/v1/chat/completions")
    assert chat.allowed
    assert model_allowed(chat.models, "gpt-4o-mini")
    assert not model_allowed(chat.models, "gpt-3.5-turbo")
    assert allowlist.match("GET", "/v1/chat/completions").allow_header == "POST"
    assert allowlist.match("POST", "/v1/models").allowed  # api-level [GET, POST]
    assert allowlist.match("DELETE", "/v1/files/x").kind is MatchKind.METHOD_NOT_ALLOWED


def test_load_allowlist_accepts_string_and_mapping_endpoints(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        apis:
          openai:
            allowed_methods: [get, POST]
            allowed_endpoints:
              - /v1/models
              - path: /v1/files/{id}
                methods: [GET, DELETE]
              - path: /v1/embeddings
                models: ["text-embedding-3-*"]
        """,
    )
    allowlist = load_allowlist(path)
    assert allowlist.upstream_base_url is None
    assert allowlist.match("GET", "/v1/models").allowed_methods == ("GET", "POST")
    assert allowlist.match("DELETE", "/v1/files/f").allowed
    assert not allowlist.match("POST", "/v1/files/f").allowed
    embeddings = allowlist.match("POST", "/v1/embeddings")
    assert embeddings.models == ModelPatterns(("text-embedding-3-*",))


def test_load_allowlist_picks_default_api_or_requested_api(tmp_path: Path) -> None:
    text = """
        default_api: azure
        apis:
          openai:
            allowed_methods: [POST]
            allowed_endpoints: [/v1/chat/completions]
          azure:
            base_url: https://example.openai.azure.com
            allowed_methods: [POST]
            allowed_endpoints: ["/openai/deployments/{name}/chat/completions"]
        """
    path = _write(tmp_path, text)
    azure = load_allowlist(path)
    assert azure.api_name == "azure"
    assert azure.upstream_base_url == "https://example.openai.azure.com"
    assert azure.match("POST", "/openai/deployments/gpt4/chat/completions").allowed
    openai = load_allowlist(path, api="openai")
    assert openai.api_name == "openai"
    assert openai.match("POST", "/v1/chat/completions").allowed


@pytest.mark.parametrize(
    ("names", "expected"), [(["other", "openai"], "openai"), (["solo"], "solo")]
)
def test_load_allowlist_infers_default_api(
    tmp_path: Path, names: list[str], expected: str
) -> None:
    apis = "".join(
        f"  {name}:\n    allowed_methods: [GET]\n    allowed_endpoints: [/v1/models]\n"
        for name in names
    )
    assert load_allowlist(_write(tmp_path, "apis:\n" + apis)).api_name == expected


BAD_CONFIGS = [
    pytest.param(
        """
        default_api: openai
        apis:
          openai:
            base_url: https://api.openai.com
            allowed_method: [GET, POST]
            allowed_endpoints: [/v1/models]
        """,
        5,
        "unknown key 'allowed_method'",
        id="unknown-api-key",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods:
              - GET
              - FETCH
            allowed_endpoints: [/v1/models]
        """,
        5,
        "unknown HTTP method 'FETCH'",
        id="unknown-method",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - /v1/models
              - v1/files
        """,
        6,
        "allowed_endpoints[1]: endpoint 'v1/files' must start with '/'",
        id="path-without-slash",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - path: /v1/files/{id
        """,
        5,
        "unbalanced",
        id="unbalanced-brace",
    ),
    pytest.param(
        """
        default_api: anthropic
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints: [/v1/models]
        """,
        1,
        "default_api 'anthropic' is not defined under 'apis' (defined: openai)",
        id="missing-default-api",
    ),
    pytest.param("", None, "the file is empty", id="empty-file"),
    pytest.param("# only a comment\n", None, "the file is empty", id="comment-only"),
    pytest.param("apis: [openai\n", 2, "invalid YAML", id="syntax-error"),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints: [/v1/models]
        ---
        apis: {}
        """,
        5,
        "invalid YAML",
        id="two-documents",
    ),
    pytest.param("- apis\n", 1, "top level: expected a mapping, got a list", id="list"),
    pytest.param(
        "default_api: openai\n", 1, "missing required key 'apis'", id="no-apis"
    ),
    pytest.param("apis: {}\n", 1, "'apis' defines no api", id="no-api"),
    pytest.param(
        "apis:\n  openai: {allowed_methods: [GET]}\n",
        2,
        "apis.openai: missing required key 'allowed_endpoints'",
        id="no-endpoints",
    ),
    pytest.param(
        "apis:\n  openai:\n    allowed_endpoints: [/v1/models]\n",
        3,
        "has no methods",
        id="no-methods",
    ),
    pytest.param(
        "apis:\n  openai:\n    allowed_methods: []\n    allowed_endpoints: [/v1/x]\n",
        3,
        "allowed_methods: must not be empty",
        id="empty-methods",
    ),
    pytest.param(
        "apis:\n  openai:\n    allowed_methods: GET\n    allowed_endpoints: [/v1/x]\n",
        3,
        "allowed_methods: expected a list, got str",
        id="methods-not-list",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - path: /v1/models
                model: ["gpt-*"]
        """,
        6,
        "unknown key 'model' (expected one of: methods, models, path)",
        id="unknown-endpoint-key",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - methods: [GET]
        """,
        5,
        "allowed_endpoints[0]: missing required key 'path'",
        id="endpoint-without-path",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - /v1/files/{id}
              - /v1/files/{file_id}
        """,
        6,
        "allowed_endpoints[1]: duplicate endpoint '/v1/files/{file_id}'",
        id="duplicate-endpoint",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - path: /v1/embeddings
                models: [gpt-4o, ""]
        """,
        6,
        "models[1]: must not be empty",
        id="empty-model",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - path: /v1/embeddings
                models: [1]
        """,
        6,
        "models[0]: expected a string, got int",
        id="model-not-string",
    ),
    pytest.param(
        """
        apis:
          openai:
            base_url: ftp://api.openai.com
            allowed_methods: [GET]
            allowed_endpoints: [/v1/models]
        """,
        3,
        "'ftp://api.openai.com' is not an http(s) URL",
        id="bad-base-url",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints: [/v1/models]
            param_whitelist:
              model: [gpt-4o]
        """,
        5,
        "unknown key 'param_whitelist' (use per-endpoint 'models' globs instead)",
        id="go-only-key",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_methods: [POST]
            allowed_endpoints: [/v1/models]
        """,
        4,
        "duplicate key 'allowed_methods'",
        id="duplicate-key",
    ),
    pytest.param(
        """
        apis:
          openai:
            allowed_methods: [GET]
            allowed_endpoints:
              - path: {v1: models}
        """,
        5,
        "allowed_endpoints[0].path: expected a string, got a mapping",
        id="path-not-string",
    ),
    pytest.param(
        "apis:\n  openai:\n  - x\n",
        3,
        "apis.openai: expected a mapping, got a list",
        id="api-not-mapping",
    ),
    pytest.param(
        "apis:\n  1: {allowed_methods: [GET], allowed_endpoints: [/v1/x]}\n",
        2,
        "apis key: expected a string, got int",
        id="api-name-not-string",
    ),
    pytest.param(
        """
        apis:
          one: {allowed_methods: [GET], allowed_endpoints: [/v1/x]}
          two: {allowed_methods: [GET], allowed_endpoints: [/v1/x]}
        """,
        1,
        "'default_api' is required",
        id="ambiguous-default",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_CONFIGS)
def test_load_allowlist_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int | None, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(AllowlistConfigError) as info:
        load_allowlist(path)
    error = info.value
    assert message in str(error)
    assert error.line == line
    assert error.source == str(path)
    where = str(path) if line is None else f"{path}:{line}: "
    assert str(error).startswith(where)
    assert isinstance(error, ValueError)


def test_load_allowlist_rejects_unknown_requested_api(tmp_path: Path) -> None:
    with pytest.raises(AllowlistConfigError, match="requested api 'azure'"):
        load_allowlist(EXAMPLE, api="azure")


def test_load_allowlist_reports_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(AllowlistConfigError, match="cannot read") as info:
        load_allowlist(missing)
    assert info.value.line is None
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(AllowlistConfigError, match="cannot read"):
        load_allowlist(binary)


def test_parse_allowlist_names_its_source() -> None:
    with pytest.raises(AllowlistConfigError, match=r"^<string>: the file is empty"):
        parse_allowlist("")
