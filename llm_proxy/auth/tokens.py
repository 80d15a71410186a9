"""The in-memory token table the proxy authenticates against, with no database I/O.

`TokenStore` holds every unrevoked token (expired ones too, so they keep answering
`token_expired`) keyed by the HMAC of its value, and each project's decrypted upstream
key; `auth.sync.TokenSync` fills it from the repository and the management service
updates it at once. Each entry remembers the change marker of the row it was built
from, so a resync passes over unchanged rows without converting them, and neither the
reloads nor the usage flush walk the whole table in one loop slice. Lifetime quotas
are reserved synchronously here (no await between check and increment), so they are
exact within a process. A reservation is pending until its call ends: `spend` counts
it (the call reached the upstream), `refund` drops it, and only spent requests go to
the database, so `request_count` never shows a request the proxy refused; `take_usage`
hands the counts to the flush, also those of tokens revoked or deleted meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Final

from ..clock import Clock
from ..domain_errors import ErrorKind
from ..origins import OriginRule
from ..storage.base import Deletion, Project, Token, TokenPolicy, TokenUsage
from .crypto import DecryptionError, KeyCipher, TokenHasher
from .errors import AuthError, quota_spent
from .origin_index import OriginIndex
from .policy import CallPolicy, compile_policy, merge_policies

log = logging.getLogger(__name__)


# Table entries a resync's sweep examines per loop slice (about 50 ns each), when the
# resync did not see every entry again (a token gone without its tombstone).
SWEEP_ENTRIES: Final = 2000


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
    # Changes with every change of the project (its key, activation, settings): the
    # response cache keys on it, so a rotated key never reads the old answers.
    project_generation: str = ""
    project_cache_ttl_s: int | None = None  # the project's cache_ttl_seconds
    origins: OriginRule | None = None  # its project's browser origins, if it has any
    policy: CallPolicy | None = None  # its project's defaults narrowed by its own


@dataclass(slots=True)
class _TokenEntry:
    token_id: str
    project_id: str
    expires_at: float
    max_requests: int | None
    rate_limit_per_hour: int | None
    stored_count: int  # request_count as known to be in the database
    unflushed: int = 0  # spent here, not yet handed to the flusher
    # Reserved by calls still under way: each is spent or refunded at its call's end.
    pending: int = 0
    last_used_at: float = 0.0
    principal: Principal | None = None
    seen: int = 0  # the resync generation that last saw this token
    max_concurrent: int | None = None
    change_seq: int | None = None  # the marker of the row applied; None: unknown
    principal_of: _ProjectEntry | None = None  # the project `principal` was built for
    policy: CallPolicy | None = None

    @property
    def used(self) -> int:
        return self.stored_count + self.unflushed + self.pending


@dataclass(slots=True)
class _ProjectEntry:
    is_active: bool
    envelope: str
    authorization: str = field(repr=False)
    seen: int = 0  # the resync generation that last saw this project
    max_concurrent: int | None = None
    origins: OriginRule | None = None
    generation: str = ""  # see Principal.project_generation
    cache_ttl_s: int | None = None
    stored_policy: TokenPolicy | None = None
    policy: CallPolicy | None = None  # `stored_policy` compiled


def project_generation(project: Project) -> str:
    """A digest of the project's key envelope and last change (never of the key)."""
    stamp = f"{project.encrypted_api_key}|{project.updated_at.timestamp()!r}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:32]


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
        self._hashes_by_project: dict[str, set[str]] = {}
        self._flushing: dict[str, int] = {}
        # Counts of tokens dropped before their flush: token id -> (requests, last use).
        self._dropped_usage: dict[str, tuple[int, float]] = {}
        # The entries counted since the last take_usage (token id -> entry), so a flush
        # looks at the tokens that were used, not at the whole table.
        self._used: dict[str, _TokenEntry] = {}
        self._generation = 0
        self._unseen = 0  # entries with seen < _generation (not seen by this resync)
        # The origins of every active project, for preflights (proxy/cors.py).
        self.origin_index = OriginIndex()

    def __len__(self) -> int:
        return len(self._by_hash)

    # -- snapshot maintenance -------------------------------------------------

    def put_projects(self, projects: Iterable[Project]) -> None:
        """Apply a page of changed projects."""
        for project in projects:
            self.put_project(project)

    def put_tokens(self, tokens: Iterable[Token]) -> None:
        """Apply a page of changed tokens (revoked ones are removed)."""
        for token in tokens:
            self.put_token(token)

    def apply_deletions(self, deletions: Iterable[Deletion]) -> None:
        """Forget deleted tokens and projects (tombstones)."""
        for deletion in deletions:
            if deletion.kind == "project":
                self.remove_project(deletion.id)
            else:
                self.remove_token(deletion.id)

    def begin_resync(self) -> int:
        """Start a full resync: what it does not see again is swept afterwards."""
        self._generation += 1
        self._unseen = len(self._by_hash)
        return self._generation

    @property
    def unseen(self) -> int:
        """How many tokens the resync in progress (or the last one) has not seen."""
        return self._unseen

    def unchanged(self, token_hash: str, change_seq: int) -> bool:
        """True, and the token counts as seen, when the table holds this row version.

        For `Repository.load_tokens_changed_since`, which then skips the row.
        """
        entry = self._by_hash.get(token_hash)
        if entry is None or entry.change_seq != change_seq:
            return False
        self._see(entry)
        return True

    def token_hashes(self) -> list[str]:
        """A copy of the table's keys (one slice of several ms at 200,000 tokens)."""
        return list(self._by_hash)

    def unseen_token_hashes(self, generation: int) -> Iterator[list[str]]:
        """The keys of entries not seen since `generation` began, SWEEP_ENTRIES
        entries examined per list; RuntimeError when the table changed size between
        two lists (what was found stays valid; `sweep_tokens` re-checks each)."""
        items = iter(self._by_hash.items())
        while True:
            batch = list(islice(items, SWEEP_ENTRIES))
            yield [token_hash for token_hash, e in batch if e.seen < generation]
            if len(batch) < SWEEP_ENTRIES:
                return

    def sweep_tokens(self, token_hashes: Iterable[str], generation: int) -> None:
        """Drop those of `token_hashes` not seen since `generation` began (deleted)."""
        for token_hash in token_hashes:
            entry = self._by_hash.get(token_hash)
            if entry is not None and entry.seen < generation:
                self._drop(token_hash)

    def sweep_projects(self, generation: int) -> None:
        """Drop the projects not seen since `generation` began (deleted)."""
        gone = [pid for pid, p in self._projects.items() if p.seen < generation]
        for project_id in gone:
            self.remove_project(project_id)

    def put_project(self, project: Project) -> None:
        """Add or refresh a project; the key is decrypted only when it changed.

        A change the principals carry (the key, max_concurrent, origins) makes a new
        entry: each token's principal is rebuilt on its next use, without a walk over
        the project's tokens here.
        """
        known = self._projects.get(project.id)
        generation = project_generation(project)
        origins = OriginRule.of(
            project.allowed_origins, require_origin=project.require_origin
        )
        listed = project.allowed_origins if project.is_active else ()
        self.origin_index.set(project.id, listed)
        if known is not None and known.envelope == project.encrypted_api_key:
            known.is_active = project.is_active
            known.seen = self._generation
            if (
                known.max_concurrent != project.max_concurrent
                or known.generation != generation
                or known.cache_ttl_s != project.cache_ttl_seconds
                or known.origins != origins
                or known.stored_policy != project.policy
            ):
                self._projects[project.id] = _ProjectEntry(
                    known.is_active,
                    known.envelope,
                    known.authorization,
                    seen=self._generation,
                    max_concurrent=project.max_concurrent,
                    generation=generation,
                    cache_ttl_s=project.cache_ttl_seconds,
                    origins=origins,
                    stored_policy=project.policy,
                    policy=compile_policy(project.policy),
                )
            return
        try:
            key = self._cipher.decrypt(project.encrypted_api_key)
        except DecryptionError:
            log.error("cannot decrypt the upstream key of project %s", project.id)
            self._projects.pop(project.id, None)
            self.origin_index.discard(project.id)
            return
        self._projects[project.id] = _ProjectEntry(
            project.is_active,
            project.encrypted_api_key,
            f"Bearer {key}",
            seen=self._generation,
            max_concurrent=project.max_concurrent,
            generation=generation,
            cache_ttl_s=project.cache_ttl_seconds,
            origins=origins,
            stored_policy=project.policy,
            policy=compile_policy(project.policy),
        )

    def remove_project(self, project_id: str) -> None:
        """Forget a deleted project and every token of it."""
        self._projects.pop(project_id, None)
        self.origin_index.discard(project_id)
        self.remove_tokens_of(project_id)

    def remove_tokens_of(self, project_id: str) -> None:
        """Forget every token of a project (bulk revocation)."""
        for token_hash in list(self._hashes_by_project.get(project_id, ())):
            self._drop(token_hash)

    def put_token(self, token: Token) -> None:
        """Add or refresh a token; a revoked one is removed.

        A row version already applied (same `change_seq`) only counts as seen.
        """
        if not token.is_active:
            self.remove_token(token.id)
            return
        entry = self._by_hash.get(token.token_hash)
        if (
            entry is not None
            and token.change_seq is not None
            and entry.change_seq == token.change_seq
        ):
            self._see(entry)
            return
        stored = token.request_count + self._flushing.get(token.id, 0)
        if entry is None:
            entry = _TokenEntry(
                token.id,
                token.project_id,
                token.expires_at.timestamp(),
                token.max_requests,
                token.rate_limit_per_hour,
                stored,
                seen=self._generation,
                max_concurrent=token.max_concurrent,
                change_seq=token.change_seq,
                policy=compile_policy(token.policy),
            )
            self._by_hash[token.token_hash] = entry
            self._hash_by_id[token.id] = token.token_hash
            self._hashes_by_project.setdefault(token.project_id, set()).add(
                token.token_hash
            )
            return
        entry.expires_at = token.expires_at.timestamp()
        entry.max_requests = token.max_requests
        entry.rate_limit_per_hour = token.rate_limit_per_hour
        entry.max_concurrent = token.max_concurrent
        entry.policy = compile_policy(token.policy)
        entry.stored_count = max(entry.stored_count, stored)  # counts only grow
        entry.principal = None
        entry.change_seq = token.change_seq
        self._see(entry)

    def _see(self, entry: _TokenEntry) -> None:
        if entry.seen < self._generation:
            entry.seen = self._generation
            self._unseen -= 1

    def remove_token(self, token_id: str) -> None:
        """Forget a revoked or deleted token: its next request is refused."""
        token_hash = self._hash_by_id.get(token_id)
        if token_hash is not None:
            self._drop(token_hash)

    def _drop(self, token_hash: str) -> None:
        """Forget a token, keeping its counted requests for the next flush."""
        entry = self._by_hash.pop(token_hash, None)
        if entry is None:
            return
        if entry.seen < self._generation:
            self._unseen -= 1
        self._used.pop(entry.token_id, None)
        self._hash_by_id.pop(entry.token_id, None)
        hashes = self._hashes_by_project.get(entry.project_id)
        if hashes is not None:
            hashes.discard(token_hash)
            if not hashes:
                del self._hashes_by_project[entry.project_id]
        if entry.unflushed:
            self._keep_dropped_usage(
                entry.token_id, entry.unflushed, entry.last_used_at
            )
            entry.unflushed = 0

    def _keep_dropped_usage(self, token_id: str, requests: int, at: float) -> None:
        known, last = self._dropped_usage.get(token_id, (0, 0.0))
        self._dropped_usage[token_id] = (known + requests, max(last, at))

    # -- the request path (synchronous, O(1)) ---------------------------------

    def authenticate(self, token_value: str | None) -> Principal:
        """Check a presented token (None: the call had none) and reserve one request
        of its quota; `AuthError` says why it is refused."""
        if token_value is None:
            raise AuthError(
                "Missing proxy token: send 'Authorization: Bearer <token>'.",
                code="missing_api_key",
            )
        entry = self._by_hash.get(self._hasher.hash(token_value))
        if entry is None:
            raise AuthError("Invalid or revoked token.")
        now = self.clock()
        if now >= entry.expires_at:
            raise AuthError("This token has expired.", code="token_expired")
        project = self._projects.get(entry.project_id)
        if project is None or not project.is_active:
            raise AuthError(
                "The token's project is inactive.",
                kind=ErrorKind.FORBIDDEN,
                code="project_inactive",
            )
        if entry.max_requests is not None and entry.used >= entry.max_requests:
            raise quota_spent()
        entry.pending += 1
        entry.last_used_at = now
        principal = entry.principal
        if principal is None or entry.principal_of is not project:
            principal = entry.principal = Principal(
                entry.token_id,
                entry.project_id,
                project.authorization,
                entry.rate_limit_per_hour,
                entry.max_requests,
                entry.max_concurrent,
                project.max_concurrent,
                project.generation,
                project.cache_ttl_s,
                project.origins,
                merge_policies(project.policy, entry.policy),
            )
            entry.principal_of = project
        return principal

    def spend(self, principal: Principal) -> None:
        """Count a reserved request whose call reached the upstream, for the flush.

        Once per reservation, when its call ends; a token revoked or deleted meanwhile
        still gets it written.
        """
        entry = self._by_id(principal.token_id)
        if entry is None:
            self._keep_dropped_usage(principal.token_id, 1, self.clock())
            return
        if entry.pending:
            entry.pending -= 1
        if not entry.unflushed:
            self._used[entry.token_id] = entry
        entry.unflushed += 1

    def refund(self, principal: Principal) -> None:
        """Give back a reserved request that never reached the upstream.

        Once per reservation; the database never saw it (only spent requests are
        flushed), so it is simply available again.
        """
        entry = self._by_id(principal.token_id)
        if entry is not None and entry.pending:
            entry.pending -= 1

    def quota_basis(self, token_id: str) -> tuple[int, float] | None:
        """(requests in the database, expiry as a Unix time): seeds a fleet counter.

        Without the requests pending or unflushed here: those waiting for a fleet
        lease are not admitted yet, and the fleet counts the others itself.
        """
        entry = self._by_id(token_id)
        return None if entry is None else (entry.stored_count, entry.expires_at)

    # -- usage flushing -------------------------------------------------------

    def take_usage(self) -> list[TokenUsage]:
        """Hand counted requests to the flusher; call `usage_stored` after writing."""
        batch: list[TokenUsage] = []
        for token_id, (requests, last) in self._dropped_usage.items():
            at = datetime.fromtimestamp(last, UTC)
            batch.append(TokenUsage(token_id, requests, at))
        self._dropped_usage.clear()
        for entry in self._used.values():
            if entry.unflushed:
                at = datetime.fromtimestamp(entry.last_used_at, UTC)
                batch.append(TokenUsage(entry.token_id, entry.unflushed, at))
                self._flushing[entry.token_id] = (
                    self._flushing.get(entry.token_id, 0) + entry.unflushed
                )
                entry.stored_count += entry.unflushed
                entry.unflushed = 0
        self._used.clear()
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
                self._used[entry.token_id] = entry
            else:  # dropped meanwhile (or before the batch was taken)
                at = usage.last_used_at.timestamp()
                self._keep_dropped_usage(usage.token_id, usage.requests, at)

    def _by_id(self, token_id: str) -> _TokenEntry | None:
        token_hash = self._hash_by_id.get(token_id)
        return self._by_hash.get(token_hash) if token_hash else None
