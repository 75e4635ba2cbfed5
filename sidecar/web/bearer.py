"""Machine clients at the HTTP layer: the bearer token a request presents, and the RFC 6750
§3 answers when it is not good enough (docs/machine-clients.md)."""

from __future__ import annotations

import logging

from aiohttp import web

from sidecar.audit import audit
from sidecar.web.authenticate import requester

__all__ = ["insufficient_scope", "invalid_token", "presented_token"]

log = logging.getLogger("sidecar.login")


def presented_token(request: web.BaseRequest) -> str | None:
    """The token of the one `Authorization: Bearer <token>` header, or None (none, another
    scheme, or several headers: nothing to go on)."""
    values = request.headers.getall("Authorization", ())
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip(" ")
    return token if scheme.lower() == "bearer" and token else None


def invalid_token(description: str) -> web.Response:
    """401 for a missing, malformed, expired or otherwise invalid token (RFC 6750 §3.1)."""
    challenge = (
        'Bearer realm="auth-sidecar", error="invalid_token", '
        f'error_description="{_quoted(description)}"'
    )
    return web.json_response(
        {"error": "invalid_token", "error_description": description},
        status=401,
        headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"},
    )


def insufficient_scope(request: web.Request, scope: str, issuer: str, subject: str) -> web.Response:
    """403 for a valid token the rules do not let through (RFC 6750 §3.1)."""
    log.info("access denied", extra={"user": subject, "scope": scope, "caller": "bearer"})
    audit(
        "access_denied", iss=issuer, sub=subject, scope=scope, caller="bearer", **requester(request)
    )
    challenge = 'Bearer realm="auth-sidecar", error="insufficient_scope"'
    return web.json_response(
        {"error": "insufficient_scope", "error_description": "not allowed here"},
        status=403,
        headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"},
    )


def _quoted(text: str) -> str:
    """Safe inside a quoted-string: the descriptions are ours, but never trust a quote."""
    return "".join(c for c in text if c not in '"\\' and " " <= c < "\x7f")
