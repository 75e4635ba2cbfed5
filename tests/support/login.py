"""A browser's code-flow login at the dev IdP: GET → /oauth2/start → authorize → callback.

The one login every test uses, whichever sidecar it runs: `sc` is an in-process `Sidecar`,
a `SidecarProcess`, or the base URL of one (the demo). The dev IdP logs the user named by
`login_hint` in at once, so the whole flow is four requests. The e2e tests log in at a real
provider's form instead (tests/support/browse.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import aiohttp
from yarl import URL

from sidecar.config import Config
from tests.support.configs import make_config
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.upstreams import Serve, echo_app

__all__ = [
    "HTML",
    "JSON",
    "NAVIGATE",
    "Site",
    "approve",
    "authorize",
    "browser",
    "get_json",
    "local",
    "login",
    "login_cookie",
    "session_cookie",
    "setup",
]

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


class _Served(Protocol):
    def url(self, path: str) -> str: ...


# Where the sidecar answers: anything with `url(path)`, or its base URL.
Site = _Served | str


def _url(sc: Site, path: str) -> str:
    return sc + path if isinstance(sc, str) else sc.url(path)


def _issuer(sc: Site) -> str | None:
    """The issuer the sidecar is configured with, where the test can see its configuration."""
    config = getattr(sc, "config", None)
    if isinstance(config, Config):
        return str(config.oidc.issuer)
    if isinstance(config, dict):
        return str(config["oidc"]["issuer"])
    return None


async def setup(start_sidecar: StartSidecar, upstream_app: Serve, **sections: Any) -> Sidecar:
    """An in-process sidecar before `echo_app`, every path protected unless `sections` say not."""
    base = await upstream_app(echo_app())
    sections.setdefault("public_paths", [])
    sc = await start_sidecar(make_config(base, **sections))
    await ready(sc)
    return sc


def browser() -> aiohttp.ClientSession:
    """A cookie-keeping client that accepts cookies of IP hosts (every test server's)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def local(sc: Site, location: str) -> str:
    """The sidecar's public_url port differs from where the test runs it: re-target."""
    url = URL(location)
    return _url(sc, url.raw_path_qs if url.is_absolute() else location)


async def approve(s: aiohttp.ClientSession, authorize_url: str, user: str) -> str:
    """The IdP step: `login_hint` logs `user` in at once; the callback location it sends."""
    async with s.get(authorize_url + "&login_hint=" + user, allow_redirects=False) as r:
        assert r.status == 302, r.status
        return r.headers["Location"]


async def authorize(
    s: aiohttp.ClientSession,
    sc: Site,
    path: str = "/app/page",
    user: str = "alice",
    *,
    headers: dict[str, str] = HTML,
) -> str:
    """Steps 1-3 from `path`: returns the callback location (absolute, at the public URL).

    A `path` at /oauth2/start begins a fresh login directly (the browser may be logged in).
    """
    if path.startswith("/oauth2/start"):
        start = path
    else:
        async with s.get(_url(sc, path), headers=headers, allow_redirects=False) as r:
            assert r.status == 302, r.status
            start = r.headers["Location"]
    assert start.startswith("/oauth2/start?rd="), start
    async with s.get(local(sc, start), allow_redirects=False) as r:
        assert r.status == 302, r.status
        auth = r.headers["Location"]
    issuer = _issuer(sc)
    assert issuer is None or auth.startswith(issuer.rstrip("/") + "/"), (auth, issuer)
    callback = await approve(s, auth, user)
    assert URL(callback).path == "/oauth2/callback", callback
    return callback


async def login(
    s: aiohttp.ClientSession,
    sc: Site,
    path: str = "/app/page",
    user: str = "alice",
    *,
    headers: dict[str, str] = HTML,
    exchange_at_fraction: float | None = None,
) -> str:
    """Full login; returns where the callback sent the browser.

    `exchange_at_fraction`: send the callback (the code exchange) at that fraction of a
    wall-clock second, for tests that need to know where in its second a token was issued.
    """
    callback = await authorize(s, sc, path, user, headers=headers)
    if exchange_at_fraction is not None:
        await asyncio.sleep((exchange_at_fraction - time.time()) % 1.0)
    async with s.get(local(sc, callback), headers=headers, allow_redirects=False) as r:
        assert r.status == 302, (r.status, await r.text())
        return r.headers["Location"]


async def login_cookie(
    sc: Site,
    user: str = "alice",
    *,
    path: str = "/app/page",
    headers: dict[str, str] = HTML,
    exchange_at_fraction: float | None = None,
) -> str:
    """A fresh browser's whole login; the session cookie's value, for clients without a jar."""
    async with browser() as s:
        await login(s, sc, path, user, headers=headers, exchange_at_fraction=exchange_at_fraction)
        return session_cookie(s)


def session_cookie(s: aiohttp.ClientSession, name: str = "sidecar") -> str:
    """The session cookie's value in a browser's jar."""
    return next(c.value for c in s.cookie_jar if c.key == name)


async def get_json(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    """GET as an API client (Accept: JSON, no redirects): status and JSON body (or None)."""
    headers = {**JSON, **kw.pop("headers", {})}
    async with s.get(url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else None)
