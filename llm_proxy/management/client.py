"""A small aiohttp client for the management API (`/manage/*`), used by `llm-proxy manage`.

It speaks the JSON shapes of `api.py` and turns error answers into `ManageApiError`
carrying the API's own message; it knows nothing about click or output formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from ..auth.crypto import TOKEN_PREFIX
from ..domain_errors import ProxyError

DEFAULT_TIMEOUT_S: Final = 30.0
JsonObject = dict[str, Any]


class ManageApiError(ProxyError):
    """The management API refused a call (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def __str__(self) -> str:
        if self.status == 0:
            return self.message
        code = f" {self.code}" if self.code else ""
        return f"{self.status}{code}: {self.message}"


def error_message(status: int, body: bytes) -> ManageApiError:
    """The API's OpenAI-shaped error as an exception (falls back to the raw text)."""
    try:
        error = orjson.loads(body)["error"]
        return ManageApiError(status, str(error["message"]), error.get("code"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip() or "no body"
        return ManageApiError(status, text[:200])


class ManageClient:
    """`async with ManageClient(base_url, token) as api: await api.list_projects()`."""

    def __init__(
        self, base_url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._root = URL(base_url.rstrip("/") + "/manage")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ManageClient:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=self._timeout
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """One API call: (decoded JSON or None, response headers); errors raise."""
        if self._session is None:
            raise RuntimeError("use ManageClient inside 'async with'")
        url = self._root / path.lstrip("/") if path else self._root
        data = None if body is None else orjson.dumps(dict(body))
        headers = None if data is None else {"Content-Type": "application/json"}
        try:
            async with self._session.request(
                method, url, data=data, params=params, headers=headers
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise error_message(response.status, raw)
                return (orjson.loads(raw) if raw else None), response.headers
        except aiohttp.ClientConnectionError as exc:
            raise ManageApiError(
                0, f"cannot reach the management API at {self._root.origin()}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise ManageApiError(
                0, f"the management API at {self._root.origin()} timed out"
            ) from exc

    # -- projects ----------------------------------------------------------------

    async def list_projects(
        self, *, limit: int = 100, offset: int = 0, search: str | None = None
    ) -> tuple[list[JsonObject], int]:
        """A page of projects and the total count."""
        params = {"limit": str(limit), "offset": str(offset)}
        if search:
            params["search"] = search
        items, headers = await self.call("GET", "projects", params=params)
        return items, int(headers.get("X-Total-Count", len(items)))

    async def get_project(self, project_id: str) -> JsonObject:
        """One project."""
        project, _ = await self.call("GET", f"projects/{project_id}")
        return dict(project)

    async def create_project(
        self,
        *,
        name: str,
        api_key: str,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> JsonObject:
        """Create a project; the upstream key travels only in the request body.

        `fields` are further fields of the body (`allowed_origins`, ...).
        """
        body: JsonObject = {"name": name, "openai_api_key": api_key, **fields}
        if description is not None:
            body["description"] = description
        if metadata is not None:
            body["metadata"] = dict(metadata)
        project, _ = await self.call("POST", "projects", body=body)
        return dict(project)

    async def update_project(
        self, project_id: str, changes: Mapping[str, Any]
    ) -> JsonObject:
        """PATCH the given fields."""
        project, _ = await self.call("PATCH", f"projects/{project_id}", body=changes)
        return dict(project)

    async def delete_project(self, project_id: str) -> None:
        """Delete a project and its tokens."""
        await self.call("DELETE", f"projects/{project_id}")

    # -- tokens ------------------------------------------------------------------

    async def create_token(
        self,
        *,
        project_id: str,
        duration_minutes: int,
        max_requests: int | None = None,
        rate_limit_per_hour: int | None = None,
        **fields: Any,
    ) -> JsonObject:
        """Mint a token; the answer is the only place its value ever appears.

        `fields` are further fields of the body (`bind`, `allowed_models`, ...).
        """
        body: JsonObject = {
            "project_id": project_id,
            "duration_minutes": duration_minutes,
            **fields,
        }
        if max_requests is not None:
            body["max_requests"] = max_requests
        if rate_limit_per_hour is not None:
            body["rate_limit_per_hour"] = rate_limit_per_hour
        token, _ = await self.call("POST", "tokens", body=body)
        return dict(token)

    async def list_tokens(
        self,
        *,
        project_id: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[JsonObject], int]:
        """A page of tokens (newest first) and the total count."""
        params = {"limit": str(limit), "offset": str(offset)}
        if project_id:
            params["project_id"] = project_id
        if active is not None:
            params["active"] = "true" if active else "false"
        items, headers = await self.call("GET", "tokens", params=params)
        return items, int(headers.get("X-Total-Count", len(items)))

    async def get_token(self, token: str) -> JsonObject:
        """One token (never its value), by its id or its value."""
        if is_token_value(token):  # in the body: a value never goes into a URL
            found, _ = await self.call("POST", "tokens/lookup", body={"token": token})
        else:
            found, _ = await self.call("GET", f"tokens/{token}")
        return dict(found)

    async def revoke_token(self, token: str) -> None:
        """Revoke a token by its id or its value (idempotent; unknown is a 404)."""
        if is_token_value(token):
            await self.call("DELETE", "tokens", body={"token": token})
        else:
            await self.call("DELETE", f"tokens/{token}")

    # -- audit -------------------------------------------------------------------

    async def list_audit(
        self, *, page: int = 1, page_size: int = 20, **filters: str | None
    ) -> JsonObject:
        """A page of audit events: `{"events": [...], "pagination": {...}}`."""
        params = {name: value for name, value in filters.items() if value}
        params |= {"page": str(page), "page_size": str(page_size)}
        found, _ = await self.call("GET", "audit", params=params)
        return dict(found)

    async def get_audit(self, event_id: str) -> JsonObject:
        """One audit event."""
        found, _ = await self.call("GET", f"audit/{event_id}")
        return dict(found)


def is_token_value(text: str) -> bool:
    """Whether `text` is a withering token's value rather than its id."""
    return text.startswith(TOKEN_PREFIX)
