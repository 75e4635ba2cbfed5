"""The proxy handler: every request that is not a sidecar endpoint.

Public path → forwarded without identity. Otherwise: the session (`authenticate`), a fresh
token (the refresh protocol), the upstream's access rules, and the identity headers; then
forwarded (docs/architecture.md, "One request").
"""

from __future__ import annotations

from aiohttp import web

from sidecar.forwarding.paths import PATH
from sidecar.forwarding.upstream import is_websocket
from sidecar.logging import REQUEST_ID
from sidecar.web.authenticate import authenticate, forbidden, unauthenticated
from sidecar.web.keys import ADMISSION, PUBLIC, REFRESHER, ROUTE, ROUTER, SESSIONS
from sidecar.web.responses import error_response

__all__ = ["proxy"]


async def proxy(request: web.Request) -> web.StreamResponse:
    """Everything that is not a sidecar endpoint: session → access rules → headers → upstream."""
    target = request[PATH]
    upstream = request.app[ROUTER].match(target.path)
    if upstream is None:
        request[ROUTE] = "unrouted"
        return error_response(request, 404, "no_upstream", "no upstream serves this path")
    request[ROUTE] = upstream.prefix
    if target.encoded_slash or target.params:
        refusal = upstream.refuses(target)
        if refusal is not None:
            return error_response(request, 400, "bad_request", refusal)
    extra = [("X-Request-Id", request[REQUEST_ID])]
    if target.path in request.app[PUBLIC]:
        return await upstream.forward(request, extra)

    session = await authenticate(request)
    if session is None:
        return unauthenticated(request)
    session = await request.app[REFRESHER].ensure_fresh(session)
    identity = request.app[ADMISSION].headers(session, upstream.prefix, upstream.config.access)
    if identity is None:
        return forbidden(request, session, upstream.prefix)
    extra.extend(identity)
    if is_websocket(request):
        # A websocket outlives the request: it is closed when its session ends (logout).
        with request.app[SESSIONS].ending(session.h) as ended:
            return await upstream.forward(request, extra, ended=ended)
    return await upstream.forward(request, extra)
