"""Login floods (issue 12, hole 6): `/oauth2/start` is rate limited per client address and
the pending logins of one browser are capped, through the real sidecar on real sockets."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from yarl import URL

from sidecar.config import Config
from sidecar.session import MemorySessionStore
from sidecar.web.keys import SESSIONS
from tests.support.configs import config_dict
from tests.support.login import HTML, JSON, approve, browser, get_json, local
from tests.support.sidecars import ready
from tests.support.stores import REDIS_URL, store_sections
from tests.support.upstreams import echo_app

START = "/oauth2/start?rd=/x"


async def flood_sidecar(
    start_sidecar: Any, upstream_app: Any, *, trusted: list[str] | None = None, **sections: Any
) -> Any:
    data = config_dict(await upstream_app(echo_app()), public_paths=[], **sections)
    if trusted is not None:
        data["server"]["trusted_proxies"] = trusted
    sc = await start_sidecar(Config.model_validate(data))
    await ready(sc)
    return sc


async def starts(
    http: aiohttp.ClientSession, sc: Any, n: int, headers: dict[str, str] | None = None
) -> list[aiohttp.ClientResponse]:
    """`n` anonymous starts (no login cookie: each would be a new browser), one after another."""
    answers = []
    for _ in range(n):
        async with http.get(sc.url(START), headers=headers, allow_redirects=False) as r:
            await r.read()
            answers.append(r)
    return answers


async def metrics_text(sc: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(sc.management_url("/metrics")) as r:
        return await r.text()


def pending(sc: Any) -> int:
    store = sc.app[SESSIONS].store
    assert isinstance(store, MemorySessionStore)
    return store.pending_logins


async def test_flood_from_one_address_stores_at_most_burst(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """200 anonymous starts: `burst` are stored, the rest are 429 with Retry-After and JSON,
    set no cookie and store nothing; the refusals are counted."""
    sc = await flood_sidecar(start_sidecar, upstream_app, login={"burst": 20, "rate_per_minute": 1})
    answers = await starts(http, sc, 200, JSON)
    assert [r.status for r in answers] == [302] * 20 + [429] * 180
    assert pending(sc) == 20
    for r in answers[20:]:
        assert 1 <= int(r.headers["Retry-After"]) <= 60  # one token a minute
        assert r.content_type == "application/json"
        assert "Set-Cookie" not in r.headers
        assert r.headers["Cache-Control"] == "no-store"
    status, body = await get_json(http, sc.url(START))
    assert status == 429 and body["error"] == "too_many_logins"
    async with http.get(sc.url(START), headers=HTML, allow_redirects=False) as r:
        assert r.status == 429 and r.content_type == "text/html"  # a page for a browser
        assert "Too many logins" in await r.text()
    assert "sidecar_login_rate_limited_total 182.0" in await metrics_text(sc)
    assert pending(sc) == 20


async def test_default_rate_refills_one_a_second(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """With the defaults (60/min, burst 50) a flood gets 50 plus one per second elapsed,
    and is told to come back in 1 s."""
    sc = await flood_sidecar(start_sidecar, upstream_app)
    began = time.monotonic()
    answers = await starts(http, sc, 200)
    elapsed = time.monotonic() - began
    allowed = sum(r.status == 302 for r in answers)
    assert 50 <= allowed <= 50 + int(elapsed) + 1
    assert all(r.status in (302, 429) for r in answers)
    assert {r.headers["Retry-After"] for r in answers if r.status == 429} == {"1"}
    assert pending(sc) == allowed


async def test_rate_zero_turns_the_limit_off(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    sc = await flood_sidecar(start_sidecar, upstream_app, login={"rate_per_minute": 0})
    assert {r.status for r in await starts(http, sc, 60)} == {302}


async def test_untrusted_peer_cannot_dodge_by_forwarding(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """From a peer that is not a trusted proxy, X-Forwarded-For changes nothing."""
    sc = await flood_sidecar(start_sidecar, upstream_app, login={"burst": 5, "rate_per_minute": 1})
    statuses = []
    for n in range(50):
        forwarded = {"X-Forwarded-For": f"198.51.100.{n}", "X-Real-IP": f"198.51.100.{n}"}
        statuses += [r.status for r in await starts(http, sc, 1, forwarded)]
    assert statuses == [302] * 5 + [429] * 45
    assert pending(sc) == 5


async def test_trusted_proxy_forwarded_clients_have_own_buckets(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """Behind `trusted_proxies`, each forwarded client has its own bucket, decided by the
    right-most untrusted hop (a client's own left-hand entries do not help it)."""
    sc = await flood_sidecar(
        start_sidecar,
        upstream_app,
        trusted=["127.0.0.1/32"],
        login={"burst": 3, "rate_per_minute": 1},
    )
    a = {"X-Forwarded-For": "203.0.113.7"}
    b = {"X-Forwarded-For": "203.0.113.8"}
    assert [r.status for r in await starts(http, sc, 4, a)] == [302, 302, 302, 429]
    assert [r.status for r in await starts(http, sc, 3, b)] == [302, 302, 302]
    spoofing_a = {"X-Forwarded-For": "192.0.2.1, 203.0.113.7"}
    assert [r.status for r in await starts(http, sc, 1, spoofing_a)] == [429]
    via_two_proxies = {"X-Forwarded-For": "203.0.113.8, 127.0.0.1"}
    assert [r.status for r in await starts(http, sc, 1, via_two_proxies)] == [429]
    assert [r.status for r in await starts(http, sc, 1)] == [302]  # the proxy itself
    assert pending(sc) == 7


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_sixth_login_in_one_browser_drops_the_first(
    start_sidecar: Any, upstream_app: Any, redis_prefix: str, store: str
) -> None:
    """Six starts with one login cookie: the first state fails at the callback, the newest
    logs in; only five pending logins were ever held for the browser."""
    sections = store_sections(store, redis_prefix)
    sc = await flood_sidecar(start_sidecar, upstream_app, **sections)
    async with browser() as s:
        authorizations = []
        for n in range(6):
            async with s.get(sc.url(f"/oauth2/start?rd=/n{n}"), allow_redirects=False) as r:
                assert r.status == 302
                authorizations.append(r.headers["Location"])
        assert len({URL(a).query["state"] for a in authorizations}) == 6
        if store == "memory":
            assert pending(sc) == 5
        else:
            client = redis.Redis.from_url(REDIS_URL)
            logins = [k async for k in client.scan_iter(match=f"{redis_prefix}:login:*")]
            lists = [k async for k in client.scan_iter(match=f"{redis_prefix}:logins:*")]
            assert len(logins) == 5 and len(lists) == 1
            assert await client.zcard(lists[0]) == 5
            await client.aclose()

        callbacks = []
        for auth in (authorizations[0], authorizations[-1]):
            callbacks.append(await approve(s, auth, "alice"))
        async with s.get(local(sc, callbacks[0]), headers=JSON, allow_redirects=False) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "invalid_state"
            assert "sidecar" not in r.cookies
        async with s.get(local(sc, callbacks[1]), headers=HTML, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/n5"
        status, body = await get_json(s, sc.url("/oauth2/userinfo"))
        assert status == 200 and body["sub"] == "alice"
    assert "sidecar_login_pending_dropped_total 1.0" in await metrics_text(sc)
