"""The upstreams behind the sidecar: one echo app and one verifying upstream for every test.

`echo_app` answers each request with a JSON description of it as the upstream received it
(what the proxy and login tests assert on). `VerifyingUpstream` asks the IdP's userinfo
endpoint about every Bearer token it receives, so "the upstream got a token the IdP accepts"
is checked by the IdP itself (refresh storms, Redis topologies, the e2e provider tests).
Tests with an upstream of special behaviour (slow, streaming, refusing) build their own app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tests.support.ports import free_port
from tests.support.threads import AppThread

__all__ = [
    "Introspection",
    "Seen",
    "Serve",
    "VerifyingUpstream",
    "body_digest",
    "echo_app",
    "header",
    "headers_of",
    "jwt_claims",
]

# The `upstream_app` fixture: `await upstream_app(app, **runner_options)` serves it; its URL.
Serve = Callable[..., Awaitable[str]]

_CLIENT = web.AppKey("client", aiohttp.ClientSession)


async def body_digest(request: web.Request) -> tuple[int, str]:
    """The size and SHA-256 of the request body, read as it streams in (never held whole)."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def echo_app(
    name: str = "echo",
    *,
    seen: list[CIMultiDict[str]] | None = None,
    set_cookie: str | None = None,
) -> web.Application:
    """An upstream that describes each request as it received it, as JSON.

    The body: method, `path` (with the query), `raw_path`, the header lines in order
    (`headers`, [name, value] pairs), `authorization`, and the request body's `size` and
    `sha256`. The answer carries `X-Upstream: name`, and `Set-Cookie: set_cookie` if given;
    `seen` collects each request's headers.
    """

    async def echo(request: web.Request) -> web.Response:
        if seen is not None:
            seen.append(request.headers.copy())
        size, sha256 = await body_digest(request)
        response = web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,
                "headers": list(request.headers.items()),
                "authorization": request.headers.get("Authorization"),
                "size": size,
                "sha256": sha256,
            }
        )
        response.headers["X-Upstream"] = name
        if set_cookie is not None:
            response.headers["Set-Cookie"] = set_cookie
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header(body: dict[str, Any], name: str) -> list[str]:
    """Every value of header `name` (any case) in an `echo_app` answer, in order."""
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


def headers_of(body: dict[str, Any]) -> dict[str, list[str]]:
    """An `echo_app` answer's headers by lower-case name."""
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: what a test reads from a token the sidecar forwarded."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _jwt_exp(token: str) -> float | None:
    """The `exp` of a JWT, unverified (for failure reports); None for an opaque token."""
    try:
        return float(jwt_claims(token)["exp"])
    except (IndexError, KeyError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Introspection:
    """Where and as which client to introspect tokens (RFC 7662), for `token_seconds_left`."""

    endpoint: str
    client_id: str
    client_secret: str


@dataclass
class Seen:
    """One request as the verifying upstream got it."""

    path: str
    authorization: str
    headers: dict[str, str]  # as received, without Cookie
    user: str | None  # X-Forwarded-User
    at: float  # wall clock at arrival, comparable with a token's `exp`
    token_sha256: str | None  # of the Bearer token; None without one
    userinfo_status: int | None  # None: not asked (no Bearer token, or `verify` off); 0: no answer
    userinfo: dict[str, Any] | None
    idp_error: str  # the IdP's WWW-Authenticate, or why it did not answer

    @property
    def sub(self) -> str | None:
        return None if self.userinfo is None else self.userinfo.get("sub")


@dataclass
class VerifyingUpstream:
    """An upstream that checks every Bearer token it receives at the IdP's userinfo endpoint.

    Each request is recorded in `seen` and answered with JSON: `ok` (the IdP accepted the
    token), `token` (its SHA-256, comparable with an IdP's ledger), `sub`, `user`,
    `userinfo_status`, `userinfo`, `path`, `authorization`, `headers` (without Cookie),
    `idp_error`, `exp` and `checked_at`, and `token_seconds_left` with `introspection`.

    - `verify = False` stops asking the IdP (while it is frozen, say): tokens go unchecked;
    - `refuse_with`: the status of the answer when the IdP refused the token (else 200), so
      that a test counting statuses sees every refused token;
    - `require_bearer`: a request without a Bearer token fails in the upstream (500);
    - `page`: requests outside /api/ get this HTML page (`{user}` filled in) instead;
    - `record = False` keeps `seen` empty (a long-lived upstream under storms).

    Serve it with `upstream_app(upstream.app())`, or in a thread of its own with `start()`.
    """

    userinfo_endpoint: str
    refuse_with: int | None = None
    require_bearer: bool = False
    introspection: Introspection | None = None
    page: str | None = None
    record: bool = True
    verify: bool = True
    seen: list[Seen] = field(default_factory=list)
    _thread: AppThread | None = None

    @property
    def url(self) -> str:
        """Where `start()` serves it."""
        assert self._thread is not None, "not started: call start()"
        return self._thread.url

    def app(self) -> web.Application:
        async def client(app: web.Application) -> AsyncIterator[None]:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200),
                timeout=aiohttp.ClientTimeout(total=5),
                cookie_jar=aiohttp.DummyCookieJar(),
            ) as session:
                app[_CLIENT] = session
                yield

        app = web.Application()
        app.cleanup_ctx.append(client)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def start(self) -> str:
        """Serve it in a thread of its own (module fixtures, sync tests); its URL."""
        self._thread = AppThread(self.app(), free_port(), "verifying-upstream")
        return self._thread.url

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.page is not None and not request.path.startswith("/api/"):
            user = request.headers.get("X-Forwarded-User", "")
            return web.Response(text=self.page.format(user=user), content_type="text/html")
        auth = request.headers.get("Authorization", "")
        if self.require_bearer:
            assert auth.startswith("Bearer "), dict(request.headers)
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        seen = Seen(
            path=request.path,
            authorization=auth,
            headers={k: v for k, v in request.headers.items() if k.lower() != "cookie"},
            user=request.headers.get("X-Forwarded-User"),
            at=time.time(),
            token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
            userinfo_status=None,
            userinfo=None,
            idp_error="",
        )
        client = request.app[_CLIENT]
        if token is not None and self.verify:
            await self._ask_userinfo(client, auth, seen)
        if self.record:
            self.seen.append(seen)
        body: dict[str, Any] = {
            "ok": seen.userinfo_status == 200,
            "token": seen.token_sha256,
            "sub": seen.sub,
            "user": seen.user,
            "userinfo_status": seen.userinfo_status,
            "userinfo": seen.userinfo,
            "path": seen.path,
            "authorization": auth,
            "headers": seen.headers,
            "idp_error": seen.idp_error,
            "exp": None if token is None else _jwt_exp(token),
            "checked_at": time.time(),
        }
        if self.introspection is not None and token is not None:
            body["token_seconds_left"] = await self._seconds_left(client, token)
        refused = self.verify and not body["ok"]
        status = self.refuse_with if refused and self.refuse_with is not None else 200
        return web.json_response(body, status=status)

    async def _ask_userinfo(self, client: aiohttp.ClientSession, auth: str, seen: Seen) -> None:
        try:
            async with client.get(self.userinfo_endpoint, headers={"Authorization": auth}) as r:
                seen.userinfo_status = r.status
                if r.status == 200:
                    seen.userinfo = dict(await r.json())
                seen.idp_error = r.headers.get("WWW-Authenticate", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            seen.userinfo_status, seen.idp_error = 0, type(exc).__name__

    async def _seconds_left(self, client: aiohttp.ClientSession, token: str) -> float | None:
        """The token's remaining life by the IdP's introspection (opaque tokens have no exp)."""
        assert self.introspection is not None
        basic = aiohttp.encode_basic_auth(
            self.introspection.client_id, self.introspection.client_secret
        )
        async with client.post(
            self.introspection.endpoint, data={"token": token}, headers={"Authorization": basic}
        ) as r:
            if r.status != 200:
                return None
            exp = (await r.json()).get("exp")
        return round(exp - time.time(), 1) if exp else None
