"""CSRF defence for requests the session cookie authenticates (docs/security.md, "CSRF").

A cookie is sent with every request to this site, whoever caused it; a state-changing
request counts only when the browser says it comes from this site: `Sec-Fetch-Site:
same-origin` (or `none`: typed by the user), or an `Origin` that is this site's or one of
`csrf.allowed_origins`. SameSite=Lax alone lets same-site pages (a sibling subdomain) through.
Bearer-token requests carry no ambient authority and are not checked.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from yarl import URL

from sidecar.config import Config

__all__ = ["SAFE_METHODS", "CsrfPolicy"]

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfPolicy:
    """`allows(request)`: whether a cookie-authenticated request may proceed."""

    __slots__ = ("_enabled", "_origins")

    def __init__(self, config: Config) -> None:
        self._enabled = config.csrf.enabled
        self._origins = frozenset(
            {str(URL(config.server.public_url).origin()), *config.csrf.allowed_origins}
        )

    def allows(self, request: web.BaseRequest) -> bool:
        if not self._enabled or request.method in SAFE_METHODS:
            return True
        headers = request.headers
        if headers.get("Sec-Fetch-Site") in ("same-origin", "none"):
            return True
        return headers.get("Origin") in self._origins
