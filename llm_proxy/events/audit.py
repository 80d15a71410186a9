"""The audit record as it travels on the audit bus: who did what to which object.

An action of the management API or the admin pages (or a refused sign-in) is a
different kind of event than a proxied call: it has an actor, an outcome and a target,
and it travels on a bus of its own (on Redis, its own stream), so traffic never
crowds it out and the traffic's backends never see it. It carries no secret: values of
tokens, keys and passwords are never put into it, only ids and field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .model import BaseEvent


@dataclass(slots=True, kw_only=True)
class AuditRecorded(BaseEvent):
    """One audited action; `event_id` is its id, `timestamp` when it happened."""

    type_tag: ClassVar[str] = "audit"

    action: str  # `project.create`, `token.revoke`, `auth.failed`, ...
    actor: str  # `management_api`, the admin user name, or who a sign-in claimed
    # success: done; failure: a rule refused it; denied: the credentials were
    # refused; error: the proxy failed while doing it.
    outcome: str
    client_ip: str | None = None
    request_id: str | None = None
    project_id: str | None = None
    token_id: str | None = None
    reason: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
