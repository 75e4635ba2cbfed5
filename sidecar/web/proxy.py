"""The proxy handler: every request that is not a sidecar endpoint.

Public path or public rule → forwarded without identity; a deny rule → 403. Otherwise the
caller: the session (`authenticate`), CSRF defence, a fresh token (the refresh protocol), or a
bearer token of a machine client; then the rule's conditions or the upstream's access rules,
and the identity headers; then forwarded (docs/architecture.md, "One request";
docs/rules.md).
"""

from __future__ import annotations

from functools import partial

from aiohttp import web

from sidecar.access.routes import Route
from sidecar.errors import InvalidBearerToken
from sidecar.forwarding.paths import PATH
from sidecar.forwarding.upstream import Upstream, is_websocket
from sidecar.logging import REQUEST_ID
from sidecar.web.authenticate import (
    authenticate,
    denied,
    forbidden,
    requester,
    unauthenticated,
)
from sidecar.web.bearer import insufficient_scope, invalid_token, presented_token
from sidecar.web.csrf import SAFE_METHODS
from sidecar.web.keys import ADMISSION, BEARER, CSRF, PUBLIC, REFRESHER, ROUTE, ROUTER, SESSIONS
from sidecar.web.responses import error_response

__all__ = ["proxy"]

_UNUSABLE = "the Authorization header holds no usable bearer token"


async def proxy(request: web.Request) -> web.StreamResponse:
    """Everything that is not a sidecar endpoint: caller → rules → headers → upstream."""
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
    app = request.app
    admission = app[ADMISSION]
    route = admission.route(upstream.prefix, request.method, target.path)
    if route is not None:
        if route.allow == "public":
            return await upstream.forward(request, extra)
        if route.allow == "deny":
            return denied(request, upstream.prefix)

    session = await authenticate(request)
    if session is None:
        if not app[BEARER].enabled or "Authorization" not in request.headers:
            return unauthenticated(request)
        token = presented_token(request)
        if token is None:
            return invalid_token(_UNUSABLE)
        return await _as_machine(request, upstream, route, token, extra)
    method = request.method
    if method not in SAFE_METHODS and not app[CSRF].allows(request):
        return error_response(
            request, 403, "csrf", "this request must come from a page of this site"
        )
    session = await app[REFRESHER].ensure_fresh(session, partial(requester, request))
    identity = admission.headers(session, upstream.prefix, upstream.config.access, route)
    if identity is None:
        return forbidden(request, session, upstream.prefix)
    extra.extend(identity)
    if method == "GET" and is_websocket(request):
        # A websocket outlives the request: it is closed when its session ends (logout).
        with app[SESSIONS].ending(session.h) as ended:
            return await upstream.forward(request, extra, websocket=True, ended=ended)
    return await upstream.forward(request, extra, websocket=False)


async def _as_machine(
    request: web.Request,
    upstream: Upstream,
    route: Route | None,
    token: str,
    extra: list[tuple[str, str]],
) -> web.StreamResponse:
    """A bearer token and no session: the token's own claims decide and go upstream, with
    the same Authorization (docs/machine-clients.md). No CSRF check: no ambient authority."""
    try:
        caller = await request.app[BEARER].verify(token)
    except InvalidBearerToken as exc:
        return invalid_token(str(exc))
    identity = request.app[ADMISSION].bearer_headers(
        token,
        caller.key,
        caller.claims,
        caller.scopes,
        upstream.prefix,
        upstream.config.access,
        route,
    )
    if identity is None:
        return insufficient_scope(request, upstream.prefix, caller.issuer, caller.subject)
    extra.extend(identity)
    return await upstream.forward(request, extra)
