"""The admin pages (`/admin/*`): an HTML sub-app over the management service."""

from __future__ import annotations

from .app import create_admin_app

__all__ = ["create_admin_app"]
