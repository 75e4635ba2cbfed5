"""Real front proxies asking `/oauth2/auth` (docs/forward-auth.md): nginx `auth_request` and
Caddy `forward_auth` in redirect mode, before an in-process sidecar (trusting loopback, where
the proxies connect from) and the echo upstream.

The proxies run the guide's own configurations: tests/support/front_proxies.py holds the
templates, renders them with the test's addresses here and with the guide's placeholders'
values for the check that the guide shows them unchanged. The sidecar routes the original
path through the same upstream the proxy serves (`/`), whose rules are `RULES`: `/admin`
for the `admins` group (the dev IdP's alice, not bob), `/pub` public, the rest for any
logged-in user.

Hostile requests go over raw sockets (an HTTP client would normalise their paths); the echo
upstream's record shows whether anything, and what, reached it. Bearer-token clients through
each proxy go with `bearer_get` (tests/support/front_proxies.py) and the `site` fixture.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from multidict import CIMultiDict

from sidecar.config import Config
from tests.support.configs import config_dict
from tests.support.front_proxies import (
    CADDYFILE,
    GUIDE_VALUES,
    NGINX_SERVER,
    FrontProxy,
    bearer_get,
    browse_and_log_in,
    render,
    run_caddy,
    run_nginx,
)
from tests.support.idp import shared_idp
from tests.support.login import NAVIGATE, browser, session_cookie
from tests.support.ports import free_port
from tests.support.raw_http import RawMessage, raw_exchange, raw_get
from tests.support.repo import REPO_ROOT
from tests.support.sidecars import StartSidecar, ready
from tests.support.upstreams import Serve, echo_app, header, jwt_claims

RULES = [{"paths": ["/admin/**"], "groups": ["admins"]}, {"paths": ["/pub/**"], "allow": "public"}]
IDENTITY = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "Authorization")
SPOOFED = (
    "X-Forwarded-User: mallory",
    "X-Forwarded-Email: mallory@example.com",
    "X-Forwarded-Groups: admins",
    "Authorization: Bearer forged",
    "X-Forwarded-Uri: /pub/x",
    "X-Original-URI: /pub/x",
)
# Spellings of /admin/x that the proxy and the sidecar must both read as /admin/x, or refuse.
ADMIN_SPELLINGS = [
    "/admin/x",
    "/pub/../admin/x",
    "/pub/%2e%2e/admin/x",
    "/pub/%2E%2E/admin/x",
    "/pub/.%2e/admin/x",
    "/pub/x/../../admin/x",
    "/pub/./../admin/x",
    "//admin/x",
    "/%61dmin/x",
    "/pub/..%2Fadmin/x",
    "/pub%2F..%2Fadmin/x",
    "/admin/x?/pub/x",
]
# Spellings of the sidecar's forward-auth endpoint: none may answer a client through a proxy.
AUTH_SPELLINGS = [
    "/oauth2/auth",
    "/oauth2/auth?x=1",
    "/oauth2/auth/admin/x",
    "/oauth2/./auth",
    "/oauth2//auth",
    "/oauth2/start/../auth",
    "/oauth2/%61uth",
    "/oauth2/start%2F..%2Fauth",
    "/oauth2/auth%2F..%2Fstart",
    "/oauth2/auth;x",
    "/OAUTH2/auth",
]


@dataclass
class Site:
    """A front proxy before the sidecar before the echo upstream."""

    kind: str  # "nginx" or "caddy"
    proxy: str  # the front proxy's URL, which is the sidecar's public_url
    seen: list[CIMultiDict[str]]  # the headers of each request the upstream got
    front: FrontProxy


def sidecar_config(public_url: str, app_url: str, **sections: Any) -> Config:
    """`RULES` on `/` for the proxy's upstream; the proxy (loopback) is trusted."""
    data = config_dict(
        app_url,
        oidc=shared_idp().oidc_section(public_url),
        upstreams=[{"path": "/", "url": app_url, "rules": RULES}],
        public_paths=[],
        **sections,
    )
    data["server"] = {
        **data["server"],
        "public_url": public_url,
        "trusted_proxies": ["127.0.0.1/32"],
    }
    return Config.model_validate(data)


def authority(url: str) -> str:
    return url.split("://", 1)[1]


@contextlib.asynccontextmanager
async def open_site(
    kind: str, start_sidecar: StartSidecar, upstream_app: Serve, tmp_path: Path
) -> AsyncIterator[Site]:
    seen: list[CIMultiDict[str]] = []
    app = await upstream_app(echo_app(seen=seen))
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    sections: dict[str, Any] = {"bearer": {"accept_provider_tokens": True}}
    if kind == "caddy":
        sections["forward_auth"] = {"redirect": True}
    sidecar = await start_sidecar(sidecar_config(public, app, **sections))
    await ready(sidecar)
    values = {"__SIDECAR__": authority(sidecar.url("")), "__APP__": authority(app)}
    if kind == "nginx":
        server = render(NGINX_SERVER, {**values, "__LISTEN__": f"127.0.0.1:{port}"})
        running = run_nginx(tmp_path / "nginx", port, server)
    else:
        site = render(CADDYFILE, {**values, "__SITE__": public})
        running = run_caddy(tmp_path / "caddy", port, site)
    async with running as front:
        yield Site(kind, front.url, seen, front)


@pytest.fixture
async def nginx_site(
    start_sidecar: StartSidecar, upstream_app: Serve, tmp_path: Path
) -> AsyncIterator[Site]:
    """nginx `auth_request` (`forward_auth.redirect` off: nginx sends 401s to login)."""
    async with open_site("nginx", start_sidecar, upstream_app, tmp_path) as site:
        yield site


@pytest.fixture
async def caddy_site(
    start_sidecar: StartSidecar, upstream_app: Serve, tmp_path: Path
) -> AsyncIterator[Site]:
    """Caddy `forward_auth` (`forward_auth.redirect` on: the sidecar sends navigations)."""
    async with open_site("caddy", start_sidecar, upstream_app, tmp_path) as site:
        yield site


@pytest.fixture(params=["nginx", "caddy"])
async def site(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, upstream_app: Serve, tmp_path: Path
) -> AsyncIterator[Site]:
    async with open_site(request.param, start_sidecar, upstream_app, tmp_path) as opened:
        yield opened


# --- clients -------------------------------------------------------------------------------


async def logged_in(site: Site, user: str) -> str:
    """`user`'s session cookie, logged in through the proxy."""
    async with browser() as s:
        trip = await browse_and_log_in(s, site.proxy, "/", user, headers=NAVIGATE)
        assert trip.final_status == 200, trip.explain()
        return session_cookie(s)


@dataclass
class Answer:
    """What a raw request through the proxy got, and what it made reach the upstream."""

    response: RawMessage
    upstream: list[CIMultiDict[str]]  # the headers of each request the upstream got for it

    def echoed(self) -> dict[str, Any]:
        """The upstream's description of the request it got (the answer is its JSON)."""
        assert self.response.get("X-Upstream") == "echo", self.explain()
        return dict(json.loads(self.response.body))

    def explain(self) -> str:
        return f"{self.response.start_line} {self.response.body[:300]!r}"


async def send(site: Site, target: str, cookie: str | None = None, *lines: str) -> Answer:
    """GET `target` exactly as written, as an API client (Accept: JSON)."""
    head = [f"Host: {authority(site.proxy)}", "Accept: application/json", "Connection: close"]
    if cookie is not None:
        head.append(f"Cookie: sidecar={cookie}")
    before = len(site.seen)
    response = await raw_exchange(site.proxy, raw_get(target, *head, *lines))
    return Answer(response, site.seen[before:])


def identity_of(body: dict[str, Any]) -> dict[str, list[str]]:
    """The identity headers the upstream got (none: an empty dict)."""
    return {name: header(body, name) for name in IDENTITY if header(body, name)}


def assert_identity(body: dict[str, Any], user: str, email: str, groups: str) -> None:
    identity = identity_of(body)
    assert identity.keys() == set(IDENTITY), identity
    assert identity["X-Forwarded-User"] == [user]
    assert identity["X-Forwarded-Email"] == [email]
    assert identity["X-Forwarded-Groups"] == [groups]
    [authorization] = identity["Authorization"]
    assert authorization.startswith("Bearer ")
    assert jwt_claims(authorization.removeprefix("Bearer "))["sub"] == user


# --- nginx auth_request ----------------------------------------------------------------------


async def test_nginx_sends_a_browser_through_login_to_the_app(nginx_site: Site) -> None:
    """Anonymous → nginx's 401 page sends to /oauth2/start (through nginx) → dev IdP → nginx's
    /oauth2/callback → back to the page, which the upstream gets with alice's identity.

    Breaks when the sidecar's 401 no longer triggers nginx's `error_page`, when login does
    not work through the proxy (public_url, cookies), or when the 202 stops carrying the
    identity headers nginx copies (`auth_request_set`).
    """
    proxy = nginx_site.proxy
    async with browser() as s:
        trip = await browse_and_log_in(s, proxy, "/app/page?x=1", "alice", headers=NAVIGATE)
    hops = [url for _, url in trip.hops]
    assert [status for status, _ in trip.hops] == [302, 302, 302, 302, 200], trip.explain()
    assert hops[0] == f"{proxy}/app/page?x=1"
    assert hops[1] == f"{proxy}/oauth2/start?rd=/app/page?x=1"
    assert hops[2].startswith(shared_idp().issuer + "/authorize?"), trip.explain()
    assert parse_qs(urlsplit(hops[2]).query)["redirect_uri"] == [f"{proxy}/oauth2/callback"]
    assert hops[3].startswith(f"{proxy}/oauth2/callback?"), trip.explain()
    assert hops[4] == f"{proxy}/app/page?x=1"
    assert trip.final_body["path"] == "/app/page?x=1"
    assert_identity(trip.final_body, "alice", "alice@example.com", "admins,staff")


async def test_nginx_returns_login_for_any_anonymous_request(nginx_site: Site) -> None:
    """nginx cannot tell navigations from API calls: every 401 becomes its redirect."""
    answer = await send(nginx_site, "/app/page?x=1")
    assert answer.response.status == 302
    assert answer.response.get("Location") == f"{nginx_site.proxy}/oauth2/start?rd=/app/page?x=1"
    assert answer.upstream == []


# --- Caddy forward_auth, redirect mode -------------------------------------------------------


async def test_caddy_sends_a_browser_through_login_to_the_app(caddy_site: Site) -> None:
    """The sidecar's own 302 (redirect mode) reaches the browser through Caddy; login runs
    through Caddy's /oauth2/* and ends on the page, with alice's identity at the upstream.

    Breaks when redirect mode stops recognising Caddy's request (navigation headers,
    X-Forwarded-Host against public_url), or Caddy's `copy_headers` find nothing to copy.
    """
    proxy = caddy_site.proxy
    async with browser() as s:
        trip = await browse_and_log_in(s, proxy, "/admin/x?y=1", "alice", headers=NAVIGATE)
    hops = [url for _, url in trip.hops]
    assert [status for status, _ in trip.hops] == [302, 302, 302, 302, 200], trip.explain()
    assert hops[0] == f"{proxy}/admin/x?y=1"
    assert hops[1] == f"{proxy}/oauth2/start?rd=/admin/x?y%3D1"
    assert hops[2].startswith(shared_idp().issuer + "/authorize?"), trip.explain()
    assert parse_qs(urlsplit(hops[2]).query)["redirect_uri"] == [f"{proxy}/oauth2/callback"]
    assert hops[3].startswith(f"{proxy}/oauth2/callback?"), trip.explain()
    assert hops[4] == f"{proxy}/admin/x?y=1"
    assert trip.final_body["path"] == "/admin/x?y=1"
    assert_identity(trip.final_body, "alice", "alice@example.com", "admins,staff")


async def test_caddy_refuses_bob_on_admin_after_his_login(caddy_site: Site) -> None:
    """bob logs in through Caddy like alice, then gets the sidecar's 403 for /admin: nothing
    reaches the upstream on his way."""
    async with browser() as s:
        trip = await browse_and_log_in(s, caddy_site.proxy, "/admin/x", "bob", headers=NAVIGATE)
    assert [status for status, _ in trip.hops] == [302, 302, 302, 302, 403], trip.explain()
    assert trip.hops[-1][1] == f"{caddy_site.proxy}/admin/x"
    assert "not allowed" in trip.final_body
    assert caddy_site.seen == []


async def test_caddy_answers_api_clients_401_not_a_redirect(caddy_site: Site) -> None:
    """Redirect mode is for navigations: an API client without a session gets 401 JSON."""
    answer = await send(caddy_site, "/admin/x")
    assert answer.response.status == 401, answer.explain()
    assert answer.response.get("Location") is None
    assert answer.upstream == []


# --- both proxies ----------------------------------------------------------------------------


async def test_route_rules_decide_on_the_original_path(site: Site) -> None:
    """The sidecar routes the path the proxy asks about through its own upstreams and applies
    that upstream's rules: alice passes /admin with her identity, bob gets 403 with nothing
    upstream, /pub passes anyone without identity headers (even ones the client sent).

    Breaks when forward-auth decides on its own request path instead of the original one,
    or when a proxy lets a client's identity headers through to the upstream.
    """
    alice, bob = await logged_in(site, "alice"), await logged_in(site, "bob")

    admin = await send(site, "/admin/x", alice)
    assert admin.response.status == 200, admin.explain()
    assert len(admin.upstream) == 1
    assert admin.echoed()["raw_path"] == "/admin/x"
    assert_identity(admin.echoed(), "alice", "alice@example.com", "admins,staff")

    refused = await send(site, "/admin/x", bob)
    assert refused.response.status == 403, refused.explain()
    assert refused.upstream == []

    staff = await send(site, "/app", bob)
    assert staff.response.status == 200, staff.explain()
    assert_identity(staff.echoed(), "bob", "bob@example.com", "staff")

    for who, cookie in (("anonymous", None), ("bob", bob)):
        public = await send(site, "/pub/x", cookie, *SPOOFED)
        assert public.response.status == 200, (who, public.explain())
        assert len(public.upstream) == 1
        assert public.echoed()["raw_path"] == "/pub/x"
        assert identity_of(public.echoed()) == {}, (who, public.echoed()["headers"])


async def test_bearer_clients_pass_through_the_proxy_under_the_same_rules(site: Site) -> None:
    """A machine client with the provider's access token and no cookie: the proxy asks
    forward-auth, which validates the token, applies the rules to the token's claims and
    answers the token back for the upstream."""
    tokens = {}
    for user in ("alice", "bob"):
        answer = await send(site, "/app", await logged_in(site, user))
        tokens[user] = header(answer.echoed(), "Authorization")[0].removeprefix("Bearer ")
    async with browser() as s:
        status, body = await bearer_get(s, site.proxy, "/app", tokens["alice"])
        assert status == 200, body
        assert header(body, "Authorization") == [f"Bearer {tokens['alice']}"]
        assert header(body, "X-Forwarded-User") == ["alice"]
        before = len(site.seen)
        # The token's own claims decide: the dev IdP's access tokens carry no groups.
        status, _ = await bearer_get(s, site.proxy, "/admin/x", tokens["alice"])
        assert status == 403
        status, _ = await bearer_get(s, site.proxy, "/app", "not-a-token")
        assert status == (302 if site.kind == "nginx" else 401)  # nginx: error_page 401
        assert len(site.seen) == before


async def test_no_spelling_of_admin_reaches_the_upstream_for_others(site: Site) -> None:
    """Anonymous users and bob never get a request to the upstream by another spelling of
    /admin: the proxy routes on its normalised path, the sidecar decides on its canonical
    form of the raw `X-Forwarded-Uri`, and the two agree or the sidecar refuses (403).

    Breaks when the sidecar decides on the raw or half-decoded original URI
    (`/pub/%2e%2e/admin/x` as public) while the proxy and upstream resolve it to /admin.
    """
    bob = await logged_in(site, "bob")
    anonymous = 302 if site.kind == "nginx" else 401  # nginx turns every 401 into login
    failures = []
    for who, cookie, expected in (("anonymous", None, anonymous), ("bob", bob, 403)):
        for target in ADMIN_SPELLINGS:
            answer = await send(site, target, cookie)
            status = answer.response.status
            if answer.upstream or status not in (expected, 403):
                failures.append(f"{who} {target!r}: {answer.explain()}, upstream {answer.upstream}")
    assert not failures, "\n".join(failures)

    alice = await logged_in(site, "alice")
    for target in ("/pub/../admin/x", "/pub/%2e%2e/admin/x", "//admin/x", "/%61dmin/x"):
        answer = await send(site, target, alice)
        assert answer.response.status == 200, (target, answer.explain())
        assert_identity(answer.echoed(), "alice", "alice@example.com", "admins,staff")


@pytest.mark.parametrize("target", ["/admin/../pub/x", "/admin/%2e%2e/pub/x"])
async def test_what_the_upstream_gets_for_a_public_path_spelt_through_admin(
    site: Site, target: str
) -> None:
    """`/admin/../pub/x` is /pub/x to the proxy and to the sidecar: public, no identity.

    nginx hands the upstream its normalised path (the guide's `rewrite ^ $uri break;`);
    Caddy hands it the client's spelling, which an upstream must resolve the same way
    (docs/forward-auth.md, "The path the upstream gets").
    """
    answer = await send(site, target)
    assert answer.response.status == 200, answer.explain()
    forwarded = "/pub/x" if site.kind == "nginx" else target
    assert answer.echoed()["raw_path"] == forwarded
    assert identity_of(answer.echoed()) == {}


async def test_the_forward_auth_answer_never_reaches_a_client(site: Site) -> None:
    """The proxy trusted by the sidecar relays browsers to /oauth2/*, but no spelling of
    /oauth2/auth gets the sidecar's 202 (and its access token) back to the client.

    Breaks when the guide's block of /oauth2/auth goes (the sidecar answers every request the
    trusted proxy relays, a browser's too) or misses a spelling the sidecar routes there.
    """
    alice = await logged_in(site, "alice")
    leaks = []
    for target in AUTH_SPELLINGS:
        answer = await send(site, target, alice)
        response = answer.response
        from_upstream = response.get("X-Upstream") == "echo"  # reflects its own request
        if (
            response.status == 202
            or response.get("Authorization") is not None
            or response.get("X-Forwarded-User") is not None
            or (b"Bearer" in response.body and not from_upstream)
        ):
            leaks.append(f"{target!r}: {answer.explain()} {response.headers}")
    assert not leaks, "\n".join(leaks)


# --- the guide -------------------------------------------------------------------------------


def test_the_guide_shows_the_tested_configurations() -> None:
    """docs/forward-auth.md shows the templates these tests run, with its own addresses."""
    guide = (REPO_ROOT / "docs" / "forward-auth.md").read_text()
    assert render(NGINX_SERVER, GUIDE_VALUES) in guide
    assert render(CADDYFILE, GUIDE_VALUES) in guide
