"""Logout started by the IdP: `/oauth2/backchannel-logout` (OpenID Connect Back-Channel
Logout 1.0, a signed logout token POSTed server to server) and `/oauth2/frontchannel-logout`
(Front-Channel Logout 1.0, a page the IdP loads in a hidden frame). Either ends every session
of the IdP session (`sid`), or of the user when a logout token names no `sid`, on every
replica (docs/sessions.md, "Central logout").
"""

from __future__ import annotations

import html
import logging
from typing import Final
from urllib.parse import parse_qs

from aiohttp import web
from yarl import URL

from sidecar.audit import audit
from sidecar.errors import IdPUnavailable, InvalidLogoutToken, StoreUnavailable
from sidecar.oidc import LogoutClaims
from sidecar.session import SessionManager
from sidecar.session.manager import SessionInfo, idp_session_ref, user_ref
from sidecar.web.authenticate import requester
from sidecar.web.keys import CONFIG, METRICS, OIDC, ROUTE, SESSIONS

__all__ = ["backchannel_logout", "frontchannel_logout"]

log = logging.getLogger("sidecar.login")

_MAX_BODY: Final = 64 * 1024  # a logout token is a few hundred bytes to a few KiB
_NO_STORE: Final = {"Cache-Control": "no-store"}


async def backchannel_logout(request: web.Request) -> web.Response:
    """Validate the logout token (§2.6) and end its sessions; 200 even when none matched."""
    request[ROUTE] = "oauth2_backchannel_logout"
    metrics = request.app[METRICS]
    try:
        token = await _logout_token(request)
        claims = await request.app[OIDC].validate_logout_token(token)
        sessions = request.app[SESSIONS]
        # §2.6 step 10: a jti accepted once is refused after, on every replica.
        if not await sessions.remember_logout_token(
            claims.issuer, claims.jti, claims.remember_until
        ):
            raise InvalidLogoutToken("replay", "logout token already used (jti)")
    except InvalidLogoutToken as exc:
        metrics.backchannel_rejected.labels(exc.reason).inc()
        log.info("back-channel logout refused", extra={"reason": exc.reason})
        return web.json_response(
            {"error": "invalid_request", "error_description": str(exc)},
            status=400,
            headers=_NO_STORE,
        )
    except IdPUnavailable:
        # The provider's keys are not loaded yet: the IdP may send the token again later.
        return web.json_response(
            {"error": "temporarily_unavailable", "error_description": "keys not loaded yet"},
            status=503,
            headers={**_NO_STORE, "Retry-After": "5"},
        )
    try:
        ended = await _end_named(request, sessions, claims)
    except StoreUnavailable:
        # The IdP will send the token again (503): its jti must not read as a replay then.
        await sessions.forget_logout_token(claims.issuer, claims.jti)
        raise
    metrics.logouts.labels("backchannel").inc(ended)
    log.info("back-channel logout", extra={"user": claims.subject, "ended": ended})
    return web.Response(status=200, headers=_NO_STORE)


async def frontchannel_logout(request: web.Request) -> web.Response:
    """End the sessions of `sid` when `iss` is this sidecar's issuer; a page the IdP frames.

    Microsoft Entra ID sends `sid` without `iss` (Front-Channel Logout 1.0 §2 wants both);
    with one configured issuer a `sid` alone is unambiguous, so it is accepted
    (docs/decisions.md). A different `iss` ends nothing.
    """
    request[ROUTE] = "oauth2_frontchannel_logout"
    issuer = request.app[CONFIG].oidc.issuer
    iss, sid = request.query.get("iss", issuer), request.query.get("sid")
    if iss != issuer or not sid:
        return _frame_page(request, 400, "This logout request is not for this site.")
    sessions = request.app[SESSIONS]
    found = await sessions.sessions_of_idp_session(issuer, sid)
    ended = await _end(request, sessions, found, idp_session_ref(issuer, sid), "frontchannel")
    request.app[METRICS].logouts.labels("frontchannel").inc(ended)
    log.info("front-channel logout", extra={"ended": ended})
    return _frame_page(request, 200, "You are signed out of this site.")


async def _end_named(request: web.Request, sessions: SessionManager, claims: LogoutClaims) -> int:
    """End the sessions of the token's `sid` (and `sub`, when both are named), or of its
    `sub` at this issuer without a `sid` (§2.4)."""
    if claims.sid is not None:
        ref = idp_session_ref(claims.issuer, claims.sid)
        found = await sessions.sessions_of_idp_session(claims.issuer, claims.sid)
        if claims.subject is not None:
            found = [s for s in found if s.sub in (None, claims.subject)]
    else:
        assert claims.subject is not None  # the validator requires sid or sub
        ref = user_ref(claims.issuer, claims.subject)
        found = await sessions.sessions_of_user(claims.issuer, claims.subject)
    return await _end(request, sessions, found, ref, "backchannel")


async def _logout_token(request: web.Request) -> str:
    """The `logout_token` form field (§2.5), from a bounded urlencoded body."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidLogoutToken("malformed", "expected an application/x-www-form-urlencoded body")
    body = await request.content.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise InvalidLogoutToken("malformed", "request body too large")
    try:
        fields = parse_qs(body.decode("ascii"), strict_parsing=False, max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidLogoutToken("malformed", "the body is not a form") from exc
    tokens = fields.get("logout_token", [])
    if len(tokens) != 1 or not tokens[0]:
        raise InvalidLogoutToken("malformed", "exactly one logout_token is required")
    return tokens[0]


async def _end(
    request: web.Request, sessions: SessionManager, found: list[SessionInfo], ref: str, kind: str
) -> int:
    if not found:
        return 0
    ended = await sessions.end(found, listed_under=ref)
    who = requester(request)
    for info in found:
        audit("logout", kind=kind, session=info.id, iss=info.iss, sub=info.sub, **who)
    return ended


def _frame_page(request: web.Request, status: int, message: str) -> web.Response:
    """A tiny page: never cached, framable by the IdP's origin only (docs/sessions.md)."""
    origin = URL(request.app[CONFIG].oidc.issuer).origin()
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Signed out</title>'
        f"</head><body><p>{html.escape(message)}</p></body></html>"
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={
            **_NO_STORE,
            "Content-Security-Policy": f"default-src 'none'; frame-ancestors 'self' {origin}",
        },
    )
