"""Login: `/oauth2/start` (PKCE, state, nonce, browser binding; 302 to the IdP) and
`/oauth2/callback` (one use of the state, code exchange, ID-token checks, a new session).

Nothing a client or the IdP sends is echoed into a page or a log line beyond fixed,
sanitised error codes.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import re
import secrets
import time
from typing import Final

from aiohttp import web

from sidecar.audit import audit
from sidecar.errors import InvalidIDToken, TokenRequestError
from sidecar.oidc import challenge_s256, new_verifier
from sidecar.oidc.tokens import session_claims
from sidecar.session import PendingLogin, SessionRecord
from sidecar.telemetry import span
from sidecar.web.authenticate import START_PATH, redirect, requester, safe_return_path
from sidecar.web.keys import (
    CONFIG,
    COOKIES,
    LOGIN_LIMITER,
    METRICS,
    OIDC,
    ROUTE,
    SESSIONS,
    TRACING,
)
from sidecar.web.responses import error_response, is_navigation

__all__ = ["callback", "start"]

log = logging.getLogger("sidecar.login")

# Ceilings on callback parameters: real codes and states are far below these.
_MAX_STATE: Final = 512
_MAX_CODE: Final = 4096
_ERROR_CODE: Final = re.compile(r"[a-z_]{1,64}")
_SECRET: Final = re.compile(r"[A-Za-z0-9_-]{43}")


async def start(request: web.Request) -> web.StreamResponse:
    """Begin a login: PKCE verifier, state and nonce kept server-side; 302 to the IdP."""
    request[ROUTE] = "oauth2_start"
    retry_after = request.app[LOGIN_LIMITER].retry_after(request)
    if retry_after is not None:
        return _too_many_logins(request, retry_after)  # nothing stored, no cookie set
    client, sessions, cookies = request.app[OIDC], request.app[SESSIONS], request.app[COOKIES]
    return_to = safe_return_path(request.query.get("rd"))
    # One binding secret per browser serves every login pending in it (several tabs).
    secret = cookies.login_secret(request)
    if secret is None or not _SECRET.fullmatch(secret):
        secret = secrets.token_urlsafe(32)
    state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), new_verifier()
    url = client.authorization_url(
        state=state, nonce=nonce, code_challenge=challenge_s256(verifier)
    )
    dropped = await sessions.put_login(
        state,
        PendingLogin(
            code_verifier=verifier,
            nonce=nonce,
            return_to=return_to,
            binding_hash=_digest(secret),
            created_at=time.time(),
        ),
        keep=request.app[CONFIG].login.max_pending_per_browser,
    )
    if dropped:
        request.app[METRICS].login_pending_dropped.inc(dropped)
    response = redirect(url)
    cookies.set_login(response, secret)
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    """Finish a login: one-use state, browser binding, code exchange, ID token, new session."""
    request[ROUTE] = "oauth2_callback"
    config, client = request.app[CONFIG], request.app[OIDC]
    sessions, cookies = request.app[SESSIONS], request.app[COOKIES]
    query = request.query
    state = query.get("state", "")
    if not state or len(state) > _MAX_STATE:
        return _login_failed(request, 400, "invalid_request", "The login link is incomplete.")
    pending = await sessions.take_login(state)  # consumed even when the IdP reports an error
    if "error" in query:
        code = query["error"] if _ERROR_CODE.fullmatch(query["error"]) else "error"
        return _login_failed(request, 403, code, "The identity provider did not log you in.")
    if pending is None:
        return _login_failed(
            request, 400, "invalid_state", "This login expired or was already used."
        )
    secret = cookies.login_secret(request) or ""
    if not hmac.compare_digest(_digest(secret), pending.binding_hash):
        # docs/sessions.md, "Login": no login CSRF; a login finishes only where it started.
        return _login_failed(
            request, 400, "login_not_bound", "This login was started in another browser."
        )
    issuer = query.get("iss")
    if issuer is not None and issuer != client.metadata.issuer:  # RFC 9207 mix-up defence
        return _login_failed(request, 400, "issuer_mismatch", "Unexpected identity provider.")
    code = query.get("code", "")
    if not code or len(code) > _MAX_CODE:
        return _login_failed(request, 400, "invalid_request", "The login link is incomplete.")

    requested_at = time.time()
    # The code exchange and the ID token's checks; the IdP call is its `idp.token` child.
    with span(request.app.get(TRACING), "login.code_exchange") as exchange:
        try:
            tokens = await client.exchange_code(code, pending.code_verifier)
            if tokens.id_token is None:
                raise InvalidIDToken("token response has no id_token")
            claims = await client.validate_id_token(
                tokens.id_token, nonce=pending.nonce, access_token=tokens.access_token
            )
        except TokenRequestError as exc:
            log.warning("code exchange refused", extra={"error": exc.error})
            exchange.set("sidecar.login.outcome", "refused")
            return _login_failed(request, 400, "login_failed", "The login could not be completed.")
        except InvalidIDToken as exc:
            log.warning("ID token rejected", extra={"reason": str(exc)})
            exchange.set("sidecar.login.outcome", "invalid_id_token")
            return _login_failed(
                request, 400, "invalid_id_token", "The login could not be verified."
            )
        exchange.set("sidecar.login.outcome", "ok")

    profile = await client.userinfo(tokens.access_token)
    if profile is not None and profile.get("sub") != claims["sub"]:
        profile = None  # §5.3.4: userinfo is about the ID token's subject or it is ignored.
    # Keycloak puts roles only in its (JWT) access token: one view over the three sources,
    # the ID token's claims winning over userinfo's over the access token's.
    access_claims = await client.access_token_claims(tokens.access_token)
    claims = session_claims(claims, profile, access_claims)
    record = SessionRecord.from_login(
        tokens,
        claims,
        requested_at=requested_at,
        now=time.time(),
        lifetime=config.session.lifetime,
    )
    # Re-login always leaves the newest token set: the browser's old session goes.
    previous = await sessions.load(cookies.session_id(request))
    if previous is not None:
        await sessions.delete(previous)
    session = await sessions.create(record)
    log.info("login", extra={"session": session.h[:12], "user": record.subject})
    who = requester(request)
    audit("login", session=session.h, iss=record.issuer, sub=record.subject, **who)
    oldest = await sessions.over_cap(session)
    if oldest:
        ended = await sessions.end(oldest)
        for info in oldest:
            audit("logout", kind="cap", session=info.id, iss=info.iss, sub=info.sub, **who)
        request.app[METRICS].logouts.labels("cap").inc(ended)
        log.info(
            "oldest sessions ended: over session.max_per_user",
            extra={"user": record.subject, "ended": ended},
        )
    response = redirect(pending.return_to)
    cookies.set_session(response, session.id)
    return response


def _login_failed(request: web.Request, status: int, code: str, message: str) -> web.Response:
    if not is_navigation(request):
        return error_response(request, status, code, message)
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Login failed</title>"
        f"</head><body><h1>Login failed</h1><p>{html.escape(message)}</p>"
        f"<p><code>{html.escape(code)}</code></p>"
        f'<p><a href="{START_PATH}">Log in again</a></p></body></html>'
    )
    return web.Response(
        status=status, text=body, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


def _too_many_logins(request: web.Request, retry_after: int) -> web.Response:
    """429 with `Retry-After` (RFC 6585 §4): a page for a navigation, else JSON."""
    request.app[METRICS].login_rate_limited.inc()
    return error_response(
        request,
        429,
        "too_many_logins",
        f"Too many logins from your address; try again in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
