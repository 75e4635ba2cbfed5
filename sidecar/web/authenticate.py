"""Who is asking: the session behind a request's cookie, and the answer for a request without
one (docs/architecture.md, "Failure policy"): a navigation goes to login, anything else gets
401 naming the login URL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Final

from aiohttp import web
from yarl import URL

from sidecar.audit import audit
from sidecar.logging import REQUEST_ID
from sidecar.session import Session
from sidecar.web.keys import COOKIES, FORWARDED, SESSIONS
from sidecar.web.responses import error_response, is_navigation

__all__ = [
    "START_PATH",
    "authenticate",
    "denied",
    "forbidden",
    "login_url",
    "redirect",
    "requester",
    "safe_return_path",
    "unauthenticated",
    "unauthorized_json",
]

log = logging.getLogger("sidecar.login")

START_PATH: Final = "/oauth2/start"
_MAX_RETURN_PATH: Final = 2048


def authenticate(request: web.Request) -> Awaitable[Session | None]:
    """The request's session (cookie → session id → the process cache or the store), or None
    when there is no cookie, or it names no live session, or it was tampered with.

    Returns the manager's coroutine rather than wrapping it: it is on every request's path.
    """
    return request.app[SESSIONS].current(request.app[COOKIES].session_id(request))


def safe_return_path(value: str | None) -> str:
    """`rd` only ever names a local path: no scheme, no `//host`, no `/\\host`, no controls."""
    if (
        not value
        or len(value) > _MAX_RETURN_PATH
        or not value.startswith("/")
        or value.startswith(("//", "/\\"))
        or "\\" in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        return "/"
    url = URL(value)
    if url.scheme or url.host:
        return "/"
    return value


def login_url(request: web.Request) -> str:
    """Where a request without a session should go to log in, coming back to itself."""
    return str(URL(START_PATH).with_query(rd=request.raw_path))


def unauthenticated(request: web.Request) -> web.StreamResponse:
    """A navigation goes to login; anything else gets 401 naming the login URL."""
    url = login_url(request)
    if is_navigation(request):
        return redirect(url)
    return unauthorized_json(url)


def unauthorized_json(url: str) -> web.Response:
    """401 naming the login URL, with `WWW-Authenticate` (for API calls)."""
    return web.json_response(
        {"error": "unauthenticated", "message": "log in first", "login_url": url},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="auth-sidecar"', "Cache-Control": "no-store"},
    )


def forbidden(request: web.Request, session: Session, scope: str) -> web.Response:
    """403 for a session the access rules refuse at `scope` (an upstream prefix, or the
    global rules for forward-auth), with one log line naming who was refused."""
    log.info(
        "access denied",
        extra={"session": session.h[:12], "user": session.record.subject, "scope": scope},
    )
    record = session.record
    audit(
        "access_denied",
        session=session.h,
        iss=record.issuer,
        sub=record.subject,
        scope=scope,
        **requester(request),
    )
    return error_response(request, 403, "forbidden", "you are not allowed to see this")


def denied(request: web.Request, scope: str) -> web.Response:
    """403 for a request a `deny` rule refuses, whoever asks; nothing about the rule."""
    log.info("access denied", extra={"scope": scope, "rule": "deny"})
    audit("access_denied", scope=scope, rule="deny", **requester(request))
    return error_response(request, 403, "forbidden", "you are not allowed to see this")


def requester(request: web.Request) -> dict[str, str | None]:
    """Who made the request, for audit lines: the client's address and the request id."""
    return {
        "client_ip": request.app[FORWARDED].client_ip(request),
        "request_id": request.get(REQUEST_ID),
    }


def redirect(location: str, status: int = 302) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})
