"""Central logout through HTTP: back-channel and front-channel logout, log out everywhere,
the admin API and the per-user cap, on the memory store and on Redis (docs/sessions.md,
"Central logout"; docs/operations.md, "Admin API")."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.errors import StoreUnavailable
from sidecar.session import MemorySessionStore
from tests.support.configs import make_config
from tests.support.idp import CLIENT_ID, ThreadedIdP, idp_stats, shared_idp
from tests.support.keys import TEST_KEY
from tests.support.login import JSON, NAVIGATE, browser, login, session_cookie
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.stores import store_sections
from tests.support.upstreams import Serve, echo_app

ADMIN_TOKEN = "admin-token-for-the-tests-0123456789"
ISSUER_EVENT = "http://schemas.openid.net/event/backchannel-logout"


async def central(
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    store_kind: str = "memory",
    prefix: str = "",
    **sections: Any,
) -> Sidecar:
    """A sidecar before `echo_app` and a websocket echo at /ws, with the admin API on."""
    base = await upstream_app(_upstream())
    config = make_config(
        base,
        public_paths=[],
        admin={"tokens": [ADMIN_TOKEN]},
        **{**store_sections(store_kind, prefix), **sections},
    )
    sc = await start_sidecar(config)
    await ready(sc)
    return sc


def _upstream() -> web.Application:
    app = echo_app()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type is WSMsgType.TEXT:
                await socket.send_str("echo:" + message.data)
        return socket

    app.router.add_get("/ws", ws)
    return app


async def admin(
    sc: Sidecar, method: str, path: str, token: str | None = ADMIN_TOKEN
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, sc.management_url(path), headers=headers) as r,
    ):
        body = await r.read()
        data = json.loads(body) if r.content_type == "application/json" else body
        return r.status, data, dict(r.headers)


async def sessions_of(sc: Sidecar, sub: str = "alice") -> list[dict[str, Any]]:
    status, data, _ = await admin(sc, "GET", f"/admin/sessions?sub={sub}")
    assert status == 200, data
    return list(data["sessions"])


async def status_with(sc: Sidecar, cookie: str) -> int:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s,
        s.get(
            sc.url("/app"), headers={**JSON, "Cookie": f"sidecar={cookie}"}, allow_redirects=False
        ) as r,
    ):
        return r.status


async def logged_in(sc: Sidecar, user: str = "alice") -> str:
    """A fresh browser's login (a new IdP session, so a new sid): its session cookie."""
    async with browser() as s:
        await login(s, sc, "/app", user)
        return session_cookie(s)


def logout_token(idp: ThreadedIdP, *, sub: str | None = None, sid: str | None = None) -> str:
    return str(idp.call(lambda: idp.idp.backchannel_logout_token(CLIENT_ID, sub=sub, sid=sid)))


async def post_logout_token(sc: Sidecar, token: str) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(sc.url("/oauth2/backchannel-logout"), data={"logout_token": token}) as r,
    ):
        body = await r.read()
        data = json.loads(body) if r.content_type == "application/json" else body
        return r.status, data, dict(r.headers)


async def metric(sc: Sidecar, name: str, label: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(sc.management_url("/metrics")) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith((f"{name}{{", f"{name} ")) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- back-channel logout -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_logout_token_with_sid_ends_that_idp_sessions_sessions_only(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str, kind: str
) -> None:
    sc = await central(start_sidecar, upstream_app, kind, redis_prefix)
    first, second = await logged_in(sc), await logged_in(sc)
    listed = await sessions_of(sc)
    assert len(listed) == 2 and all(s["sid"] for s in listed)
    first_sid = listed[0]["sid"]
    # Which cookie is whose is not known here: one of the two must stop working.
    status, body, headers = await post_logout_token(sc, logout_token(shared_idp(), sid=first_sid))
    assert (status, body) == (200, b"")
    assert headers["Cache-Control"] == "no-store"
    statuses = sorted([await status_with(sc, first), await status_with(sc, second)])
    assert statuses == [200, 401]
    assert [s["sid"] for s in await sessions_of(sc)] == [listed[1]["sid"]]
    assert await metric(sc, "sidecar_logout_total", 'kind="backchannel"') == 1


async def test_a_logout_token_with_sub_only_ends_every_session_of_the_user(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str
) -> None:
    sc = await central(start_sidecar, upstream_app, "redis", redis_prefix)
    cookies = [await logged_in(sc) for _ in range(3)]
    bob = await logged_in(sc, "bob")
    status, _, _ = await post_logout_token(sc, logout_token(shared_idp(), sub="alice"))
    assert status == 200
    assert [await status_with(sc, c) for c in cookies] == [401, 401, 401]
    assert await status_with(sc, bob) == 200
    assert await sessions_of(sc) == []
    assert len(await sessions_of(sc, "bob")) == 1


async def test_a_logout_token_with_sid_and_another_sub_ends_nothing(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    """Both named: only sessions of that sid *and* that sub end."""
    sc = await central(start_sidecar, upstream_app)
    cookie = await logged_in(sc)
    (listed,) = await sessions_of(sc)
    token = logout_token(shared_idp(), sub="bob", sid=listed["sid"])
    assert (await post_logout_token(sc, token))[0] == 200
    assert await status_with(sc, cookie) == 200
    token = logout_token(shared_idp(), sub="alice", sid=listed["sid"])
    assert (await post_logout_token(sc, token))[0] == 200
    assert await status_with(sc, cookie) == 401


async def test_a_matching_nothing_logout_token_is_still_200(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    status, _, headers = await post_logout_token(sc, logout_token(shared_idp(), sid="no-such"))
    assert status == 200 and headers["Cache-Control"] == "no-store"


async def test_a_replayed_logout_token_is_refused_on_every_replica(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str
) -> None:
    """The jti is remembered in Redis: a second replica refuses the same token too."""
    a = await central(start_sidecar, upstream_app, "redis", redis_prefix)
    b = await central(start_sidecar, upstream_app, "redis", redis_prefix)
    token = logout_token(shared_idp(), sub="alice")
    assert (await post_logout_token(a, token))[0] == 200
    for replica in (a, b):
        status, body, _ = await post_logout_token(replica, token)
        assert status == 400
        assert body["error"] == "invalid_request" and "jti" in body["error_description"]
    assert await metric(a, "sidecar_backchannel_rejected_total", 'reason="replay"') == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b""),
        ("application/x-www-form-urlencoded", b"logout_token="),
        ("application/x-www-form-urlencoded", b"logout_token=a&logout_token=b"),
        ("application/x-www-form-urlencoded", b"logout_token=not.a.jwt"),
        ("application/x-www-form-urlencoded", b"logout_token=%ff%fe"),
        ("application/x-www-form-urlencoded", "logout_token=ä".encode()),
        ("application/x-www-form-urlencoded", b"logout_token=" + b"a" * 70_000),
        ("application/json", b'{"logout_token": "x.y.z"}'),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
    ],
)
async def test_malformed_requests_get_400_json(
    start_sidecar: StartSidecar, upstream_app: Serve, content_type: str, body: bytes
) -> None:
    sc = await central(start_sidecar, upstream_app)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            sc.url("/oauth2/backchannel-logout"), data=body, headers={"Content-Type": content_type}
        ) as r,
    ):
        assert r.status == 400
        answer = await r.json()
    assert answer["error"] == "invalid_request" and answer["error_description"]


async def test_a_get_is_not_a_back_channel_logout(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    async with aiohttp.ClientSession() as s, s.get(sc.url("/oauth2/backchannel-logout")) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"


async def test_a_thousand_garbage_bodies_never_get_a_5xx(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    valid = logout_token(shared_idp(), sub="alice")
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:

        async def send(body: bytes, content_type: str) -> None:
            async with s.post(
                sc.url("/oauth2/backchannel-logout"),
                data=body,
                headers={"Content-Type": content_type},
            ) as r:
                statuses.append(r.status)
                await r.read()

        bodies: list[tuple[bytes, str]] = []

        @settings(
            max_examples=1000,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            st.one_of(
                st.binary(max_size=300),
                st.text(max_size=300).map(lambda t: ("logout_token=" + t).encode()),
                st.integers(0, len(valid) - 1).map(
                    lambda i: ("logout_token=" + valid[:i] + "x" + valid[i + 1 :]).encode()
                ),
            ),
            st.sampled_from(["application/x-www-form-urlencoded", "text/plain", ""]),
        )
        def collect(body: bytes, content_type: str) -> None:
            bodies.append((body, content_type))

        collect()
        for body, content_type in bodies:
            await send(body, content_type)
    assert len(statuses) >= 1000
    assert max(statuses) < 500, sorted(set(statuses))
    assert set(statuses) <= {200, 400}


# --- front-channel logout ------------------------------------------------------------------


async def test_front_channel_logout_ends_the_sid_when_iss_matches(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    cookie = await logged_in(sc)
    (listed,) = await sessions_of(sc)
    issuer = sc.config.oidc.issuer
    async with aiohttp.ClientSession() as s:
        wrong = {"iss": "https://evil.example", "sid": listed["sid"]}
        async with s.get(sc.url("/oauth2/frontchannel-logout"), params=wrong) as r:
            assert r.status == 400
        async with s.get(sc.url("/oauth2/frontchannel-logout"), params={"iss": issuer}) as r:
            assert r.status == 400
        assert await status_with(sc, cookie) == 200
        right = {"iss": issuer, "sid": listed["sid"]}
        async with s.get(sc.url("/oauth2/frontchannel-logout"), params=right) as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            assert r.headers["Cache-Control"] == "no-store"
            assert "X-Frame-Options" not in r.headers  # the IdP frames this page
            policy = r.headers["Content-Security-Policy"]
            assert f"frame-ancestors 'self' {issuer.rstrip('/')}" in policy
    assert await status_with(sc, cookie) == 401
    assert await metric(sc, "sidecar_logout_total", 'kind="frontchannel"') == 1


async def test_front_channel_logout_with_sid_alone_as_entra_sends_it(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    """Entra ID sends no `iss`: with one configured issuer the `sid` is unambiguous."""
    sc = await central(start_sidecar, upstream_app)
    cookie, other = await logged_in(sc), await logged_in(sc)
    sids = [s["sid"] for s in await sessions_of(sc)]
    async with aiohttp.ClientSession() as s:
        params = {"sid": sids[0]}
        async with s.get(sc.url("/oauth2/frontchannel-logout"), params=params) as r:
            assert r.status == 200
    assert sorted([await status_with(sc, cookie), await status_with(sc, other)]) == [200, 401]


# --- log out everywhere --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_sign_out_everywhere_ends_every_browser_of_the_user(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str, kind: str
) -> None:
    sc = await central(start_sidecar, upstream_app, kind, redis_prefix)
    others = [await logged_in(sc), await logged_in(sc)]
    bob = await logged_in(sc, "bob")
    revoked = idp_stats(shared_idp())["revocations"]
    async with browser() as s:
        await login(s, sc, "/app")
        async with s.post(
            sc.url("/oauth2/sign_out?everywhere=1"),
            headers={**JSON, "Origin": sc.url("")},
            allow_redirects=False,
        ) as r:
            assert r.status == 200
            assert "logout_url" in await r.json()
        assert not [c for c in s.cookie_jar if c.key == "sidecar" and c.value]
    assert [await status_with(sc, c) for c in others] == [401, 401]
    assert await status_with(sc, bob) == 200
    assert await sessions_of(sc) == []
    assert idp_stats(shared_idp())["revocations"] == revoked + 1  # this browser's own token
    assert await metric(sc, "sidecar_logout_total", 'kind="everywhere"') == 3


async def test_sign_out_everywhere_keeps_the_csrf_rules(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    other = await logged_in(sc)
    async with browser() as s:
        await login(s, sc, "/app")
        async with s.post(
            sc.url("/oauth2/sign_out?everywhere=1"),
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            allow_redirects=False,
        ) as r:
            assert r.status == 403
    assert await status_with(sc, other) == 200
    assert len(await sessions_of(sc)) == 2


async def test_the_sign_out_page_offers_everywhere(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    sc = await central(start_sidecar, upstream_app)
    async with (
        aiohttp.ClientSession() as s,
        s.get(sc.url("/oauth2/sign_out"), headers=NAVIGATE) as r,
    ):
        page = await r.text()
    assert 'action="/oauth2/sign_out?everywhere=1"' in page


# --- the cap -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_max_per_user_ends_the_oldest_session(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str, kind: str
) -> None:
    session = {
        "store": kind,
        "cookie_name": "sidecar",
        "cookie_secure": False,
        "encryption_keys": [TEST_KEY],
        "max_per_user": 2,
    }
    sc = await central(start_sidecar, upstream_app, kind, redis_prefix, session=session)
    first = await logged_in(sc)
    second = await logged_in(sc)
    bob = await logged_in(sc, "bob")
    assert [await status_with(sc, c) for c in (first, second, bob)] == [200, 200, 200]
    third = await logged_in(sc)
    assert [await status_with(sc, c) for c in (first, second, third, bob)] == [401, 200, 200, 200]
    assert len(await sessions_of(sc)) == 2
    assert await metric(sc, "sidecar_logout_total", 'kind="cap"') == 1


# --- websockets ----------------------------------------------------------------------------


async def test_a_websocket_of_an_ended_session_is_closed_with_1008(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str
) -> None:
    sc = await central(start_sidecar, upstream_app, "redis", redis_prefix)
    alice, bob = await logged_in(sc), await logged_in(sc, "bob")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        ws_alice = await s.ws_connect(sc.url("/ws"), headers={"Cookie": f"sidecar={alice}"})
        ws_bob = await s.ws_connect(sc.url("/ws"), headers={"Cookie": f"sidecar={bob}"})
        for ws in (ws_alice, ws_bob):
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
        started = time.monotonic()
        assert (await post_logout_token(sc, logout_token(shared_idp(), sub="alice")))[0] == 200
        message = await ws_alice.receive(timeout=5)
        assert message.type is WSMsgType.CLOSE and message.data == 1008
        assert time.monotonic() - started < 1.0
        await ws_bob.send_str("still")
        assert (await ws_bob.receive(timeout=5)).data == "echo:still"
        await ws_alice.close()
        await ws_bob.close()


# --- replicas ------------------------------------------------------------------------------


async def test_other_replicas_stop_serving_a_cached_session_within_100_ms(
    start_sidecar: StartSidecar, upstream_app: Serve, redis_prefix: str
) -> None:
    """Each replica caches the session (session.cache_ttl 60 s here, so only the change feed
    can end it); after the back-channel logout at one, every one refuses it within 100 ms."""
    replicas = [
        await central(
            start_sidecar,
            upstream_app,
            "redis",
            redis_prefix,
            session={
                **store_sections("redis", redis_prefix)["session"],
                "cache_ttl": "60s",
            },
        )
        for _ in range(3)
    ]
    cookie = await logged_in(replicas[0])
    for replica in replicas:
        for _ in range(3):
            assert await status_with(replica, cookie) == 200
    for replica in replicas:  # the cache is on once the change feed is proven
        for _ in range(100):
            if await metric(replica, "sidecar_session_cache_live", "") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the session cache never came on")
    assert (await post_logout_token(replicas[0], logout_token(shared_idp(), sub="alice")))[0] == 200
    done = time.monotonic()
    refused_after: list[float] = []
    for replica in replicas:
        while await status_with(replica, cookie) != 401:
            assert time.monotonic() - done < 1.0
            await asyncio.sleep(0.002)
        refused_after.append(time.monotonic() - done)
    assert max(refused_after) < 0.1, refused_after


# --- the admin API -------------------------------------------------------------------------


async def test_the_admin_api_is_off_without_tokens(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    base = await upstream_app(echo_app())
    sc = await start_sidecar(make_config(base, public_paths=[]))
    await ready(sc)
    status, _, _ = await admin(sc, "GET", "/admin/sessions?sub=alice")
    assert status == 404


async def test_the_admin_api_wants_a_configured_token(
    start_sidecar: StartSidecar, upstream_app: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    sc = await central(start_sidecar, upstream_app)
    await logged_in(sc)
    for token in (None, "", "wrong-token-of-enough-length", ADMIN_TOKEN + "x"):
        for method, path in [
            ("GET", "/admin/sessions?sub=alice"),
            ("DELETE", "/admin/sessions?sub=alice"),
            ("DELETE", "/admin/sessions/" + "A" * 43),
        ]:
            status, body, headers = await admin(sc, method, path, token)
            assert status == 401, (token, method, path)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert body["error"] == "unauthorized"
    assert len(await sessions_of(sc)) == 1


async def test_the_admin_api_lists_and_ends_sessions(
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.admin")
    sc = await central(start_sidecar, upstream_app, "redis", redis_prefix)
    before = time.time()
    cookies = [await logged_in(sc) for _ in range(3)]
    bob = await logged_in(sc, "bob")
    status, data, headers = await admin(sc, "GET", "/admin/sessions?sub=alice")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    listed = data["sessions"]
    assert len(listed) == 3
    for entry in listed:
        assert set(entry) == {
            "id",
            "iss",
            "sub",
            "sid",
            "created_at",
            "last_refresh_at",
            "expires_at",
        }
        assert entry["iss"] == sc.config.oidc.issuer and entry["sub"] == "alice"
        assert before - 1 <= entry["created_at"] <= time.time() + 1
        assert entry["expires_at"] > entry["created_at"]
        assert entry["id"] not in cookies  # the hash, never the session id
    assert not any(c in json.dumps(data) for c in cookies)
    # With an explicit issuer, and for another issuer: nothing.
    assert (
        len(
            (await admin(sc, "GET", f"/admin/sessions?sub=alice&iss={sc.config.oidc.issuer}"))[1][
                "sessions"
            ]
        )
        == 3
    )
    assert (await admin(sc, "GET", "/admin/sessions?sub=alice&iss=https://other.example"))[1] == {
        "sessions": []
    }
    assert (await admin(sc, "GET", "/admin/sessions"))[0] == 400

    status, body, _ = await admin(sc, "DELETE", f"/admin/sessions/{listed[0]['id']}")
    assert status == 204 and body == b""
    assert sorted([await status_with(sc, c) for c in cookies]) == [200, 200, 401]
    assert (await admin(sc, "DELETE", f"/admin/sessions/{listed[0]['id']}"))[0] == 404
    assert (await admin(sc, "DELETE", "/admin/sessions/not-a-hash"))[0] == 404

    status, body, _ = await admin(sc, "DELETE", "/admin/sessions?sub=alice")
    assert (status, body) == (200, {"ended": 2})
    assert [await status_with(sc, c) for c in cookies] == [401, 401, 401]
    assert await status_with(sc, bob) == 200
    assert await metric(sc, "sidecar_logout_total", 'kind="admin"') == 3

    lines = [r for r in caplog.records if r.name == "sidecar.admin"]
    assert len(lines) == 8
    fingerprints = {getattr(r, "admin_token", None) for r in lines}
    assert len(fingerprints) == 1 and len(next(iter(fingerprints))) == 8
    assert not any(ADMIN_TOKEN in r.getMessage() or ADMIN_TOKEN in str(vars(r)) for r in lines)
    assert [getattr(r, "count", None) for r in lines][-3:] == [0, 0, 2]


async def test_a_logout_that_failed_on_the_store_is_accepted_again(
    start_sidecar: StartSidecar, upstream_app: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 (the store failed mid-logout) must not make the IdP's retry a replay."""
    sc = await central(start_sidecar, upstream_app)
    cookie = await logged_in(sc)
    real = MemorySessionStore.indexed
    failures = [StoreUnavailable("redis: down for the test")]

    async def indexed(self: MemorySessionStore, ref: str) -> dict[str, bytes | None]:
        if failures:
            raise failures.pop()
        return await real(self, ref)

    monkeypatch.setattr(MemorySessionStore, "indexed", indexed)
    token = logout_token(shared_idp(), sub="alice")
    assert (await post_logout_token(sc, token))[0] == 503
    assert await status_with(sc, cookie) == 200
    assert (await post_logout_token(sc, token))[0] == 200
    assert await status_with(sc, cookie) == 401
    assert (await post_logout_token(sc, token))[0] == 400  # now it is a replay
