"""`/oauth2/sign_out`: end the session, revoke its refresh token, and log out at the IdP
(OpenID Connect RP-Initiated Logout 1.0). A POST from this site only (CSRF defence); a GET
answers a page with the buttons. `?everywhere=1` first ends every other session of the same
user (docs/sessions.md, "Central logout").
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web
from yarl import URL

from sidecar.audit import audit
from sidecar.web.authenticate import redirect, requester
from sidecar.web.keys import CONFIG, COOKIES, METRICS, OIDC, ROUTE, SESSIONS
from sidecar.web.responses import error_response

__all__ = ["sign_out"]

log = logging.getLogger("sidecar.login")


async def sign_out(request: web.Request) -> web.StreamResponse:
    """Delete the session, revoke its refresh token, and send the browser to the IdP's logout."""
    request[ROUTE] = "oauth2_sign_out"
    config, client = request.app[CONFIG], request.app[OIDC]
    sessions, cookies = request.app[SESSIONS], request.app[COOKIES]
    if request.method != "POST":
        return web.Response(text=_SIGN_OUT_PAGE, content_type="text/html")
    if not _same_origin(request, config.server.public_url):
        return error_response(request, 403, "cross_site", "sign-out must come from this site")

    everywhere = request.query.get("everywhere") in ("1", "true")
    session = await sessions.load(cookies.session_id(request))
    id_token = None
    if session is not None:
        record = session.record
        others = 0
        if everywhere:
            # The other sessions' refresh tokens are sealed under their own session ids,
            # which only their browsers hold: they are deleted, not revoked (docs/decisions.md).
            found = await sessions.sessions_of_user(record.issuer, record.subject)
            elsewhere = [s for s in found if s.id != session.h]
            others = await sessions.end(elsewhere)
            for info in elsewhere:
                audit(
                    "logout",
                    kind="everywhere",
                    session=info.id,
                    iss=info.iss,
                    sub=info.sub,
                    **requester(request),
                )
        await sessions.delete(session)
        id_token = record.id_token
        if record.refresh_token:
            await client.revoke(record.refresh_token)
        kind = "everywhere" if everywhere else "rp"
        request.app[METRICS].logouts.labels(kind).inc(1 + others)
        audit(
            "logout",
            kind=kind,
            session=session.h,
            iss=record.issuer,
            sub=record.subject,
            **requester(request),
        )
        log.info(
            "logout",
            extra={
                "session": session.h[:12],
                "user": record.subject,
                "kind": kind,
                "ended": 1 + others,
            },
        )
    target = client.end_session_url(id_token) or config.oidc.post_logout_redirect_url or "/"
    response: web.StreamResponse
    if _wants_json(request):
        response = web.json_response({"logout_url": target}, headers={"Cache-Control": "no-store"})
    else:
        response = redirect(target, status=303)
    cookies.clear_session(response)
    return response


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
<html lang="en"><head><meta charset="utf-8"><title>Sign out</title>
<style>body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}
</style></head>
<body><h1>Sign out</h1>
<p>Signing out ends your session on this site, revokes its tokens and signs you out at the
identity provider too.</p>
<form method="post" action="/oauth2/sign_out">
<button type="submit">Sign out</button> <a href="/">Cancel</a></form>
<form method="post" action="/oauth2/sign_out?everywhere=1">
<p>Signed in elsewhere too, on another browser or device?
<button type="submit">Sign out everywhere</button></p></form></body></html>
"""
