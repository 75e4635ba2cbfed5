"""The sidecar as a real process against a certified OpenID provider (`oidc-provider`, Node).

The provider runs as a strict production IdP would (confidential client with
`client_secret_basic`, PKCE S256 required, refresh-token rotation, revocation, RP-initiated
logout); the browser is an aiohttp client that follows every redirect by hand and fills in the
provider's login form. The upstream asks the provider's userinfo endpoint about every token it
receives, so "the upstream got a token the IdP accepts" is checked by the IdP itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlsplit

import aiohttp
import pytest

from tests.support.browse import HTML, Hop, browse, path_of
from tests.support.configs import config_dict
from tests.support.login import JSON, browser, session_cookie
from tests.support.provider import ProviderHandle
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import Serve, VerifyingUpstream


@dataclass
class Setup:
    sidecar: SidecarProcess
    provider: ProviderHandle
    public_url: str
    upstream: VerifyingUpstream

    def url(self, path: str) -> str:
        return self.public_url + path


async def start_all(
    oidc_provider: Callable[..., ProviderHandle],
    sidecar_process: Callable[..., SidecarProcess],
    upstream_app: Serve,
    redis_prefix: str,
    *,
    post_logout_path: str = "/logged-out",
    **provider_options: Any,
) -> Setup:
    """Provider, then an upstream that checks tokens at the provider, then the sidecar."""
    data = config_dict()
    public_url = data["server"]["public_url"]
    post_logout_url = public_url + post_logout_path
    provider = oidc_provider(
        public_url, client={"post_logout_redirect_uris": [post_logout_url]}, **provider_options
    )
    upstream = VerifyingUpstream(provider.metadata["userinfo_endpoint"])
    upstream_url = await upstream_app(upstream.app())

    data["upstreams"] = [{"path": "/", "url": upstream_url}]
    data["public_paths"] = []
    data["oidc"] = provider.sidecar_oidc(post_logout_url)
    data["session"] = {**data["session"], "store": "redis"}
    data["redis"] = {"url": REDIS_URL, "key_prefix": redis_prefix}
    sidecar = sidecar_process(data)
    return Setup(sidecar, provider, public_url, upstream)


async def login(s: aiohttp.ClientSession, setup: Setup, user: str = "alice") -> list[Hop]:
    """The whole browser login starting from a protected page; returns the hops."""
    hops, status, body = await browse(s, setup.url("/"), login=user)
    assert status == 200, (hops, body, setup.sidecar.logs(), setup.provider.logs())
    return hops


async def api(s: aiohttp.ClientSession, setup: Setup, path: str = "/api") -> tuple[int, Any]:
    async with s.get(setup.url(path), headers=JSON, allow_redirects=False) as r:
        return r.status, await r.json()


async def test_login_upstream_gets_token_the_provider_accepts(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """A browser login through oidc-provider ends with the upstream holding a token that the
    provider's userinfo endpoint accepts for alice."""
    setup = await start_all(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    issuer = setup.provider.issuer
    async with browser() as s:
        hops = await login(s, setup)
        # / → /oauth2/start → provider /auth → login form → POST → /auth resume → callback → /
        assert [h.status for h in hops[:2]] == [302, 302]
        assert path_of(hops[0]) == "/" and path_of(hops[1]) == "/oauth2/start"
        auth = hops[2]
        assert auth.url.startswith(issuer + "/auth?")
        query = parse_qs(urlsplit(auth.url).query)
        assert query["code_challenge_method"] == ["S256"]
        assert set(query["scope"][0].split()) == {"openid", "email", "profile", "offline_access"}
        assert any(h.method == "POST" and "/interaction/" in h.url for h in hops)
        callback = next(h for h in hops if path_of(h) == "/oauth2/callback")
        assert callback.url.startswith(setup.public_url) and callback.status == 302
        assert parse_qs(urlsplit(callback.url).query)["iss"] == [issuer]

        status, body = await api(s, setup)
        assert status == 200, (body, setup.sidecar.logs())
        assert body["path"] == "/api"
        assert body["authorization"].startswith("Bearer ")
        assert body["userinfo_status"] == 200, body
        assert body["userinfo"]["sub"] == "alice"
        assert body["userinfo"]["email"] == "alice@example.com"
        assert body["headers"]["X-Forwarded-User"] == "alice"

    stats = setup.provider.stats()
    assert stats["grants"] == {"authorization_code": 1}
    assert stats["refresh_tokens_issued"] == 1
    assert stats["logins"] == ["alice"]
    assert stats["server_errors"] == []


async def test_logout_revokes_refresh_token_at_provider(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """Sign-out revokes the grant at the provider (its tokens stop working), sends the browser
    to the provider's end_session endpoint, and leaves the sidecar answering 401."""
    setup = await start_all(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    provider = setup.provider
    async with browser() as s:
        await login(s, setup)
        status, body = await api(s, setup)
        assert status == 200 and body["userinfo_status"] == 200, body
        token = body["authorization"]

        async with s.post(
            setup.url("/oauth2/sign_out"),
            headers={**HTML, "Origin": setup.public_url},
            allow_redirects=False,
        ) as r:
            assert r.status == 303, await r.text()
            location = r.headers["Location"]
        end_session = provider.metadata["end_session_endpoint"]
        assert location.startswith(end_session + "?")
        query = parse_qs(urlsplit(location).query)
        assert query["client_id"] == [provider.client_id]
        assert query["post_logout_redirect_uri"] == [setup.public_url + "/logged-out"]
        assert query["id_token_hint"][0].count(".") == 2

        # RFC 7009 revocation reached the provider, which revoked the whole grant ...
        stats = provider.stats()
        assert stats["revocations"] == 1, (stats, setup.sidecar.logs())
        assert stats["revocation_errors"] == 0
        issued = stats["refresh_token_grants"]
        assert [g["account_id"] for g in issued] == ["alice"]
        assert stats["revoked_grants"] == [
            {
                "grant_id": issued[0]["grant_id"],
                "route": "revocation",
                "token_kind": "RefreshToken",
                "account_id": "alice",
            }
        ]
        # ... so the access token the upstream had is no longer accepted either.
        async with (
            aiohttp.ClientSession() as plain,
            plain.get(
                provider.metadata["userinfo_endpoint"], headers={"Authorization": token}
            ) as r,
        ):
            assert r.status == 401

        # The sidecar session is gone.
        status, body = await api(s, setup)
        assert status == 401, body
        assert body["error"] == "unauthenticated"

        # The provider's logout page confirms itself (form with xsrf, logout=yes) and returns
        # the browser to the registered post_logout_redirect_uri.
        async with s.get(location, headers=HTML, allow_redirects=False) as r:
            assert r.status == 200, await r.text()
            page = await r.text()
        action = re.search(r'<form id="op.logoutForm" method="post" action="([^"]+)"', page)
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page)
        assert action and xsrf, page
        async with s.post(
            urljoin(location, action.group(1)),
            data={"xsrf": xsrf.group(1), "logout": "yes"},
            headers=HTML,
            allow_redirects=False,
        ) as r:
            assert r.status == 303, await r.text()
            assert r.headers["Location"] == setup.public_url + "/logged-out"
        assert provider.stats()["end_sessions"] == 1

        # The provider session ended too: the next login asks for credentials again.
        hops = await login(s, setup, user="bob")
        assert any(h.method == "POST" and "/interaction/" in h.url for h in hops)
        status, body = await api(s, setup)
        assert status == 200 and body["userinfo"]["sub"] == "bob", body
    assert provider.stats()["server_errors"] == []


async def test_relogin_leaves_only_newest_session(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """Logging in again in the same browser replaces the session: the old cookie gets 401,
    the new one works, and Redis holds a single session."""
    import redis.asyncio as redis

    setup = await start_all(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    async with browser() as s:
        await login(s, setup)
        old = session_cookie(s)
        assert (await api(s, setup))[0] == 200

        # Same browser, the provider's SSO session answers at once: no login form this time.
        hops, status, body = await browse(s, setup.url("/oauth2/start?rd=/again"), login=None)
        assert status == 200, (hops, body)
        assert not any(h.method == "POST" for h in hops)
        assert path_of(hops[-1]) == "/again"
        new = session_cookie(s)
        assert new != old
        status, body = await api(s, setup)
        assert status == 200 and body["userinfo_status"] == 200, body

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
        for cookie, expected in ((old, 401), (new, 200)):
            async with plain.get(
                setup.url("/api"), headers={**JSON, "Cookie": f"sidecar={cookie}"}
            ) as r:
                assert r.status == expected, await r.text()

    client: Any = redis.Redis.from_url(REDIS_URL)
    try:
        sessions = [k async for k in client.scan_iter(match=f"{redis_prefix}:s:*")]
    finally:
        await client.aclose()
    assert len(sessions) == 1, sessions
    stats = setup.provider.stats()
    assert stats["grants"] == {"authorization_code": 2}
    assert stats["logins"] == ["alice"]


@pytest.mark.parametrize(
    "conform_id_token_claims", [False, True], ids=["claims-in-id-token", "claims-at-userinfo-only"]
)
async def test_identity_headers_carry_email_and_groups(
    oidc_provider: Any,
    sidecar_process: Any,
    upstream_app: Any,
    redis_prefix: str,
    conform_id_token_claims: bool,
) -> None:
    """The upstream gets the user's email and groups as identity headers, whether the IdP puts
    these claims in the ID token or, as OIDC Core §5.4 has it, only at its userinfo endpoint."""
    setup = await start_all(
        oidc_provider,
        sidecar_process,
        upstream_app,
        redis_prefix,
        conform_id_token_claims=conform_id_token_claims,
    )
    async with browser() as s:
        await login(s, setup)
        status, body = await api(s, setup)
    assert status == 200, body
    headers = body["headers"]
    assert headers["X-Forwarded-User"] == "alice"
    assert headers.get("X-Forwarded-Email") == "alice@example.com", headers
    assert "admins" in headers.get("X-Forwarded-Groups", ""), headers


async def test_post_logout_redirect_url_sent_verbatim(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """A post-logout URL with a trailing slash is sent exactly as configured, so the
    provider's exact-match check of the registered URI accepts it."""
    setup = await start_all(
        oidc_provider, sidecar_process, upstream_app, redis_prefix, post_logout_path="/"
    )
    async with browser() as s:
        await login(s, setup)
        async with s.post(
            setup.url("/oauth2/sign_out"),
            headers={**HTML, "Origin": setup.public_url},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            location = r.headers["Location"]
        async with s.get(location, headers=HTML, allow_redirects=False) as r:
            page = await r.text()
            assert r.status == 200, page
    query = parse_qs(urlsplit(location).query)
    assert query["post_logout_redirect_uri"] == [setup.public_url + "/"]


async def test_provider_rotates_refresh_tokens_and_revokes_grant_on_reuse(
    oidc_provider: Any,
) -> None:
    """Harness self-check (no sidecar): the provider rotates refresh tokens and, when a rotated
    one is presented again, revokes the whole grant, as the refresh tests rely on."""
    import base64
    import hashlib
    import secrets

    public_url = "http://127.0.0.1:9"  # nobody listens: the callback is only read, not followed
    provider = oidc_provider(public_url)
    meta = provider.metadata
    redirect_uri = public_url + "/oauth2/callback"
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    params = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid email profile offline_access",
        "state": "s",
        "nonce": "n",
        "code_challenge": challenge.decode(),
        "code_challenge_method": "S256",
    }
    pair = f"{quote(provider.client_id, safe='')}:{quote(provider.client_secret, safe='')}"
    basic = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}  # RFC 6749

    async with browser() as s:
        # PKCE is required: an authorization request without it is refused.
        no_pkce = {k: v for k, v in params.items() if not k.startswith("code_challenge")}
        async with s.get(
            meta["authorization_endpoint"], params=no_pkce, allow_redirects=False
        ) as r:
            assert "error=invalid_request" in r.headers["Location"]

        url = meta["authorization_endpoint"] + "?" + urlencode(params)
        hops, status, callback = await browse(s, url, stop_at=redirect_uri)
        assert status == 0, (hops, callback)
        code = parse_qs(urlsplit(callback).query)["code"][0]

        async def token(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
            async with s.post(meta["token_endpoint"], data=form, headers=basic) as r:
                return r.status, await r.json()

        status, first = await token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        )
        assert status == 200, first
        assert first["expires_in"] <= 60 and "refresh_token" in first
        rt1 = first["refresh_token"]
        status, second = await token({"grant_type": "refresh_token", "refresh_token": rt1})
        assert status == 200, second
        rt2 = second["refresh_token"]
        assert rt2 != rt1
        # Reuse of the rotated token: refused, and the grant (with rt2) is revoked.
        status, reuse = await token({"grant_type": "refresh_token", "refresh_token": rt1})
        assert (status, reuse["error"]) == (400, "invalid_grant")
        status, after = await token({"grant_type": "refresh_token", "refresh_token": rt2})
        assert (status, after["error"]) == (400, "invalid_grant")

    stats = provider.stats()
    assert stats["grants"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["refresh_tokens_consumed"] == 1
    assert stats["grant_errors"] == {"invalid_grant": 2}
    assert stats["server_errors"] == []
