"""Route rules per upstream (docs/rules.md): ordered, first match wins, on the method and the
canonical path only; public, deny, or a login that meets the rule's conditions. A matrix of
methods, paths (hostile spellings included) and callers, over raw sockets so no client
normalises the path first."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar.access.routes import RouteTable, glob_pattern
from sidecar.config import AccessConfig, RouteRule
from tests.support.configs import make_config
from tests.support.login import login_cookie
from tests.support.raw_http import raw_exchange, raw_get
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import Sidecar, StartSidecar, ready

RULES: list[dict[str, Any]] = [
    {"methods": ["OPTIONS"], "allow": "public"},
    {"paths": ["/api/health"], "allow": "public"},
    {"paths": ["/api/admin/**"], "groups": ["admins"]},
    {"methods": ["GET"], "paths": ["/api/orders/*"], "claims": {"email": ["bob@example.com"]}},
    {"paths": ["/api/orders/*"], "email_domains": ["example.com"]},
    {"paths": ["/api/reports/**"], "claims": {"groups": ["staff"]}, "emails": ["bob@example.com"]},
    {"paths": ["/api/tokens/**"], "scopes": ["tokens.read"]},
    {"paths": ["/api/open/*/x"], "allow": "authenticated"},
    {"allow": "deny"},
]

ANON, ALICE, BOB, CAROL = "anonymous", "alice", "bob", "carol"
FORWARD = 200
LOGIN, DENY, BAD = 401, 403, 400

# (method, raw path) → expected status per caller (alice: admins+staff @example.com; bob:
# staff @example.com; carol: no groups @example.org).
MATRIX: list[tuple[str, str, dict[str, int]]] = [
    ("OPTIONS", "/api/anything", dict.fromkeys((ANON, ALICE, BOB, CAROL), FORWARD)),
    ("GET", "/api/health", dict.fromkeys((ANON, ALICE, BOB, CAROL), FORWARD)),
    ("GET", "/api/health?x=/api/admin/x", dict.fromkeys((ANON, ALICE, BOB, CAROL), FORWARD)),
    ("GET", "/api/./health", dict.fromkeys((ANON, ALICE, BOB, CAROL), FORWARD)),
    ("GET", "/api/health/", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    ("POST", "/api/health", dict.fromkeys((ANON, ALICE, BOB, CAROL), FORWARD)),
    ("GET", "/api/admin", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/admin/users/1", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("DELETE", "/api/admin/users/1", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/health/../admin/x", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/health/%2e%2e/admin/x", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api//admin/x", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/%61dmin/x", {ANON: LOGIN, ALICE: FORWARD, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/health%2F..%2Fadmin/x", dict.fromkeys((ANON, ALICE, BOB, CAROL), BAD)),
    ("GET", "/api/health/..;/admin/x", dict.fromkeys((ANON, ALICE, BOB, CAROL), BAD)),
    ("GET", "/api/ADMIN/x", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/administrator", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    # First match wins: alice fails the GET rule and never reaches the domain rule below it.
    ("GET", "/api/orders/7", {ANON: LOGIN, ALICE: DENY, BOB: FORWARD, CAROL: DENY}),
    ("POST", "/api/orders/7", {ANON: LOGIN, ALICE: FORWARD, BOB: FORWARD, CAROL: DENY}),
    ("GET", "/api/orders/7/items", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/reports/q1", {ANON: LOGIN, ALICE: DENY, BOB: FORWARD, CAROL: DENY}),
    ("GET", "/api/tokens/x", {ANON: LOGIN, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/open/y/x", {ANON: LOGIN, ALICE: FORWARD, BOB: FORWARD, CAROL: FORWARD}),
    ("GET", "/api/open/y/z/x", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
    ("GET", "/api/elsewhere?/api/health", {ANON: DENY, ALICE: DENY, BOB: DENY, CAROL: DENY}),
]


@pytest.fixture
async def site(start_sidecar: StartSidecar) -> Any:
    upstream = RecordingUpstream()
    await upstream.start()
    config = make_config(
        upstream.url,
        public_paths=[],
        upstreams=[{"path": "/api", "url": upstream.url, "rules": RULES}],
        server={
            **make_config().server.model_dump(mode="json"),
            "trusted_proxies": ["127.0.0.1/32"],
        },
    )
    sc = await start_sidecar(config)
    await ready(sc)
    cookies = {
        user: await login_cookie(sc, user, path="/oauth2/start?rd=/")
        for user in (ALICE, BOB, CAROL)
    }
    yield sc, upstream, cookies
    await upstream.close()


async def status_of(sc: Sidecar, method: str, path: str, cookie: str | None) -> int:
    headers = ["Accept: application/json"]
    if cookie is not None:
        headers.append(f"Cookie: sidecar={cookie}")
    if method not in ("GET", "HEAD", "OPTIONS"):
        headers += ["Origin: " + sc.config.server.public_url, "Content-Length: 0"]
    response = await raw_exchange(sc.url(""), raw_get(path, *headers, method=method))
    return response.status


async def test_the_rules_matrix(site: Any) -> None:
    sc, upstream, cookies = site
    failures = []
    for method, path, expected in MATRIX:
        for caller, status in expected.items():
            before = len(upstream.requests)
            got = await status_of(sc, method, path, cookies.get(caller))
            reached = len(upstream.requests) > before
            if got != status or reached != (status == FORWARD):
                failures.append(f"{method} {path} as {caller}: {got} (expected {status})")
    assert not failures, "\n".join(failures)


# Forward-auth answers 202 where the proxy forwards, and refuses a path with no single meaning
# with 403 (a front proxy shows anything but 401/403 as its own 500).
AS_FORWARD_AUTH = {FORWARD: 202, LOGIN: LOGIN, DENY: DENY, BAD: DENY}


async def forward_auth_status(sc: Sidecar, method: str, path: str, cookie: str | None) -> int:
    headers = ["Accept: application/json", f"X-Forwarded-Method: {method}"]
    headers.append(f"X-Forwarded-Uri: {path}")
    if cookie is not None:
        headers.append(f"Cookie: sidecar={cookie}")
    if method not in ("GET", "HEAD", "OPTIONS"):
        headers.append("Origin: " + sc.config.server.public_url)
    response = await raw_exchange(sc.url(""), raw_get("/oauth2/auth", *headers))
    return response.status


async def test_the_rules_matrix_through_forward_auth(site: Any) -> None:
    """The same table, asked as nginx `auth_request` asks: the original request described by
    X-Forwarded-Method and X-Forwarded-Uri."""
    sc, upstream, cookies = site
    failures = []
    for method, path, expected in MATRIX:
        for caller, status in expected.items():
            got = await forward_auth_status(sc, method, path, cookies.get(caller))
            if got != AS_FORWARD_AUTH[status]:
                failures.append(f"{method} {path} as {caller}: {got} (expected {status})")
    assert not failures, "\n".join(failures)
    assert upstream.requests == []


async def test_a_denial_names_no_internals(site: Any) -> None:
    sc, _, cookies = site
    response = await raw_exchange(
        sc.url(""),
        raw_get("/api/admin/x", "Accept: application/json", f"Cookie: sidecar={cookies[BOB]}"),
    )
    assert response.status == 403
    body = response.body.decode()
    assert "admins" not in body and "rule" not in body and "groups" not in body
    page = await raw_exchange(
        sc.url(""),
        raw_get(
            "/api/admin/x",
            "Accept: text/html",
            "Sec-Fetch-Mode: navigate",
            f"Cookie: sidecar={cookies[BOB]}",
        ),
    )
    assert page.status == 403 and (page.get("content-type") or "").startswith("text/html")


async def test_without_rules_the_upstream_access_applies(start_sidecar: StartSidecar) -> None:
    upstream = RecordingUpstream()
    await upstream.start()
    try:
        config = make_config(
            upstream.url,
            public_paths=[],
            upstreams=[
                {"path": "/", "url": upstream.url, "access": {"allowed_groups": ["admins"]}}
            ],
        )
        sc = await start_sidecar(config)
        await ready(sc)
        alice = await login_cookie(sc, ALICE, path="/oauth2/start?rd=/")
        bob = await login_cookie(sc, BOB, path="/oauth2/start?rd=/")
        assert await status_of(sc, "GET", "/x", alice) == 200
        assert await status_of(sc, "GET", "/x", bob) == 403
    finally:
        await upstream.close()


# --- the glob and the table, as units ------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "path", "match"),
    [
        ("/api/*", "/api/x", True),
        ("/api/*", "/api/", True),
        ("/api/*", "/api/x/y", False),
        ("/api/*", "/api", False),
        ("/api/**", "/api", True),
        ("/api/**", "/api/", True),
        ("/api/**", "/api/x/y/z", True),
        ("/api/**", "/apix", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/x/y/bc", False),
        ("/v*/users", "/v2/users", True),
        ("/v*/users", "/v2/x/users", False),
        ("/a.b/*", "/aXb/c", False),
        ("/a+/(x)", "/a+/(x)", True),
        ("/**", "/anything/at/all", True),
    ],
)
def test_glob_pattern(glob: str, path: str, match: bool) -> None:
    assert bool(glob_pattern(glob).match(path)) is match


@given(st.text(alphabet="ab/.*x", max_size=12), st.text(alphabet="ab/.x", max_size=12))
def test_a_glob_without_stars_matches_only_itself(glob: str, path: str) -> None:
    glob, path = "/" + glob.replace("*", ""), "/" + path
    assert bool(glob_pattern(glob).match(path)) is (glob == path)


def test_first_match_wins_and_methods_are_matched_in_upper_case() -> None:
    table = RouteTable(
        [
            RouteRule(methods=["get"], paths=["/a/*"], allow="public"),
            RouteRule(paths=["/a/**"], allow="deny"),
        ]
    )
    first = table.match("GET", "/a/x")
    assert first is not None and first.index == 0
    second = table.match("DELETE", "/a/x")
    assert second is not None and second.index == 1
    assert table.match("GET", "/b") is None


def test_claim_conditions_compare_any_value_and_booleans_as_json() -> None:
    table = RouteTable(
        [RouteRule(claims={"realm_access.roles": ["reporting"], "email_verified": [True]})]
    )
    route = table.routes[0]
    access = AccessConfig()
    claims = {"realm_access": {"roles": ["x", "reporting"]}, "email_verified": True}
    assert route.permits(claims, (), access)
    assert not route.permits({**claims, "email_verified": "true"}, (), access)
    assert not route.permits({"realm_access": {"roles": ["x"]}, "email_verified": True}, (), access)
    one = RouteTable([RouteRule(claims={"level": [1]})]).routes[0]
    assert one.permits({"level": 1}, (), access)
    assert not one.permits({"level": True}, (), access)
    assert not one.permits({"level": "1"}, (), access)


def test_scopes_need_every_scope() -> None:
    route = RouteTable([RouteRule(scopes=["a", "b"])]).routes[0]
    assert route.permits({}, {"a", "b", "c"}, AccessConfig())
    assert not route.permits({}, {"a"}, AccessConfig())


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"paths": ["api/x"]}, "starts with /"),
        ({"paths": ["/api?x"]}, "no query"),
        ({"paths": ["/api/a**"]}, "whole segment"),
        ({"methods": ["G ET"]}, "not an HTTP method"),
        ({"allow": "public", "groups": ["x"]}, "takes no conditions"),
        ({"allow": "deny", "scopes": ["x"]}, "takes no conditions"),
        ({"allow": "maybe"}, "allow"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(rule: dict[str, Any], problem: str) -> None:
    from sidecar.config import parse_config
    from sidecar.errors import ConfigError
    from tests.support.configs import fixed_config

    data = fixed_config()
    data["upstreams"][0]["rules"] = [rule]
    with pytest.raises(ConfigError) as raised:
        parse_config(yaml.safe_dump(data))
    assert "upstreams[0].rules[0]" in str(raised.value) or "upstreams.0.rules.0" in str(
        raised.value
    )
    assert problem in str(raised.value)
