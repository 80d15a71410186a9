"""`BusAuditTrail`: audit records built from the request and put on the audit bus.

It adds what every record shares: the client's address (X-Forwarded-For only from
TRUSTED_PROXIES), the request id, the time. Publishing is the bus's `publish()`: it
never awaits and never raises, so an audited call is never slowed by the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import hdrs, web

from ..config import IpNetwork
from ..events.audit import AuditRecorded
from ..events.model import EventBus
from ..proxy.headers import client_address, request_id_of
from .throttle import FailureThrottle
from .trail import AUTH_FAILED

MAX_REASON_CHARS: Final = 300
REQUEST_ID_KEY: Final = web.RequestKey("audit_request_id", str)


class BusAuditTrail:
    """The app's `AuditTrail` (see `trail.py`) on an audit bus."""

    def __init__(
        self,
        bus: EventBus[AuditRecorded],
        trusted_proxies: tuple[IpNetwork, ...] = (),
        *,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self.bus = bus
        self._trusted = trusted_proxies
        self.throttle = throttle or FailureThrottle()
        self.recorded = 0

    def request_id(self, request: web.Request) -> str:
        found = request.get(REQUEST_ID_KEY)
        if found is None:
            found = request[REQUEST_ID_KEY] = request_id_of(request.headers)
        return found

    def record(
        self,
        request: web.Request,
        action: str,
        *,
        actor: str,
        outcome: str = "success",
        reason: str | None = None,
        project_id: str | None = None,
        token_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.recorded += 1
        self.bus.publish(
            AuditRecorded(
                action=action,
                actor=actor,
                outcome=outcome,
                client_ip=self._client(request),
                request_id=self.request_id(request),
                project_id=project_id,
                token_id=token_id,
                reason=None if reason is None else reason[:MAX_REASON_CHARS],
                metadata=dict(metadata or {}),
            )
        )

    def auth_failed(
        self, request: web.Request, *, surface: str, actor: str, reason: str
    ) -> None:
        held_back = self.throttle.admit(f"{surface} {self._client(request)}")
        if held_back is None:
            return
        metadata: dict[str, Any] = {"surface": surface}
        if held_back:
            metadata["suppressed_before"] = held_back
        self.record(
            request,
            AUTH_FAILED,
            actor=actor,
            outcome="denied",
            reason=reason,
            metadata=metadata,
        )

    def _client(self, request: web.Request) -> str | None:
        forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, None)
        joined = ",".join(forwarded) if forwarded else None
        return client_address(request.remote, joined, self._trusted)
