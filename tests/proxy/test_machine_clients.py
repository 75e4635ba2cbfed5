"""Machine clients through the proxy and forward-auth (docs/machine-clients.md): a bearer
token and no session is validated and forwarded with its own Authorization and identity
headers from its claims; refusals follow RFC 6750 §3; a session cookie wins over a token."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from joserfc.jwk import RSAKey

from tests.support.configs import make_config
from tests.support.jwks_server import IssuerServer, sign
from tests.support.login import browser, login, session_cookie
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.upstreams import Serve, echo_app, header

AUDIENCE = "api://orders"
RULES = [
    {"methods": ["GET"], "paths": ["/api/orders/*"], "scopes": ["orders.read"]},
    {"paths": ["/api/admin/**"], "groups": ["admins"]},
]


@pytest.fixture(scope="module")
def key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


@pytest.fixture
def issuer(key: RSAKey) -> Iterator[IssuerServer]:
    server = IssuerServer([key])
    yield server
    server.stop()


def token(issuer: IssuerServer, key: RSAKey, **changes: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": issuer.issuer,
        "sub": "ci-robot",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "scope": "orders.read reports",
        "groups": ["robots"],
        "email": "robot@example.com",
        **changes,
    }
    return sign({k: v for k, v in claims.items() if v is not None}, key)


@pytest.fixture
async def site(
    start_sidecar: StartSidecar, upstream_app: Serve, issuer: IssuerServer
) -> AsyncIterator[Sidecar]:
    base = await upstream_app(echo_app())
    config = make_config(
        base,
        public_paths=[],
        upstreams=[{"path": "/", "url": base, "rules": RULES}],
        server={
            **make_config().server.model_dump(mode="json"),
            "trusted_proxies": ["127.0.0.1/32"],
        },
        bearer={
            "accept_provider_tokens": True,
            "issuers": [{"issuer": issuer.issuer, "audiences": [AUDIENCE]}],
        },
        inject={"headers": {"X-Forwarded-User": "sub", "X-Forwarded-Groups": "groups"}},
    )
    sc = await start_sidecar(config)
    await ready(sc)
    yield sc


async def call(
    sc: Sidecar, path: str, bearer: str | None, method: str = "GET", **headers: str
) -> tuple[int, Any, dict[str, str]]:
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s,
        s.request(method, sc.url(path), headers={"Accept": "application/json", **headers}) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, dict(r.headers)


async def test_a_valid_token_goes_upstream_with_its_identity(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    presented = token(issuer, key)
    status, body, _ = await call(site, "/api/orders/7", presented)
    assert status == 200
    assert header(body, "Authorization") == [f"Bearer {presented}"]
    assert header(body, "X-Forwarded-User") == ["ci-robot"]
    assert header(body, "X-Forwarded-Groups") == ["robots"]


@pytest.mark.parametrize(
    ("changes", "description"),
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"aud": "api://other"}, "wrong audience"),
        ({"iss": "https://unknown.example"}, "unknown issuer"),
        ({"sub": None}, "token has no subject"),
    ],
)
async def test_an_invalid_token_gets_401_invalid_token(
    site: Sidecar,
    issuer: IssuerServer,
    key: RSAKey,
    changes: dict[str, Any],
    description: str,
) -> None:
    status, body, headers = await call(site, "/api/orders/7", token(issuer, key, **changes))
    assert status == 401
    assert body == {"error": "invalid_token", "error_description": description}
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert f'error_description="{description}"' in challenge


@pytest.mark.parametrize("garbage", ["x", "a.b.c", "Zm9v" * 20, "eyJ..."])
async def test_garbage_tokens_get_401(site: Sidecar, garbage: str) -> None:
    status, body, _ = await call(site, "/api/orders/7", garbage)
    assert status == 401 and body["error"] == "invalid_token"


async def test_a_token_the_rules_refuse_gets_403_insufficient_scope(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    status, body, headers = await call(site, "/api/orders/7", token(issuer, key, scope="other"))
    assert status == 403
    assert body["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    status, _, _ = await call(site, "/api/admin/x", token(issuer, key))
    assert status == 403
    status, _, _ = await call(site, "/api/admin/x", token(issuer, key, groups=["admins"]))
    assert status == 200


async def test_okta_and_entra_scp_claims_count_as_scopes(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    assert (await call(site, "/api/orders/7", token(issuer, key, scope=None, scp=["orders.read"])))[
        0
    ] == 200


async def test_the_provider_s_own_access_tokens_are_accepted(site: Sidecar) -> None:
    async with browser() as s:
        await login(s, site, "/app")
        async with s.get(site.url("/app"), headers={"Accept": "application/json"}) as r:
            provider_token = header(await r.json(), "Authorization")[0].removeprefix("Bearer ")
    status, body, _ = await call(site, "/app", provider_token)
    assert status == 200
    assert header(body, "X-Forwarded-User") == ["alice"]


async def test_a_session_cookie_wins_over_a_token(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    async with browser() as s:
        await login(s, site, "/app")
        cookie = session_cookie(s)
    presented = token(issuer, key)
    status, body, _ = await call(site, "/app", presented, Cookie=f"sidecar={cookie}")
    assert status == 200
    assert header(body, "X-Forwarded-User") == ["alice"]
    assert header(body, "Authorization") != [f"Bearer {presented}"]


async def test_bearer_requests_need_no_csrf_headers(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    status, _, _ = await call(
        site, "/app", token(issuer, key), "POST", **{"Sec-Fetch-Site": "cross-site"}
    )
    assert status == 200


async def test_forward_auth_accepts_bearer_tokens(
    site: Sidecar, issuer: IssuerServer, key: RSAKey
) -> None:
    presented = token(issuer, key)
    status, _, headers = await call(
        site, "/oauth2/auth", presented, **{"X-Forwarded-Uri": "/api/orders/1"}
    )
    assert status == 202
    assert headers["Authorization"] == f"Bearer {presented}"
    assert headers["X-Forwarded-User"] == "ci-robot"
    status, _, headers = await call(
        site, "/oauth2/auth", presented, **{"X-Forwarded-Uri": "/api/admin/1"}
    )
    assert status == 403 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    status, _, _ = await call(
        site, "/oauth2/auth", "nonsense", **{"X-Forwarded-Uri": "/api/orders/1"}
    )
    assert status == 401


async def test_no_token_reaches_a_log_line(
    site: Sidecar, issuer: IssuerServer, key: RSAKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [token(issuer, key), token(issuer, key, scope="x"), token(issuer, key, aud="y")]
    for presented in tokens:
        await call(site, "/api/orders/7", presented)
        await call(site, "/api/admin/7", presented)
    for record in caplog.records:
        text = record.getMessage() + str(vars(record))
        for presented in tokens:
            assert presented not in text
            assert presented.split(".")[2] not in text


async def test_without_a_bearer_section_a_token_is_just_no_login(
    start_sidecar: StartSidecar, upstream_app: Serve, issuer: IssuerServer, key: RSAKey
) -> None:
    base = await upstream_app(echo_app())
    sc = await start_sidecar(make_config(base, public_paths=[]))
    await ready(sc)
    status, body, _ = await call(sc, "/app", token(issuer, key))
    assert status == 401 and body["error"] == "unauthenticated"


@pytest.mark.parametrize(
    "authorization", ["Bearer", "Bearer ", "Basic YWxpY2U6cGFzcw==", "Token abc", "Bearer a b"]
)
async def test_an_unusable_authorization_header_gets_401_invalid_token(
    site: Sidecar, authorization: str
) -> None:
    """With bearer tokens on, an Authorization header that holds no usable token is an
    invalid token (RFC 6750 §3.1), not "log in first"; without one it stays the latter."""
    for path in ("/api/orders/7", "/oauth2/auth"):
        status, body, headers = await call(
            site,
            path,
            None,
            Authorization=authorization,
            **{"X-Forwarded-Uri": "/api/orders/7"},
        )
        assert status == 401 and body["error"] == "invalid_token", (path, authorization)
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, body, headers = await call(site, "/api/orders/7", None)
    assert status == 401 and body["error"] == "unauthenticated"
    assert "error=" not in headers["WWW-Authenticate"]  # RFC 6750 §3.1: no error without a token
