"""`/oauth2/auth`: the forward-auth answer for nginx auth_request, Traefik and Envoy."""

from __future__ import annotations

from typing import Any

from tests.support.login import browser, login, setup


async def test_forward_auth_answers_identity_headers(start_sidecar: Any, upstream_app: Any) -> None:
    """With a session, 202 carries Authorization and identity headers for the front proxy."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        await login(s, sc)
        async with s.get(sc.url("/oauth2/auth"), allow_redirects=False) as r:
            assert r.status == 202
            assert r.headers["Authorization"].startswith("Bearer ey")
            assert r.headers["X-Forwarded-User"] == "alice"
            assert r.headers["X-Forwarded-Groups"] == "admins,staff"


async def test_forward_auth_without_session_is_401_never_a_redirect(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """Without a session even a browser navigation gets 401, so the front proxy decides."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        headers = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        async with s.get(sc.url("/oauth2/auth"), headers=headers, allow_redirects=False) as r:
            assert r.status == 401
            assert "WWW-Authenticate" in r.headers


async def test_forward_auth_applies_access_rules(start_sidecar: Any, upstream_app: Any) -> None:
    """A user outside the allowed groups gets 403 from the forward-auth check."""
    sc = await setup(start_sidecar, upstream_app, access={"allowed_groups": ["admins"]})
    async with browser() as s:
        await login(s, sc, user="bob")
        async with s.get(sc.url("/oauth2/auth"), allow_redirects=False) as r:
            assert r.status == 403
