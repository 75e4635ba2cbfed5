"""The `/oauth2/*` endpoints: login start and callback, sign-out, userinfo (DESIGN §2).

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
from yarl import URL

from sidecar.errors import InvalidIDToken, TokenRequestError
from sidecar.oidc import challenge_s256, new_verifier
from sidecar.session import PendingLogin, SessionRecord
from sidecar.web.keys import CONFIG, COOKIES, LOGIN_LIMITER, METRICS, OIDC, ROUTE, SESSIONS
from sidecar.web.responses import error_response, is_navigation

__all__ = [
    "callback",
    "login_url",
    "safe_return_path",
    "sign_out",
    "start",
    "unauthenticated",
    "unauthorized_json",
    "userinfo",
]

log = logging.getLogger("sidecar.web.login")

START_PATH: Final = "/oauth2/start"
# Ceilings on callback parameters: real codes and states are far below these.
_MAX_STATE: Final = 512
_MAX_CODE: Final = 4096
_MAX_RETURN_PATH: Final = 2048
_ERROR_CODE: Final = re.compile(r"[a-z_]{1,64}")
_SECRET: Final = re.compile(r"[A-Za-z0-9_-]{43}")


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
    response = _redirect(url)
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
        # DESIGN §4 "Login": no login CSRF; a login finishes only where it started.
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
    try:
        tokens = await client.exchange_code(code, pending.code_verifier)
        if tokens.id_token is None:
            raise InvalidIDToken("token response has no id_token")
        claims = await client.validate_id_token(
            tokens.id_token, nonce=pending.nonce, access_token=tokens.access_token
        )
    except TokenRequestError as exc:
        log.warning("code exchange refused", extra={"error": exc.error})
        return _login_failed(request, 400, "login_failed", "The login could not be completed.")
    except InvalidIDToken as exc:
        log.warning("ID token rejected", extra={"reason": str(exc)})
        return _login_failed(request, 400, "invalid_id_token", "The login could not be verified.")

    profile = await client.userinfo(tokens.access_token)
    if profile is not None and profile.get("sub") == claims["sub"]:
        # §5.3.4: userinfo is about the ID token's subject or it is ignored.
        claims = {**profile, **claims}
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
    log.info("login", extra={"session": session.h[:12]})
    response = _redirect(pending.return_to)
    cookies.set_session(response, session.id)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    """Delete the session, revoke its refresh token, and send the browser to the IdP's logout."""
    request[ROUTE] = "oauth2_sign_out"
    config, client = request.app[CONFIG], request.app[OIDC]
    sessions, cookies = request.app[SESSIONS], request.app[COOKIES]
    if request.method != "POST":
        return web.Response(text=_SIGN_OUT_PAGE, content_type="text/html")
    if not _same_origin(request, config.server.public_url):
        return error_response(request, 403, "cross_site", "sign-out must come from this site")

    session = await sessions.load(cookies.session_id(request))
    id_token = None
    if session is not None:
        await sessions.delete(session)
        id_token = session.record.id_token
        if session.record.refresh_token:
            await client.revoke(session.record.refresh_token)
        log.info("logout", extra={"session": session.h[:12]})
    target = client.end_session_url(id_token) or config.oidc.post_logout_redirect_url or "/"
    response: web.StreamResponse
    if _wants_json(request):
        response = web.json_response({"logout_url": target}, headers={"Cache-Control": "no-store"})
    else:
        response = _redirect(target, status=303)
    cookies.clear_session(response)
    return response


async def userinfo(request: web.Request) -> web.StreamResponse:
    """The session's identity and expiry times as JSON, or 401."""
    request[ROUTE] = "oauth2_userinfo"
    session = await request.app[SESSIONS].current(request.app[COOKIES].session_id(request))
    if session is None:
        return unauthenticated(request)
    record = session.record
    claims = record.claims
    return web.json_response(
        {
            "sub": record.subject,
            "email": claims.get("email"),
            "name": claims.get("name"),
            "groups": claims.get("groups", []),
            "access_token_expires_at": int(record.access_expires_at),
            "session_expires_at": int(record.expires_at),
        },
        headers={"Cache-Control": "no-store"},
    )


def unauthenticated(request: web.Request) -> web.StreamResponse:
    """DESIGN §6: a navigation goes to login; anything else gets 401 naming the login URL."""
    url = login_url(request)
    if is_navigation(request):
        return _redirect(url)
    return unauthorized_json(url)


def unauthorized_json(url: str) -> web.Response:
    """401 naming the login URL, with `WWW-Authenticate` (DESIGN §6, API calls)."""
    return web.json_response(
        {"error": "unauthenticated", "message": "log in first", "login_url": url},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="auth-sidecar"', "Cache-Control": "no-store"},
    )


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


def _redirect(location: str, status: int = 302) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _same_origin(request: web.Request, public_url: str) -> bool:
    """CSRF defence for sign-out: refuse what a browser marks as coming from another site."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is not None:
        allowed = {str(URL(public_url).origin()), f"{request.scheme}://{request.host}"}
        return origin in allowed
    return True


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


_SIGN_OUT_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign out</title></head>
<body><form method="post" action="/oauth2/sign_out">
<button type="submit">Sign out</button></form></body></html>
"""
