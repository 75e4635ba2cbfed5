"""`/oauth2/auth` and `/oauth2/auth/<original path>`: the forward-auth check for nginx
`auth_request`, Caddy `forward_auth`, Traefik ForwardAuth and Envoy's HTTP ext_authz
(docs/forward-auth.md).

It decides on the original request as the front proxy describes it — `X-Forwarded-Method`,
`X-Forwarded-Uri` (or nginx's `X-Original-URI`, or the path after `/oauth2/auth` for Envoy's
`path_prefix`) and `X-Forwarded-Host` — with the proxy's canonical path and route rules. 2xx
with the identity headers the proxy would inject (the front proxy copies them upstream), 401
without a usable caller (or, with `forward_auth.redirect`, a 302 to login for a navigation),
403 when the rules refuse.

The answer carries the access token, so only peers in `server.trusted_proxies` get one: a
script in the user's browser must not be able to read it (docs/security.md). For the same
reason the `X-Forwarded-*` description is believed only from them.
"""

from __future__ import annotations

from functools import partial
from typing import Final, NamedTuple

from aiohttp import web
from yarl import URL

from sidecar.access.admission import Headers
from sidecar.errors import InvalidBearerToken, SessionEnded
from sidecar.forwarding.paths import PATH, BadPath, CanonicalPath, canonical_path
from sidecar.web.authenticate import (
    START_PATH,
    authenticate,
    forbidden,
    requester,
    unauthorized_json,
)
from sidecar.web.bearer import insufficient_scope, invalid_token, presented_token
from sidecar.web.csrf import SAFE_METHODS
from sidecar.web.keys import (
    ADMISSION,
    BEARER,
    CONFIG,
    CSRF,
    FORWARDED,
    REFRESHER,
    ROUTE,
    ROUTER,
)
from sidecar.web.responses import error_response, is_navigation

__all__ = ["AUTH_PATH", "forward_auth"]

AUTH_PATH: Final = "/oauth2/auth"
_SCOPE: Final = "forward-auth"  # the log and metrics name of a decision made here


class Original(NamedTuple):
    """The request the front proxy asks about."""

    method: str
    path: CanonicalPath | None  # None: the front proxy did not say
    target: str  # path and query as the client sent them, for a return to login
    host: str | None


async def forward_auth(request: web.Request) -> web.StreamResponse:
    """2xx and identity headers for a caller the rules let through; 401, 302 or 403 otherwise."""
    request[ROUTE] = "oauth2_auth"
    if not request.app[FORWARDED].trusts(request.remote):
        return error_response(
            request,
            403,
            "untrusted_peer",
            "forward-auth answers only the proxies listed in server.trusted_proxies",
        )
    try:
        original = _original(request)
    except BadPath as exc:
        return error_response(request, 403, "bad_request", str(exc))
    path = original.path
    if path is None and request.app[ROUTER].has_rules:
        # Rules depend on the original path: without it they cannot be applied (fail closed).
        return error_response(
            request,
            403,
            "original_request_unknown",
            "the front proxy must send X-Forwarded-Uri (or X-Original-URI)",
        )
    upstream = request.app[ROUTER].match(path.path) if path is not None else None
    if path is not None and (path.encoded_slash or path.params):
        refusal = upstream.refuses(path) if upstream is not None else "not routed here"
        if refusal is not None:
            return error_response(request, 403, "bad_request", refusal)
    admission = request.app[ADMISSION]
    route = None
    if upstream is not None and path is not None:
        route = admission.route(upstream.prefix, original.method, path.path)
    if route is not None and route.allow == "public":
        return _allowed(())
    if route is not None and route.allow == "deny":
        return error_response(request, 403, "forbidden", "you are not allowed to see this")

    session = await authenticate(request)
    if session is not None:
        try:
            session = await request.app[REFRESHER].ensure_fresh(
                session, partial(requester, request)
            )
        except SessionEnded:
            session = None
    scope = upstream.prefix if upstream is not None else _SCOPE
    rules = upstream.config.access if upstream is not None else None
    if session is None:
        if not request.app[BEARER].enabled or "Authorization" not in request.headers:
            return _unauthenticated(request, original)
        token = presented_token(request)
        if token is None:
            return invalid_token("the Authorization header holds no usable bearer token")
        try:
            caller = await request.app[BEARER].verify(token)
        except InvalidBearerToken as exc:
            return invalid_token(str(exc))
        identity = admission.bearer_headers(
            token, caller.key, caller.claims, caller.scopes, scope, rules, route
        )
        if identity is None:
            return insufficient_scope(request, _SCOPE, caller.issuer, caller.subject)
        return _allowed(_for_upstream(request, identity))
    if original.method not in SAFE_METHODS and not request.app[CSRF].allows(request):
        return error_response(
            request, 403, "csrf", "this request must come from a page of this site"
        )
    identity = admission.headers(session, scope, rules, route)
    if identity is None:
        return forbidden(request, session, _SCOPE)
    return _allowed(_for_upstream(request, identity))


def _original(request: web.Request) -> Original:
    """The original request from the front proxy's headers; without them, the global rules
    decide alone (`path` None)."""
    headers = request.headers
    method = (headers.get("X-Forwarded-Method") or request.method).upper()
    target = headers.get("X-Forwarded-Uri") or headers.get("X-Original-URI")
    own = request[PATH].path
    if target is None and own.startswith(AUTH_PATH + "/"):
        # Envoy ext_authz `path_prefix: /oauth2/auth`: the original path and query follow it.
        raw = request.raw_path
        prefixed = raw.startswith(AUTH_PATH + "/")
        target = raw[len(AUTH_PATH) :] if prefixed else own[len(AUTH_PATH) :]
    if target is None:
        return Original(method, None, "/", headers.get("X-Forwarded-Host"))
    raw_path = target.partition("?")[0].partition("#")[0]
    if not raw_path.startswith("/"):
        raise BadPath("the original URI must be a path")
    return Original(
        method,
        canonical_path(raw_path),
        target.partition("#")[0],
        headers.get("X-Forwarded-Host"),
    )


def _unauthenticated(request: web.Request, original: Original) -> web.Response:
    """401; with `forward_auth.redirect`, a navigation to a host the sidecar serves goes to
    login and comes back to the original URL."""
    config = request.app[CONFIG]
    public = URL(config.server.public_url)
    if config.forward_auth.redirect and is_navigation(request):
        host = original.host
        if (
            host is None
            or host.lower() == (public.host or "").lower()
            or (host.lower() == public.raw_authority.lower())
        ):
            login = public.with_path(START_PATH).with_query(rd=original.target)
            return web.Response(
                status=302, headers={"Location": str(login), "Cache-Control": "no-store"}
            )
    return unauthorized_json(START_PATH)


def _for_upstream(request: web.Request, identity: Headers) -> Headers:
    """The headers the front proxy copies upstream: without the token when configured so."""
    if request.app[CONFIG].forward_auth.authorization:
        return identity
    return tuple((k, v) for k, v in identity if k != "Authorization")


def _allowed(identity: Headers) -> web.Response:
    response = web.Response(status=202, headers={"Cache-Control": "no-store"})
    for name, value in identity:
        response.headers[name] = value
    return response
