"""Login, logout, session, spoofing and access-rule flows against the in-process dev IdP."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from yarl import URL

from sidecar.errors import InvalidIDToken
from sidecar.oidc import validate_id_token
from tests.support.configs import make_config
from tests.support.idp import CLIENT_ID, shared_idp
from tests.support.login import (
    HTML,
    JSON,
    authorize,
    browser,
    get_json,
    local,
    login,
    session_cookie,
    setup,
)
from tests.support.sidecars import ready
from tests.support.stores import REDIS_URL, store_sections
from tests.support.upstreams import echo_app, header, jwt_claims


async def test_full_login_injects_identity_and_hides_session_cookie(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """After login the upstream gets a real alice token, identity headers and no session cookie."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        cb = await authorize(s, sc, "/app/page", "alice")
        async with s.get(local(sc, cb), headers=HTML, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/app/page"
            morsel = r.cookies["sidecar"]
        assert morsel["httponly"] and morsel["path"] == "/"
        assert morsel["samesite"].lower() == "lax"
        sid = session_cookie(s)
        status, body = await get_json(s, sc.url("/api/x"), headers={"Cookie": "theme=dark"})
    assert status == 200
    auth = header(body, "Authorization")
    assert len(auth) == 1 and auth[0].startswith("Bearer ")
    token = auth[0].removeprefix("Bearer ")
    assert jwt_claims(token)["sub"] == "alice"
    assert header(body, "X-Forwarded-User") == ["alice"]
    assert header(body, "X-Forwarded-Email") == ["alice@example.com"]
    assert header(body, "X-Forwarded-Groups") == ["admins,staff"]
    cookies = ";".join(header(body, "Cookie"))
    assert "theme=dark" in cookies
    assert sid not in json.dumps(body) and "sidecar" not in cookies
    async with (
        aiohttp.ClientSession() as plain,
        plain.get(
            shared_idp().issuer + "/userinfo", headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        assert r.status == 200
        assert (await r.json())["sub"] == "alice"


async def test_redis_store_holds_no_tokens_or_cookie(
    start_sidecar: Any, upstream_app: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis, no token nor the cookie value appears in any key or value under the prefix."""
    import redis.asyncio as redis

    grants = shared_idp().idp._grants
    issued: list[str] = []
    original = grants.issue_refresh_token

    def record_refresh(*args: Any) -> str:
        token = str(original(*args))
        issued.append(token)
        return token

    monkeypatch.setattr(grants, "issue_refresh_token", record_refresh)

    sc = await setup(
        start_sidecar,
        upstream_app,
        **store_sections("redis", redis_prefix),
    )
    async with browser() as s:
        await login(s, sc)
        sid = session_cookie(s)
        status, body = await get_json(s, sc.url("/api/x"))
        assert status == 200
        token = header(body, "Authorization")[0].removeprefix("Bearer ")
        status, _ = await get_json(s, sc.url("/oauth2/userinfo"))
        assert status == 200
    client: Any = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*")]
        assert keys, "the session should be in Redis"
        blob = b""
        for k in keys:
            blob += k
            kind = await client.type(k)
            if kind == b"string":
                blob += await client.get(k) or b""
            elif kind == b"hash":
                for f, v in (await client.hgetall(k)).items():
                    blob += f + v
    finally:
        await client.aclose()
    async with browser() as s2:
        s2.cookie_jar.update_cookies({"sidecar": sid}, URL(sc.url("/")))
        async with s2.post(sc.url("/oauth2/sign_out"), headers=JSON) as r:
            assert r.status == 200
            id_token = URL((await r.json())["logout_url"]).query["id_token_hint"]
    assert len(issued) == 1, "the IdP should have issued one refresh token"
    secrets_ = [token, sid, token.split(".")[2], id_token, id_token.split(".")[2], issued[0]]
    for secret in secrets_:
        assert secret.encode() not in blob
    assert b"alice" not in blob  # claims are encrypted too


async def test_unauthenticated_navigation_and_api(start_sidecar: Any, upstream_app: Any) -> None:
    """No session: navigation is redirected with the raw path, an API call gets 401 JSON."""
    sc = await setup(start_sidecar, upstream_app)
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url("/a%20b/c?x=1&y=%20"), headers=HTML, allow_redirects=False) as r:
            assert r.status == 302
            loc = URL(r.headers["Location"])
        assert loc.path == "/oauth2/start"
        assert loc.query["rd"] == "/a%20b/c?x=1&y=%20"
        async with s.get(sc.url("/api/x"), headers=JSON, allow_redirects=False) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            body = await r.json()
        assert body["login_url"].startswith("/oauth2/start?rd=")


@pytest.mark.parametrize(
    "value",
    ["x", "A" * 43, "A" * 42 + "!", "A" * 129, "A" * 4000, "%00%ff", "\u00e9" * 10],
)
async def test_bad_session_cookies_mean_no_session(
    start_sidecar: Any, upstream_app: Any, value: str
) -> None:
    """Unknown, tampered, truncated or oversized session cookies are treated as no session."""
    sc = await setup(start_sidecar, upstream_app)
    async with aiohttp.ClientSession() as s:
        cookie = {"Cookie": f"sidecar={value}"}
        status, _ = await get_json(s, sc.url("/api/x"), headers=cookie)
        assert status == 401
        async with s.get(sc.url("/p"), headers={**HTML, **cookie}, allow_redirects=False) as r:
            assert r.status == 302


async def test_bad_session_cookie_from_real_one(start_sidecar: Any, upstream_app: Any) -> None:
    """A real session id with one character changed, or truncated, is no session."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        await login(s, sc)
        sid = session_cookie(s)
    flipped = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    async with aiohttp.ClientSession() as s:
        for value in (flipped, sid[:-1], sid + "x"):
            status, _ = await get_json(s, sc.url("/api/x"), headers={"Cookie": f"sidecar={value}"})
            assert status == 401
        status, _ = await get_json(s, sc.url("/api/x"), headers={"Cookie": f"sidecar={sid}"})
        assert status == 200


async def test_callback_replay_and_unbound(start_sidecar: Any, upstream_app: Any) -> None:
    """A used callback URL is refused, and a callback in another browser is login_not_bound."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        cb = await authorize(s, sc, "/x", "alice")
        async with s.get(local(sc, cb), allow_redirects=False) as r:
            assert r.status == 302
        s.cookie_jar.clear(lambda c: c.key == "sidecar")  # keep the login binding cookie
        assert "sidecar-login" in {c.key for c in s.cookie_jar}
        async with s.get(local(sc, cb), headers=JSON, allow_redirects=False) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "invalid_state"
            assert "sidecar" not in r.cookies
        status, _ = await get_json(s, sc.url("/api/x"))
        assert status == 401
    async with browser() as victim, browser() as attacker:
        cb = await authorize(attacker, sc, "/x", "alice")
        async with victim.get(local(sc, cb), headers=JSON, allow_redirects=False) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "login_not_bound"
            assert "sidecar" not in r.cookies


async def test_callback_error_and_garbage(start_sidecar: Any, upstream_app: Any) -> None:
    """IdP errors give a friendly 403 page; garbage state or code gives 4xx, never 500."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        cb = URL(await authorize(s, sc, "/x", "alice"))
        state = cb.query["state"]
        url = sc.url("/oauth2/callback") + f"?error=access_denied&state={state}"
        async with s.get(url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 403
            text = await r.text()
        assert "Traceback" not in text and "access_denied" in text
        assert r.content_type == "text/html"
        cases = [
            "?state=" + "x" * 100000,
            "?state=zzz&code=abc",
            "?code=abc",
            "?state=%00%ff&code=%0d%0a",
            f"?state={state}&code=" + "c" * 100000,
            "",
        ]
        for query in cases:
            async with s.get(sc.url("/oauth2/callback") + query, allow_redirects=False) as r:
                assert 400 <= r.status < 500, (query[:40], r.status)
        cb2 = URL(await authorize(s, sc, "/x", "alice"))
        async with s.get(
            local(sc, str(cb2.update_query(iss="https://evil.example"))),
            headers=JSON,
            allow_redirects=False,
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "issuer_mismatch"
        cb2 = URL(await authorize(s, sc, "/x", "alice"))
        bad = cb2.update_query(code="not-a-real-code")
        async with s.get(local(sc, str(bad)), headers=JSON, allow_redirects=False) as r:
            assert r.status == 400


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.com",
        "/\\evil.com",
        "https://evil.com",
        "/%0d%0aSet-Cookie:x",
        "javascript:alert(1)",
        "/\tevil.com",
        "///evil.com",
        "http:evil.com",
    ],
)
async def test_open_redirect(start_sidecar: Any, upstream_app: Any, rd: str) -> None:
    """Whatever `rd` says, after login the browser lands on a local path."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        cb = await authorize(s, sc, str(URL("/oauth2/start").with_query(rd=rd)), "alice")
        async with s.get(local(sc, cb), allow_redirects=False) as r:
            assert r.status == 302
            dest = r.headers["Location"]
            assert "x" not in {c.key for c in r.cookies.values()}
    assert dest.startswith("/") and not dest.startswith(("//", "/\\"))
    assert URL(dest).host is None and "\r" not in dest and "\n" not in dest
    assert "evil" not in dest.lower() or dest == "/"


async def test_header_spoofing(start_sidecar: Any, upstream_app: Any) -> None:
    """Client copies of identity headers and Authorization never reach the upstream."""
    sc = await setup(start_sidecar, upstream_app, public_paths=["/public"])
    spoof = [
        ("X-Forwarded-User", "mallory"),
        ("x_forwarded_user", "mallory"),
        ("X-FORWARDED-EMAIL", "mallory@evil.example"),
        ("X-Forwarded-Groups", "admins-mallory"),
        ("Authorization", "Bearer fake-mallory"),
    ]
    async with browser() as s:
        await login(s, sc)
        for path in ("/api/x", "/public/x"):
            async with s.get(sc.url(path), headers=[*spoof, ("Accept", "application/json")]) as r:
                assert r.status == 200
                body = await r.json()
            assert "mallory" not in json.dumps(body), path
            cookies = ";".join(header(body, "Cookie"))
            assert "sidecar" not in cookies and session_cookie(s) not in json.dumps(body)
            if path == "/api/x":
                auth = header(body, "Authorization")
                assert len(auth) == 1 and jwt_claims(auth[0][7:])["sub"] == "alice"
                assert header(body, "X-Forwarded-User") == ["alice"]
            else:
                assert header(body, "Authorization") == []
                assert header(body, "X-Forwarded-User") == []


async def test_access_rules(start_sidecar: Any, upstream_app: Any) -> None:
    """Global group rules, per-upstream rules and email-domain rules are enforced."""
    base = await upstream_app(echo_app())
    second = await upstream_app(echo_app())
    sc = await start_sidecar(
        make_config(
            base,
            public_paths=[],
            access={"allowed_groups": ["admins", "staff"]},
            upstreams=[
                {"path": "/admin", "url": second, "access": {"allowed_groups": ["admins"]}},
                {"path": "/", "url": base},
            ],
        )
    )
    await ready(sc)
    async with browser() as alice, browser() as bob, browser() as carol:
        await login(alice, sc, user="alice")
        await login(bob, sc, user="bob")
        await login(carol, sc, user="carol")
        assert (await get_json(alice, sc.url("/admin/x")))[0] == 200
        assert (await get_json(alice, sc.url("/x")))[0] == 200
        assert (await get_json(bob, sc.url("/x")))[0] == 200
        status, body = await get_json(bob, sc.url("/admin/x"))
        assert status == 403 and body["error"] == "forbidden"
        async with bob.get(sc.url("/admin/x"), headers=HTML, allow_redirects=False) as r:
            assert r.status == 403 and r.content_type == "text/html"
        assert (await get_json(carol, sc.url("/x")))[0] == 403

    sc2 = await setup(
        start_sidecar, upstream_app, access={"allowed_email_domains": ["example.org"]}
    )
    async with browser() as alice, browser() as carol:
        await login(alice, sc2, user="alice")
        await login(carol, sc2, user="carol")
        assert (await get_json(alice, sc2.url("/x")))[0] == 403
        assert (await get_json(carol, sc2.url("/x")))[0] == 200


async def test_relogin_replaces_session(start_sidecar: Any, upstream_app: Any) -> None:
    """Logging in again kills the old session cookie and the upstream gets the newest token."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        await login(s, sc)
        first = session_cookie(s)
        _, body = await get_json(s, sc.url("/x"))
        token1 = header(body, "Authorization")[0]
        assert await login(s, sc, "/oauth2/start?rd=/again") == "/again"
        second = session_cookie(s)
        assert second != first
        _, body = await get_json(s, sc.url("/x"))
        token2 = header(body, "Authorization")[0]
        assert token2 != token1
    async with aiohttp.ClientSession() as s:
        status, _ = await get_json(s, sc.url("/x"), headers={"Cookie": f"sidecar={first}"})
        assert status == 401
        status, body = await get_json(s, sc.url("/x"), headers={"Cookie": f"sidecar={second}"})
        assert status == 200 and header(body, "Authorization")[0] == token2


async def test_sign_out(start_sidecar: Any, upstream_app: Any) -> None:
    """Sign-out is same-site only, ends the session, revokes the refresh token, goes to the IdP."""
    sc = await setup(start_sidecar, upstream_app)
    origin = sc.url("")
    idp = shared_idp()
    async with browser() as s:
        await login(s, sc)
        async with s.get(sc.url("/oauth2/sign_out"), headers=HTML) as r:
            assert r.status == 200
            text = await r.text()
        assert "<form" in text and 'method="post"' in text
        assert "<h1>Sign out</h1>" in text and "identity provider" in text  # labelled
        assert (await get_json(s, sc.url("/x")))[0] == 200
        for bad in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            async with s.post(sc.url("/oauth2/sign_out"), headers=bad, allow_redirects=False) as r:
                assert r.status == 403
            assert (await get_json(s, sc.url("/x")))[0] == 200
        before = idp.idp.stats.revocations
        async with s.post(
            sc.url("/oauth2/sign_out"), headers={"Origin": origin}, allow_redirects=False
        ) as r:
            assert r.status == 303
            target = URL(r.headers["Location"])
        assert str(target).startswith(idp.issuer)
        assert target.query["client_id"] == CLIENT_ID
        assert jwt_claims(target.query["id_token_hint"])["sub"] == "alice"
        assert idp.idp.stats.revocations == before + 1
        assert (await get_json(s, sc.url("/x")))[0] == 401

        await login(s, sc)
        sid = session_cookie(s)
        async with s.post(
            sc.url("/oauth2/sign_out"), headers={"Origin": origin, **JSON}, allow_redirects=False
        ) as r:
            assert r.status == 200
            assert (await r.json())["logout_url"].startswith(idp.issuer)
    async with aiohttp.ClientSession() as s:
        status, _ = await get_json(s, sc.url("/x"), headers={"Cookie": f"sidecar={sid}"})
        assert status == 401


async def test_userinfo(start_sidecar: Any, upstream_app: Any) -> None:
    """/oauth2/userinfo is 401 without a session and describes the session with one."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        status, body = await get_json(s, sc.url("/oauth2/userinfo"))
        assert status == 401
        await login(s, sc)
        status, body = await get_json(s, sc.url("/oauth2/userinfo"))
        _, echoed = await get_json(s, sc.url("/x"))
    token = header(echoed, "Authorization")[0].removeprefix("Bearer ")
    assert status == 200
    assert body["sub"] == "alice" and body["email"] == "alice@example.com"
    assert body["groups"] == ["admins", "staff"]
    now = time.time()
    assert body["access_token_expires_at"] > now and body["session_expires_at"] > now
    assert token not in json.dumps(body)


# --- ID token validation --------------------------------------------------------------

ISS = "https://idp.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1"})


def _at_hash(token: str) -> str:
    digest = hashlib.sha256(token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISS,
        "aud": CLIENT_ID,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "nonce": "n1",
        "at_hash": _at_hash("at1"),
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _validate(token: str) -> dict[str, Any]:
    return validate_id_token(
        token,
        KeySet([KEY]),
        issuer=ISS,
        client_id=CLIENT_ID,
        now=time.time(),
        algorithms=["RS256"],
        nonce="n1",
        access_token="at1",
    )


def _sign(claims: dict[str, Any], key: RSAKey = KEY) -> str:
    return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)


def _alg_none(claims: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64(claims)}."


def test_valid_id_token_passes() -> None:
    """A correctly signed token with the right claims validates."""
    assert _validate(_sign(_claims()))["sub"] == "alice"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: _sign(_claims(iss="https://evil.test")), id="wrong-iss"),
        pytest.param(lambda: _sign(_claims(aud="other")), id="wrong-aud"),
        pytest.param(lambda: _sign(_claims(), OTHER), id="bad-signature"),
        pytest.param(lambda: _alg_none(_claims()), id="alg-none"),
        pytest.param(
            lambda: _sign(_claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)),
            id="expired",
        ),
        pytest.param(lambda: _sign(_claims(nonce="other")), id="nonce-mismatch"),
        pytest.param(lambda: _sign(_claims(nonce=None)), id="nonce-missing"),
        pytest.param(lambda: _sign(_claims(at_hash=_at_hash("other"))), id="wrong-at-hash"),
        pytest.param(lambda: _sign(_claims())[:-10], id="truncated"),
    ],
)
def test_bad_id_tokens_rejected(token: Any) -> None:
    """Each defective ID token raises InvalidIDToken."""
    with pytest.raises(InvalidIDToken):
        _validate(token())


async def test_two_tabs_and_protocol_relative_original_path(
    start_sidecar: Any, upstream_app: Any
) -> None:
    """Two logins pending in one browser both finish; `//host` original paths land on `/`."""
    sc = await setup(start_sidecar, upstream_app)
    async with browser() as s:
        first = await authorize(s, sc, "/one", "alice")
        second = await authorize(s, sc, "//evil.com/two", "bob")
        async with s.get(local(sc, first), allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/one"
        async with s.get(local(sc, second), allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/"
        status, body = await get_json(s, sc.url("/x"))
    assert status == 200 and header(body, "X-Forwarded-User") == ["bob"]
