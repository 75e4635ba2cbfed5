"""`/oauth2/auth`: the forward-auth check for nginx `auth_request`, Traefik and Envoy
(docs/sessions.md, "Forward auth").

2xx with the identity headers the proxy would inject (the front proxy copies them upstream),
401 without a usable session, 403 when the access rules refuse. Never a redirect: the front
proxy decides what a browser sees (nginx: `error_page 401 = /oauth2/start?rd=$request_uri`).

The answer carries the access token, so only peers in `server.trusted_proxies` get one: a
script in the user's browser must not be able to read it (docs/security.md).
"""

from __future__ import annotations

from aiohttp import web

from sidecar.errors import SessionEnded
from sidecar.web.authenticate import START_PATH, authenticate, forbidden, unauthorized_json
from sidecar.web.keys import ADMISSION, FORWARDED, REFRESHER, ROUTE
from sidecar.web.responses import error_response

__all__ = ["forward_auth"]


async def forward_auth(request: web.Request) -> web.StreamResponse:
    """202 and identity headers for a valid session; 401 or 403 otherwise."""
    request[ROUTE] = "oauth2_auth"
    if not request.app[FORWARDED].trusts(request.remote):
        return error_response(
            request,
            403,
            "untrusted_peer",
            "forward-auth answers only the proxies listed in server.trusted_proxies",
        )
    session = await authenticate(request)
    if session is None:
        return unauthorized_json(START_PATH)
    try:
        session = await request.app[REFRESHER].ensure_fresh(session)
    except SessionEnded:
        return unauthorized_json(START_PATH)
    identity = request.app[ADMISSION].headers(session, "")
    if identity is None:
        return forbidden(request, session, "forward-auth")
    response = web.Response(status=202, headers={"Cache-Control": "no-store"})
    for name, value in identity:
        response.headers[name] = value
    return response
