"""`/oauth2/auth`: the forward-auth answer for nginx auth_request, Traefik and Envoy."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.configs import config_dict
from tests.support.login import browser, login, setup

# The tests' client connects from loopback: trusting it makes the test client the front proxy.
PROXY = {"trusted_proxies": ["127.0.0.1/32"]}


async def setup_behind_proxy(start_sidecar: Any, upstream_app: Any, **sections: Any) -> Any:
    server = {**config_dict()["server"], **PROXY}
    return await setup(start_sidecar, upstream_app, server=server, **sections)


async def test_forward_auth_answers_identity_headers(start_sidecar: Any, upstream_app: Any) -> None:
    """With a session, 202 carries Authorization and identity headers for the front proxy."""
    sc = await setup_behind_proxy(start_sidecar, upstream_app)
    async with browser() as s:
        await login(s, sc)
        async with s.get(sc.url("/oauth2/auth"), allow_redirects=False) as r:
            assert r.status == 202
            assert r.headers["Authorization"].startswith("Bearer ey")
            assert r.headers["X-Forwarded-User"] == "alice"
            assert r.headers["X-Forwarded-Groups"] == "admins,staff"


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8", "::1/128"]])
async def test_forward_auth_refuses_untrusted_peers(
    start_sidecar: Any, upstream_app: Any, trusted: list[str]
) -> None:
    """A peer outside trusted_proxies (loopback included) gets 403 JSON and never the token,
    even with a valid session: a same-origin script cannot read the access token."""
    server = {**config_dict()["server"], "trusted_proxies": trusted}
    sc = await setup(start_sidecar, upstream_app, server=server)
    async with browser() as s:
        await login(s, sc)
        for path in ("/oauth2/auth", "//oauth2/auth", "/oauth2/./auth", "/x/../oauth2/auth"):
            async with s.get(sc.url(path), allow_redirects=False) as r:
                assert r.status == 403, path
                assert (await r.json())["error"] == "untrusted_peer"
                assert "Authorization" not in r.headers
                assert "X-Forwarded-User" not in r.headers


async def test_forward_auth_without_session_is_401_never_a_redirect(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """Without a session even a browser navigation gets 401, so the front proxy decides."""
    sc = await setup_behind_proxy(start_sidecar, upstream_app)
    async with browser() as s:
        headers = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        async with s.get(sc.url("/oauth2/auth"), headers=headers, allow_redirects=False) as r:
            assert r.status == 401
            assert "WWW-Authenticate" in r.headers


async def test_forward_auth_applies_access_rules(
    start_sidecar: Any, upstream_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A user outside the allowed groups gets 403 from the forward-auth check, logged as an
    access denial like the proxy's."""
    sc = await setup_behind_proxy(
        start_sidecar, upstream_app, access={"allowed_groups": ["admins"]}
    )
    caplog.set_level("INFO", logger="sidecar")
    async with browser() as s:
        await login(s, sc, user="bob")
        async with s.get(sc.url("/oauth2/auth"), allow_redirects=False) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "forbidden"
    denied = [r for r in caplog.records if r.getMessage() == "access denied"]
    assert [(getattr(r, "user", None), getattr(r, "scope", None)) for r in denied] == [
        ("bob", "forward-auth")
    ]
