"""A browser's login against the shared dev IdP, and the echo upstream the login tests use."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.conftest import make_config
from tests.idp import shared_idp

__all__ = [
    "HTML",
    "JSON",
    "authorize",
    "browser",
    "claims_of",
    "echo_app",
    "get_json",
    "header",
    "local",
    "login",
    "ready",
    "session_cookie",
    "setup",
]

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


def echo_app() -> web.Application:
    """An upstream that answers with the headers it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {"path": request.path_qs, "headers": [[k, v] for k, v in request.headers.items()]}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header(body: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def ready(sc: Any) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(sc.management_url("/readyz")) as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.02)
    raise AssertionError("sidecar not ready")


async def setup(start_sidecar: Any, upstream_app: Any, **sections: Any) -> Any:
    base = await upstream_app(echo_app())
    sections.setdefault("public_paths", [])
    sc = await start_sidecar(make_config(base, **sections))
    await ready(sc)
    return sc


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def local(sc: Any, location: str) -> str:
    """The sidecar's public_url port differs from where the test runs it: re-target."""
    url = URL(location)
    return str(sc.url(url.raw_path_qs if url.is_absolute() else location))


async def authorize(s: aiohttp.ClientSession, sc: Any, path: str, user: str) -> str:
    """Steps 1-3: returns the callback location (absolute, at the public URL)."""
    if path.startswith("/oauth2/start"):
        start = path  # already logged in: begin a fresh login directly
    else:
        async with s.get(sc.url(path), headers=HTML, allow_redirects=False) as r:
            assert r.status == 302, r.status
            start = r.headers["Location"]
    assert start.startswith("/oauth2/start?rd=")
    async with s.get(local(sc, start), allow_redirects=False) as r:
        assert r.status == 302
        auth = r.headers["Location"]
    assert auth.startswith(shared_idp().issuer)
    async with s.get(auth + "&login_hint=" + user, allow_redirects=False) as r:
        assert r.status == 302, r.status
        return r.headers["Location"]


async def login(
    s: aiohttp.ClientSession, sc: Any, path: str = "/app/page", user: str = "alice"
) -> str:
    """Full login; returns where the callback sent the browser."""
    cb = await authorize(s, sc, path, user)
    async with s.get(local(sc, cb), headers=HTML, allow_redirects=False) as r:
        assert r.status == 302, (r.status, await r.text())
        return r.headers["Location"]


def session_cookie(s: aiohttp.ClientSession) -> str:
    return next(c.value for c in s.cookie_jar if c.key == "sidecar")


async def get_json(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    headers = {**JSON, **kw.pop("headers", {})}
    async with s.get(url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else None)
