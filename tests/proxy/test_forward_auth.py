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


# --- deciding on the original request (route rules, the front proxy's description) --------

RULES = [
    {"paths": ["/pub/**"], "allow": "public"},
    {"paths": ["/admin/**"], "groups": ["admins"]},
    {"methods": ["DELETE"], "allow": "deny"},
]


async def ruled_site(start_sidecar: Any, upstream_app: Any, **sections: Any) -> Any:
    server = {**config_dict()["server"], **PROXY}
    upstreams = [{"path": "/", "url": "http://127.0.0.1:9", "rules": RULES}]
    return await setup(start_sidecar, upstream_app, server=server, upstreams=upstreams, **sections)


async def auth_status(s: Any, sc: Any, path: str = "/oauth2/auth", **headers: str) -> int:
    async with s.get(sc.url(path), headers=headers, allow_redirects=False) as r:
        return int(r.status)


@pytest.mark.parametrize(
    ("headers", "alice", "bob", "anonymous"),
    [
        ({"X-Forwarded-Uri": "/admin/x"}, 202, 403, 401),
        ({"X-Original-URI": "/admin/x?y=1"}, 202, 403, 401),
        ({"X-Forwarded-Uri": "/pub/../admin/x"}, 202, 403, 401),
        ({"X-Forwarded-Uri": "/pub/%2e%2e/admin/x"}, 202, 403, 401),
        ({"X-Forwarded-Uri": "/pub/x"}, 202, 202, 202),
        ({"X-Forwarded-Uri": "/pub/x?/admin/x"}, 202, 202, 202),
        ({"X-Forwarded-Uri": "/elsewhere", "X-Forwarded-Method": "DELETE"}, 403, 403, 403),
        ({"X-Forwarded-Uri": "/elsewhere", "X-Forwarded-Method": "delete"}, 403, 403, 403),
        ({"X-Forwarded-Uri": "/elsewhere", "X-Forwarded-Method": "GET"}, 202, 202, 401),
        ({"X-Forwarded-Uri": "/pub%2F..%2Fadmin/x"}, 403, 403, 403),
        ({"X-Forwarded-Uri": "http://evil.example/pub/x"}, 403, 403, 403),
    ],
)
async def test_forward_auth_decides_on_the_original_request(
    start_sidecar: Any,
    upstream_app: Any,
    headers: dict[str, str],
    alice: int,
    bob: int,
    anonymous: int,
) -> None:
    sc = await ruled_site(start_sidecar, upstream_app)
    for user, expected in (("alice", alice), ("bob", bob)):
        async with browser() as s:
            await login(s, sc, user=user)
            assert await auth_status(s, sc, **headers) == expected, (user, headers)
    async with browser() as s:
        assert await auth_status(s, sc, **headers) == anonymous, ("anonymous", headers)


@pytest.mark.parametrize(
    ("path", "alice", "bob", "anonymous_delete"),
    [
        ("/oauth2/auth/admin/x", 202, 403, 401),
        ("/oauth2/auth/admin/x?q=1", 202, 403, 401),
        ("/oauth2/auth/pub/../admin/x", 202, 403, 401),
        ("/oauth2/auth/pub/x", 202, 202, 202),
        ("/oauth2/auth/other", 202, 202, 403),
    ],
)
async def test_forward_auth_takes_envoys_path_prefix_shape(
    start_sidecar: Any, upstream_app: Any, path: str, alice: int, bob: int, anonymous_delete: int
) -> None:
    """Envoy's HTTP ext_authz asks `/oauth2/auth<original path>` with the original method."""
    sc = await ruled_site(start_sidecar, upstream_app)
    for user, expected in (("alice", alice), ("bob", bob)):
        async with browser() as s:
            await login(s, sc, user=user)
            assert await auth_status(s, sc, path) == expected, (user, path)
    async with browser() as s, s.delete(sc.url(path), allow_redirects=False) as r:
        assert r.status == anonymous_delete  # first match wins: the deny rule comes last


async def test_the_original_request_is_believed_only_from_trusted_proxies(
    start_sidecar: Any, upstream_app: Any
) -> None:
    server = {**config_dict()["server"], "trusted_proxies": []}
    upstreams = [{"path": "/", "url": "http://127.0.0.1:9", "rules": RULES}]
    sc = await setup(start_sidecar, upstream_app, server=server, upstreams=upstreams)
    async with browser() as s:
        assert await auth_status(s, sc, **{"X-Forwarded-Uri": "/pub/x"}) == 403


async def test_forward_auth_can_leave_out_authorization(
    start_sidecar: Any, upstream_app: Any
) -> None:
    sc = await ruled_site(start_sidecar, upstream_app, forward_auth={"authorization": False})
    async with browser() as s:
        await login(s, sc)
        headers = {"X-Forwarded-Uri": "/x"}
        async with s.get(sc.url("/oauth2/auth"), headers=headers, allow_redirects=False) as r:
            assert r.status == 202
            assert "Authorization" not in r.headers
            assert r.headers["X-Forwarded-User"] == "alice"


async def test_redirect_mode_sends_navigations_to_login_for_hosts_it_serves(
    start_sidecar: Any, upstream_app: Any
) -> None:
    sc = await ruled_site(start_sidecar, upstream_app, forward_auth={"redirect": True})
    public = sc.config.server.public_url
    host = public.split("://", 1)[1]
    navigate = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    async with browser() as s:
        headers = {**navigate, "X-Forwarded-Uri": "/admin/x?y=1", "X-Forwarded-Host": host}
        async with s.get(sc.url("/oauth2/auth"), headers=headers, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == f"{public}/oauth2/start?rd=/admin/x?y%3D1"
        other = {**headers, "X-Forwarded-Host": "evil.example"}
        async with s.get(sc.url("/oauth2/auth"), headers=other, allow_redirects=False) as r:
            assert r.status == 401
        api = {"Accept": "application/json", "X-Forwarded-Uri": "/admin/x"}
        async with s.get(sc.url("/oauth2/auth"), headers=api, allow_redirects=False) as r:
            assert r.status == 401


async def test_without_the_original_request_rules_fail_closed(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """Per-upstream rules need the original path: a proxy that does not send it gets 403,
    never an answer decided without them."""
    sc = await ruled_site(start_sidecar, upstream_app)
    async with browser() as s:
        await login(s, sc, user="bob")
        async with s.get(sc.url("/oauth2/auth"), allow_redirects=False) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "original_request_unknown"
