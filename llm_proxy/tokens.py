"""The in-memory token table the proxy authenticates against, with no database I/O.

`TokenStore` holds a snapshot of live tokens keyed by the HMAC of their value and each
project's decrypted upstream key. It is warmed at start, reloaded in the background, and
updated at once by the management service. Lifetime quotas are reserved synchronously
here (no await between check and increment), so they are exact within a process; the
counts are flushed to the repository in batches by `UsageFlusher`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .crypto import DecryptionError, KeyCipher, TokenHasher
from .repository import Project, Repository, Token, TokenUsage

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class AuthFailure(Exception):
    """Why a token was refused: `status` 401/403/429 and a machine `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a proxied request acts for; set on the request by token auth."""

    token_id: str
    project_id: str
    upstream_authorization: str = field(repr=False)  # "Bearer <project key>"
    rate_limit_per_hour: int | None
    max_requests: int | None
    max_concurrent: int | None = None  # the token's own cap on calls in flight
    project_max_concurrent: int | None = None  # its project's


@dataclass(slots=True)
class _TokenEntry:
    token_id: str
    project_id: str
    expires_at: float
    max_requests: int | None
    rate_limit_per_hour: int | None
    stored_count: int  # request_count as known to be in the database
    unflushed: int = 0  # counted here, not yet handed to the flusher
    last_used_at: float = 0.0
    principal: Principal | None = None
    max_concurrent: int | None = None

    @property
    def used(self) -> int:
        return self.stored_count + self.unflushed


@dataclass(slots=True)
class _ProjectEntry:
    is_active: bool
    envelope: str
    authorization: str = field(repr=False)
    max_concurrent: int | None = None


class TokenStore:
    """Token and project snapshot for authentication and quota reservation."""

    def __init__(
        self, hasher: TokenHasher, cipher: KeyCipher, clock: Clock = time.time
    ):
        self._hasher = hasher
        self._cipher = cipher
        self.clock = clock
        self._by_hash: dict[str, _TokenEntry] = {}
        self._hash_by_id: dict[str, str] = {}
        self._projects: dict[str, _ProjectEntry] = {}
        self._flushing: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    # -- snapshot maintenance -------------------------------------------------

    def load(self, tokens: Iterable[Token], projects: Iterable[Project]) -> None:
        """Replace the snapshot (a full reload), keeping counts not yet stored."""
        for project in projects:
            self.put_project(project)
        fresh = {token.token_hash: token for token in tokens}
        for token_hash in set(self._by_hash) - set(fresh):
            self._drop(token_hash)
        for token in fresh.values():
            self.put_token(token)

    def put_project(self, project: Project) -> None:
        """Add or refresh a project; the key is decrypted only when it changed."""
        known = self._projects.get(project.id)
        if known is not None and known.envelope == project.encrypted_api_key:
            known.is_active = project.is_active
            if known.max_concurrent != project.max_concurrent:
                known.max_concurrent = project.max_concurrent
                self._forget_principals(project.id)
            return
        try:
            key = self._cipher.decrypt(project.encrypted_api_key)
        except DecryptionError:
            log.error("cannot decrypt the upstream key of project %s", project.id)
            self._projects.pop(project.id, None)
            return
        self._projects[project.id] = _ProjectEntry(
            project.is_active,
            project.encrypted_api_key,
            f"Bearer {key}",
            project.max_concurrent,
        )
        self._forget_principals(project.id)

    def remove_project(self, project_id: str) -> None:
        """Forget a deleted project and every token of it."""
        self._projects.pop(project_id, None)
        self.remove_tokens_of(project_id)

    def remove_tokens_of(self, project_id: str) -> None:
        """Forget every token of a project (bulk revocation)."""
        for token_hash, entry in list(self._by_hash.items()):
            if entry.project_id == project_id:
                self._drop(token_hash)

    def put_token(self, token: Token) -> None:
        """Add or refresh a token; a revoked one is removed."""
        if not token.is_active:
            self.remove_token(token.id)
            return
        entry = self._by_hash.get(token.token_hash)
        stored = token.request_count + self._flushing.get(token.id, 0)
        if entry is None:
            entry = _TokenEntry(
                token.id,
                token.project_id,
                token.expires_at.timestamp(),
                token.max_requests,
                token.rate_limit_per_hour,
                stored,
                max_concurrent=token.max_concurrent,
            )
            self._by_hash[token.token_hash] = entry
            self._hash_by_id[token.id] = token.token_hash
            return
        entry.expires_at = token.expires_at.timestamp()
        entry.max_requests = token.max_requests
        entry.rate_limit_per_hour = token.rate_limit_per_hour
        entry.max_concurrent = token.max_concurrent
        entry.stored_count = max(entry.stored_count, stored)  # counts only grow
        entry.principal = None

    def remove_token(self, token_id: str) -> None:
        """Forget a revoked or deleted token: its next request is refused."""
        token_hash = self._hash_by_id.get(token_id)
        if token_hash is not None:
            self._drop(token_hash)

    def _drop(self, token_hash: str) -> None:
        entry = self._by_hash.pop(token_hash, None)
        if entry is not None:
            self._hash_by_id.pop(entry.token_id, None)

    def _forget_principals(self, project_id: str) -> None:
        for entry in self._by_hash.values():
            if entry.project_id == project_id:
                entry.principal = None

    # -- the request path (synchronous, O(1)) ---------------------------------

    def authenticate(self, token_value: str) -> Principal:
        """Check a presented token and reserve one request of its quota."""
        entry = self._by_hash.get(self._hasher.hash(token_value))
        if entry is None:
            raise AuthFailure(401, "invalid_api_key", "Invalid or revoked token.")
        now = self.clock()
        if now >= entry.expires_at:
            raise AuthFailure(401, "token_expired", "This token has expired.")
        project = self._projects.get(entry.project_id)
        if project is None or not project.is_active:
            raise AuthFailure(
                403, "project_inactive", "The token's project is inactive."
            )
        if entry.max_requests is not None and entry.used >= entry.max_requests:
            raise AuthFailure(
                429, "quota_exceeded", "This token has used all of its requests."
            )
        entry.unflushed += 1
        entry.last_used_at = now
        if entry.principal is None:
            entry.principal = Principal(
                entry.token_id,
                entry.project_id,
                project.authorization,
                entry.rate_limit_per_hour,
                entry.max_requests,
                entry.max_concurrent,
                project.max_concurrent,
            )
        return entry.principal

    def refund(self, principal: Principal) -> None:
        """Give back a reserved request that never reached the upstream."""
        token_hash = self._hash_by_id.get(principal.token_id)
        entry = self._by_hash.get(token_hash) if token_hash else None
        if entry is not None and entry.unflushed > 0:
            entry.unflushed -= 1

    # -- usage flushing -------------------------------------------------------

    def take_usage(self) -> list[TokenUsage]:
        """Hand counted requests to the flusher; call `usage_stored` after writing."""
        batch: list[TokenUsage] = []
        for entry in self._by_hash.values():
            if entry.unflushed:
                at = datetime.fromtimestamp(entry.last_used_at, UTC)
                batch.append(TokenUsage(entry.token_id, entry.unflushed, at))
                self._flushing[entry.token_id] = (
                    self._flushing.get(entry.token_id, 0) + entry.unflushed
                )
                entry.stored_count += entry.unflushed
                entry.unflushed = 0
        return batch

    def usage_stored(self, batch: Iterable[TokenUsage]) -> None:
        """The batch is in the database: stop adding it to reloaded counts."""
        for usage in batch:
            left = self._flushing.get(usage.token_id, 0) - usage.requests
            if left > 0:
                self._flushing[usage.token_id] = left
            else:
                self._flushing.pop(usage.token_id, None)

    def usage_failed(self, batch: Iterable[TokenUsage]) -> None:
        """The write failed: count the batch again so the next flush retries it."""
        for usage in batch:
            entry = self._by_id(usage.token_id)
            self.usage_stored([usage])
            if entry is not None:
                entry.stored_count -= usage.requests
                entry.unflushed += usage.requests

    def _by_id(self, token_id: str) -> _TokenEntry | None:
        token_hash = self._hash_by_id.get(token_id)
        return self._by_hash.get(token_hash) if token_hash else None


class TokenSync:
    """Background work around a `TokenStore`: periodic reload and usage flushing."""

    def __init__(
        self,
        store: TokenStore,
        repository: Repository,
        *,
        reload_interval_s: float,
        flush_interval_s: float,
    ) -> None:
        self._store = store
        self._repository = repository
        self._reload_interval_s = reload_interval_s
        self._flush_interval_s = flush_interval_s
        self._tasks: list[asyncio.Task[None]] = []

    async def reload(self) -> None:
        """Load every live token and project from the repository."""
        now = datetime.now(UTC)
        tokens = await self._repository.load_live_tokens(now=now)
        projects = await self._repository.load_projects_for_auth()
        self._store.load(tokens, projects)

    async def flush(self) -> int:
        """Write counted requests to the repository; return how many were written."""
        batch = self._store.take_usage()
        if not batch:
            return 0
        try:
            await self._repository.record_token_usage(batch)
        except Exception:
            self._store.usage_failed(batch)
            raise
        self._store.usage_stored(batch)
        return sum(usage.requests for usage in batch)

    async def start(self) -> None:
        """Warm the snapshot, then keep it fresh and flush usage in the background."""
        await self.reload()
        self._tasks = [
            asyncio.create_task(self._every(self._reload_interval_s, self.reload)),
            asyncio.create_task(self._every(self._flush_interval_s, self.flush)),
        ]

    async def close(self) -> None:
        """Stop the loops, then flush what is left (nothing lost on a graceful stop)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.flush()

    @staticmethod
    async def _every(interval_s: float, work: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:
                log.exception("background token sync failed; retrying next interval")
