"""The management rules for projects and tokens, shared by the REST API and admin pages.

Every write goes through here: it validates, encrypts or hashes secrets, writes through
the repository, and updates the in-memory `TokenStore` so the change applies to the
very next proxied request of this process. After the write is committed it calls
`on_change` (the Redis invalidation publisher, when REDIS_URL is set) so the other
processes reload it at once instead of at their next periodic reload.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Generic, TypeVar

from ..auth.crypto import (
    KEY_CHECK_PLAINTEXT,
    DecryptionError,
    KeyCipher,
    TokenHasher,
    generate_token,
    mask_api_key,
    token_hint,
)
from ..auth.tokens import TokenStore
from ..clock import utc_now
from ..domain_errors import DomainError, ErrorKind, ProxyError
from ..origins import OriginError, parse_origins
from ..storage import (
    DuplicateNameError,
    Project,
    ProjectChanges,
    Repository,
    RevokeCounts,
    Token,
    TokenFilter,
    TokenPolicy,
)
from .policy import PolicyError, changed_policy

MAX_DURATION_MINUTES: Final = 525_600
MAX_NAME_CHARS: Final = 200
MAX_DESCRIPTION_CHARS: Final = 2000
MAX_CACHE_TTL_SECONDS: Final = 31_536_000  # a year; RESPONSE_CACHE_TTL_MAX caps it too
KEY_CHECK_META: Final = "encryption_key_check"

Now = Callable[[], datetime]
# Called after a committed change to a project or token: ("project" | "token", id).
ChangeHook = Callable[[str, str], Awaitable[None]]
T = TypeVar("T")


class ServiceError(DomainError):
    """A rule refused the operation; by default, its input breaks the rule."""


class NotFound(ServiceError):
    """The project or token does not exist."""

    kind = ErrorKind.NOT_FOUND
    code = "not_found"


class Conflict(ServiceError):
    """The name is already taken."""

    kind = ErrorKind.CONFLICT
    code = "conflict"


class Forbidden(ServiceError):
    """The project is inactive."""

    kind = ErrorKind.FORBIDDEN
    code = "project_inactive"


class KeyMismatchError(ProxyError):
    """ENCRYPTION_KEY is not the key this database was written with."""


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just created: the only moment its value exists outside the client."""

    token: Token
    value: str


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the total it was cut from."""

    items: list[T]
    total: int
    limit: int
    offset: int


async def check_encryption_key(repository: Repository, cipher: KeyCipher) -> None:
    """Fail at start when ENCRYPTION_KEY is not the key the data was written with."""
    stored = await repository.get_meta(KEY_CHECK_META)
    if stored is None:
        await repository.set_meta(KEY_CHECK_META, cipher.encrypt(KEY_CHECK_PLAINTEXT))
        return
    try:
        cipher.decrypt(stored)
    except DecryptionError as exc:
        raise KeyMismatchError(
            "ENCRYPTION_KEY does not match the key this database was created with; "
            "start with the original key (or its key file)"
        ) from exc


class ManagementService:
    """Projects and tokens: create, read, change, revoke."""

    def __init__(
        self,
        repository: Repository,
        cipher: KeyCipher,
        hasher: TokenHasher,
        store: TokenStore,
        *,
        now: Now = utc_now,
        on_change: ChangeHook | None = None,
    ) -> None:
        self._repository = repository
        self._cipher = cipher
        self._hasher = hasher
        self._store = store
        self._now = now
        self._on_change = on_change

    async def _changed(self, kind: str, object_id: str) -> None:
        """A committed change: tell the other processes, when there is a way to."""
        if self._on_change is not None:
            await self._on_change(kind, object_id)

    @property
    def cipher(self) -> KeyCipher:
        """The cipher for upstream keys (the start-up key check uses it too)."""
        return self._cipher

    # -- projects ---------------------------------------------------------------

    async def create_project(
        self,
        *,
        name: str,
        api_key: str,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        max_concurrent: int | None = None,
        allowed_origins: Sequence[object] = (),
        require_origin: bool = False,
        cache_ttl_seconds: int | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> Project:
        """Create an active project; its upstream key is stored encrypted.

        `policy`: the defaults its tokens can only narrow (`management.policy`).
        """
        _check_max_concurrent(max_concurrent)
        _check_cache_ttl(cache_ttl_seconds)
        origins = _valid_origins(allowed_origins)
        defaults = _policy(None, policy or {}, bind=False)
        now = self._now()
        project = Project(
            id=str(uuid.uuid4()),
            name=_valid_name(name),
            description=_valid_description(description),
            metadata=_valid_metadata(metadata),
            encrypted_api_key=self._cipher.encrypt(_valid_api_key(api_key)),
            api_key_hint=mask_api_key(api_key),
            is_active=True,
            created_at=now,
            updated_at=now,
            max_concurrent=max_concurrent,
            allowed_origins=origins,
            require_origin=require_origin,
            cache_ttl_seconds=cache_ttl_seconds,
            policy=defaults,
        )
        try:
            await self._repository.create_project(project)
        except DuplicateNameError:
            raise Conflict(
                f"A project named {name!r} already exists.", param="name"
            ) from None
        self._store.put_project(project)
        await self._changed("project", project.id)
        return project

    async def get_project(self, project_id: str) -> Project:
        """One project, or NotFound."""
        project = await self._repository.get_project(project_id)
        if project is None:
            raise NotFound(f"No project with id {project_id!r}.", param="project_id")
        return project

    async def list_projects(
        self, *, limit: int, offset: int, search: str | None = None
    ) -> Page[Project]:
        """A page of projects in creation order."""
        if search is not None:
            _no_nul("search", search)
        items = await self._repository.list_projects(
            limit=limit, offset=offset, search=search
        )
        total = await self._repository.count_projects(search=search)
        return Page(items, total, limit, offset)

    async def update_project(
        self,
        project_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        is_active: bool | None = None,
        max_concurrent: int | None = None,
        clear_max_concurrent: bool = False,
        allowed_origins: Sequence[object] | None = None,
        require_origin: bool | None = None,
        cache_ttl_seconds: int | None = None,
        clear_cache_ttl_seconds: bool = False,
        policy: Mapping[str, Any] | None = None,
    ) -> Project:
        """Change fields; a new key is encrypted; applies to the next request.

        `clear_max_concurrent` removes the project's own cap (the default applies),
        `clear_cache_ttl_seconds` its cache setting; an empty `allowed_origins` its
        own origins (CORS_ALLOWED_ORIGINS apply). `policy`: the default fields to
        change, the others are kept (null clears one).
        """
        _check_max_concurrent(max_concurrent)
        _check_cache_ttl(cache_ttl_seconds)
        origins = None if allowed_origins is None else _valid_origins(allowed_origins)
        defaults: TokenPolicy | None = None
        if policy:
            current = (await self.get_project(project_id)).policy
            defaults = _policy(current, policy, bind=False)
        changes = ProjectChanges(
            name=None if name is None else _valid_name(name),
            description=None
            if description is None
            else _valid_description(description),
            metadata=None if metadata is None else _valid_metadata(metadata),
            encrypted_api_key=None
            if api_key is None
            else self._cipher.encrypt(_valid_api_key(api_key)),
            api_key_hint=None if api_key is None else mask_api_key(api_key),
            is_active=is_active,
            max_concurrent=max_concurrent,
            clear_max_concurrent=clear_max_concurrent,
            allowed_origins=origins,
            require_origin=require_origin,
            cache_ttl_seconds=cache_ttl_seconds,
            clear_cache_ttl_seconds=clear_cache_ttl_seconds,
            policy=defaults,
            clear_policy=bool(policy) and defaults is None,
        )
        try:
            project = await self._repository.update_project(
                project_id, changes, now=self._now()
            )
        except DuplicateNameError:
            raise Conflict(
                f"A project named {name!r} already exists.", param="name"
            ) from None
        if project is None:
            raise NotFound(f"No project with id {project_id!r}.", param="project_id")
        self._store.put_project(project)
        await self._changed("project", project.id)
        return project

    async def delete_project(self, project_id: str) -> None:
        """Delete the project and all of its tokens (they stop working at once)."""
        if not await self._repository.delete_project(project_id):
            raise NotFound(f"No project with id {project_id!r}.", param="project_id")
        self._store.remove_project(project_id)
        await self._changed("project", project_id)

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        """Revoke every token of a project."""
        await self.get_project(project_id)
        counts = await self._repository.revoke_project_tokens(project_id)
        self._store.remove_tokens_of(project_id)
        await self._changed("project", project_id)
        return counts

    # -- tokens -----------------------------------------------------------------

    async def create_token(
        self,
        *,
        project_id: str,
        duration_minutes: int,
        max_requests: int | None = None,
        rate_limit_per_hour: int | None = None,
        max_concurrent: int | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> NewToken:
        """Mint a token for an active project; its value is returned only here.

        `policy`: what the token may send (`management.policy`), within its project's
        defaults.
        """
        _check_range("duration_minutes", duration_minutes, 1, MAX_DURATION_MINUTES)
        if max_requests is not None:
            _check_range("max_requests", max_requests, 1, 2**31 - 1)
        if rate_limit_per_hour is not None:
            _check_range("rate_limit_per_hour", rate_limit_per_hour, 1, 2**31 - 1)
        _check_max_concurrent(max_concurrent)
        narrowed = _policy(None, policy or {}, bind=True)
        project = await self.get_project(project_id)
        if not project.is_active:
            raise Forbidden(
                "Cannot create tokens for an inactive project.", param="project_id"
            )
        now = self._now()
        value = generate_token()
        token = Token(
            id=str(uuid.uuid4()),
            token_hash=self._hasher.hash(value),
            token_hint=token_hint(value),
            project_id=project_id,
            expires_at=now + timedelta(minutes=duration_minutes),
            is_active=True,
            request_count=0,
            max_requests=max_requests,
            rate_limit_per_hour=rate_limit_per_hour,
            created_at=now,
            last_used_at=None,
            max_concurrent=max_concurrent,
            policy=narrowed,
        )
        await self._repository.create_token(token)
        self._store.put_token(token)
        await self._changed("token", token.id)
        return NewToken(token, value)

    async def get_token(self, token_id: str) -> Token:
        """One token by its public id, or NotFound."""
        token = await self._repository.get_token(token_id)
        if token is None:
            raise NotFound(f"No token with id {token_id!r}.", param="token_id")
        return token

    async def list_tokens(
        self, token_filter: TokenFilter, *, limit: int, offset: int
    ) -> Page[Token]:
        """A page of tokens, newest first."""
        now = self._now()
        items = await self._repository.list_tokens(
            token_filter, now=now, limit=limit, offset=offset
        )
        total = await self._repository.count_tokens(token_filter, now=now)
        return Page(items, total, limit, offset)

    async def find_token_by_value(self, value: str) -> Token:
        """The token whose value this is, or NotFound (the value is never echoed)."""
        token = await self._repository.get_token_by_hash(self._hasher.hash(value))
        if token is None:
            raise NotFound("No token has this value.", param="token")
        return token

    async def revoke_token(self, token_id: str) -> None:
        """Revoke by id; idempotent for a revoked token, NotFound for an unknown id."""
        self._store.remove_token(token_id)
        if not await self._repository.revoke_token(token_id):
            raise NotFound(f"No token with id {token_id!r}.", param="token_id")
        await self._changed("token", token_id)


def _check_range(param: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ServiceError(
            f"{param} must be between {low} and {high}, got {value}.", param=param
        )


def _policy(
    current: TokenPolicy | None, fields: Mapping[str, Any], *, bind: bool
) -> TokenPolicy | None:
    """The policy `fields` make of `current`; a broken rule is a ServiceError."""
    try:
        return changed_policy(current, fields, bind=bind)
    except PolicyError as exc:
        raise ServiceError(exc.message, param=exc.param) from None


def _check_max_concurrent(value: int | None) -> None:
    if value is not None:
        _check_range("max_concurrent", value, 1, 2**31 - 1)


def _check_cache_ttl(value: int | None) -> None:
    if value is not None:
        _check_range("cache_ttl_seconds", value, 0, MAX_CACHE_TTL_SECONDS)


def _has_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character anywhere (keys included)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _no_nul(param: str, value: Any) -> None:
    """PostgreSQL text and JSONB cannot hold NUL: refuse it for every backend alike."""
    if _has_nul(value):
        raise ServiceError(f"{param} must not contain NUL characters.", param=param)


def _valid_name(name: str) -> str:
    name = name.strip()
    _no_nul("name", name)
    if not name or len(name) > MAX_NAME_CHARS:
        raise ServiceError(
            f"name must be 1 to {MAX_NAME_CHARS} characters.", param="name"
        )
    return name


def _valid_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    data = dict(metadata or {})
    _no_nul("metadata", data)
    return data


def _valid_description(description: str) -> str:
    _no_nul("description", description)
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise ServiceError(
            f"description must be at most {MAX_DESCRIPTION_CHARS} characters.",
            param="description",
        )
    return description


def _valid_origins(origins: Sequence[object]) -> tuple[str, ...]:
    """Browser origins in their canonical form (see llm_proxy.origins)."""
    if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
        raise ServiceError(
            "allowed_origins must be an array of strings.", param="allowed_origins"
        )
    try:
        return parse_origins(str(origin) for origin in origins)
    except OriginError as exc:
        raise ServiceError(
            f"allowed_origins: {exc}.", param="allowed_origins"
        ) from None


def _valid_api_key(api_key: str) -> str:
    api_key = api_key.strip()
    _no_nul("openai_api_key", api_key)
    if len(api_key) < 8 or any(c.isspace() for c in api_key):
        raise ServiceError(
            "openai_api_key must be a key of at least 8 characters without spaces.",
            param="openai_api_key",
        )
    if "..." in api_key or "***" in api_key:
        raise ServiceError(
            "openai_api_key looks masked; send the full key.", param="openai_api_key"
        )
    return api_key
