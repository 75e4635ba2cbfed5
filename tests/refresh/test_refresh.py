"""The refresh protocol (docs/refresh.md) driven in-process against a dev IdP of its own.

Logins get a 1 s access token (refresh window = min(2 s, 1 s / 2) = 0.5 s), so a session
is due for refresh half a second after login; tokens issued afterwards live 60 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from sidecar.dev.idp.models import DevIdPStats
from sidecar.oidc import TokenResponse
from sidecar.redis.locks import RedisLocks
from sidecar.refresh import RefreshTiming, refresh_window
from sidecar.session import SessionManager, SessionRecord, session_hash
from sidecar.session.memory import MemoryLocks
from sidecar.web.keys import METRICS, OIDC, SESSIONS
from tests.support.configs import make_config
from tests.support.idp import ThreadedIdP
from tests.support.login import JSON, NAVIGATE, login_cookie
from tests.support.sidecars import ready
from tests.support.stores import REDIS_URL, store_sections
from tests.support.upstreams import echo_app

LOGIN_TTL = 2  # seconds; the JWT exp is rounded down, so the real lifetime is 1-2 s
LATER_TTL = 60
REFRESH = {"before_expiry": "2s", "idp_timeout": "2s", "lock_ttl": "6s", "wait_timeout": "4s"}

Json = dict[str, Any]


# --- fixtures and helpers -------------------------------------------------------------------


ACCESS_TTL = LOGIN_TTL  # the `idp` fixture: a dev IdP of this module's own


def _reset(dev_idp: Any) -> None:
    dev_idp.token_endpoint_delay = 0.0
    dev_idp.token_endpoint_failures = 0
    dev_idp.access_token_ttl = LOGIN_TTL


@pytest.fixture(autouse=True)
def reset_idp(idp: ThreadedIdP) -> Iterator[None]:
    idp.call(_reset, idp.idp)
    yield
    idp.call(_reset, idp.idp)


def set_idp(idp: ThreadedIdP, **values: float) -> None:
    for name, value in values.items():
        idp.call(setattr, idp.idp, name, value)


def stats(idp: ThreadedIdP) -> DevIdPStats:
    """A copy of the IdP's counters, taken on its own thread."""
    return idp.call(dataclasses.replace, idp.idp.stats)  # type: ignore[no-any-return]


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Rig:
    """Starts sidecars wired to the module's IdP and drives sessions through them."""

    def __init__(
        self, idp: ThreadedIdP, start: Callable[..., Any], serve: Callable[..., Any], prefix: str
    ) -> None:
        self.idp = idp
        self._start = start
        self._serve = serve
        self.prefix = prefix
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._upstream: str | None = None

    async def sidecar(
        self, kind: str = "memory", timing: RefreshTiming | None = None, **refresh: str
    ) -> Any:
        if self._upstream is None:
            self._upstream = await self._serve(echo_app())
        config = make_config(
            self._upstream,
            idp=self.idp,
            refresh={**REFRESH, **refresh},
            public_paths=[],
            **store_sections(kind, self.prefix),
        )
        sc = await self._start(config, timing)
        await ready(sc)
        return sc

    async def login(self, sc: Any, user: str = "alice") -> str:
        """A full code flow with a 1 s access token; the session cookie's value."""
        set_idp(self.idp, access_token_ttl=LOGIN_TTL)
        cookie = await login_cookie(sc, user, path="/app", headers=NAVIGATE)
        set_idp(self.idp, access_token_ttl=LATER_TTL)
        return cookie

    async def get(
        self, sc: Any, cookie: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """GET /api through the sidecar: status, JSON body (or None), headers."""
        async with self.http.get(
            sc.url("/api"),
            headers={**JSON, "Cookie": f"sidecar={cookie}", **(headers or {})},
            allow_redirects=False,
        ) as r:
            body = await r.json() if r.content_type == "application/json" else None
            return r.status, body, r.headers

    async def token(self, sc: Any, cookie: str) -> str:
        status, body, _ = await self.get(sc, cookie)
        assert status == 200, (status, body)
        return str(body["authorization"]).removeprefix("Bearer ")

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def rig(
    idp: ThreadedIdP, start_sidecar: Any, upstream_app: Any, redis_prefix: str
) -> AsyncIterator[Rig]:
    r = Rig(idp, start_sidecar, upstream_app, redis_prefix)
    yield r
    await r.close()


def sessions(sc: Any) -> SessionManager:
    return sc.app[SESSIONS]  # type: ignore[no-any-return]


async def record(sc: Any, cookie: str) -> SessionRecord:
    session = await sessions(sc).load(cookie)
    assert session is not None
    return session.record


async def stored(sc: Any, cookie: str) -> bool:
    """Whether the store still holds the session, read beneath the manager."""
    return await sessions(sc).store.get(session_hash(cookie)) is not None


def metric(sc: Any, name: str, **labels: str) -> float:
    value = sc.app[METRICS].registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def until_due(sc: Any, *cookies: str) -> None:
    """Sleep until every session's token is inside its refresh window (not yet expired)."""
    due = 0.0
    for cookie in cookies:
        rec = await record(sc, cookie)
        due = max(due, rec.access_expires_at - refresh_window(rec, 2.0))
    await asyncio.sleep(max(0.0, due + 0.03 - time.time()))


async def until_version(sc: Any, cookie: str, version: int) -> None:
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        session = await sessions(sc).load(cookie)
        if session is not None and session.record.version >= version:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"session never reached version {version}")


async def userinfo_status(idp: ThreadedIdP, token: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.get(idp.issuer + "/userinfo", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status


# --- 1, 2: fresh tokens and one refresh -----------------------------------------------------


async def test_fresh_token_used_then_refreshed_once(rig: Rig, store_kind: str) -> None:
    """A fresh token is forwarded untouched; inside the window one grant rotates it for good."""
    sc = await rig.sidecar(store_kind)
    cookie = await rig.login(sc)
    before, rec = stats(rig.idp), await record(sc, cookie)

    assert await rig.token(sc, cookie) == rec.access_token
    assert await rig.token(sc, cookie) == rec.access_token
    assert stats(rig.idp).token_requests == before.token_requests
    assert (await record(sc, cookie)).version == rec.version

    await until_due(sc, cookie)
    new = await rig.token(sc, cookie)
    after = await record(sc, cookie)
    assert new != rec.access_token and new == after.access_token
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 1
    assert after.version == rec.version + 1
    assert after.refresh_token not in (None, rec.refresh_token)
    assert after.next_attempt_at is None and after.failed_attempts == 0
    assert await userinfo_status(rig.idp, new) == 200
    for _ in range(3):
        assert await rig.token(sc, cookie) == new
    end = stats(rig.idp)
    assert end.refresh_grants == before.refresh_grants + 1
    assert end.token_requests == before.token_requests + 1
    assert end.reuse_detected == before.reuse_detected
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed") == 1


# --- 3, 4: single flight in one process, the lock across replicas ---------------------------


async def test_fifty_concurrent_requests_one_grant(rig: Rig, store_kind: str) -> None:
    """50 concurrent requests of one session at expiry share one grant and its new token."""
    sc = await rig.sidecar(store_kind)
    cookie = await rig.login(sc)
    old = (await record(sc, cookie)).access_token
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=0.3)
    before = stats(rig.idp)

    results = await asyncio.gather(*(rig.get(sc, cookie) for _ in range(50)))

    assert {status for status, _, _ in results} == {200}
    tokens = {body["authorization"] for _, body, _ in results}
    new = (await record(sc, cookie)).access_token
    assert tokens == {f"Bearer {new}"} and new != old
    after = stats(rig.idp)
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.reuse_detected == before.reuse_detected
    assert metric(sc, "sidecar_refresh_singleflight_joins_total") > 0


async def test_burst_on_due_session_reads_store_once(
    rig: Rig, store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 concurrent requests of a due session join one flight before any store read: the
    store is read twice (the flight's check and its re-read under the lock), not 50 times.

    The IdP answers after 0.5 s so every request arrives while the flight runs."""
    sc = await rig.sidecar(store_kind)
    for _ in range(200):  # the cache serves sessions once the store's change feed is live
        if metric(sc, "sidecar_session_cache_live") == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the session cache never went live")
    cookie = await rig.login(sc)
    await until_due(sc, cookie)
    store = sessions(sc).store
    reads = 0
    real_get = store.get

    async def counting_get(h: str) -> Any:
        nonlocal reads
        reads += 1
        return await real_get(h)

    monkeypatch.setattr(store, "get", counting_get)
    for _ in range(50):  # until a request's lookup is served from this process's cache
        await sessions(sc).load(cookie)
        reads = 0
        if await sessions(sc).current(cookie) is not None and reads == 0:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the session never stayed in the cache")
    set_idp(rig.idp, token_endpoint_delay=0.5)
    before = stats(rig.idp)

    results = await asyncio.gather(*(rig.get(sc, cookie) for _ in range(50)))

    assert {status for status, _, _ in results} == {200}
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 1
    assert reads <= 3, reads  # 2, or 3 should a request come after the flight (loaded box)


async def test_two_replicas_one_grant(rig: Rig) -> None:
    """Two sidecars on one Redis refreshing the same session at once make one grant between them."""
    a = await rig.sidecar("redis")
    b = await rig.sidecar("redis")
    cookie = await rig.login(a)
    assert await rig.token(b, cookie) == (await record(a, cookie)).access_token
    await until_due(a, cookie)
    set_idp(rig.idp, token_endpoint_delay=0.3)
    before = stats(rig.idp)

    results = await asyncio.gather(*(rig.get(sc, cookie) for _ in range(10) for sc in (a, b)))

    assert {status for status, _, _ in results} == {200}
    new = (await record(b, cookie)).access_token
    assert {body["authorization"] for _, body, _ in results} == {f"Bearer {new}"}
    after = stats(rig.idp)
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.reuse_detected == before.reuse_detected
    contention = [metric(sc, "sidecar_refresh_lock_contention_total") for sc in (a, b)]
    assert max(contention) > 0, contention


# --- 5: a client that goes away -------------------------------------------------------------


async def test_disconnect_does_not_abort_grant(rig: Rig, store_kind: str) -> None:
    """A client that disconnects mid-refresh leaves the grant to finish and be stored."""
    sc = await rig.sidecar(store_kind)
    cookie = await rig.login(sc)
    rec = await record(sc, cookie)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=1.0)
    before = stats(rig.idp)

    request = asyncio.create_task(rig.get(sc, cookie))
    await asyncio.sleep(0.2)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await until_version(sc, cookie, rec.version + 1)

    set_idp(rig.idp, token_endpoint_delay=0.0)
    new = (await record(sc, cookie)).access_token
    assert new != rec.access_token
    assert await rig.token(sc, cookie) == new
    after = stats(rig.idp)
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.token_requests == before.token_requests + 1
    assert after.reuse_detected == before.reuse_detected


# --- 6, 7: invalid_grant --------------------------------------------------------------------


async def test_invalid_grant_ends_session(rig: Rig, store_kind: str) -> None:
    """A revoked grant ends the session: API 401 JSON, navigation 302 to login, record gone."""
    sc = await rig.sidecar(store_kind)
    api, page = await rig.login(sc), await rig.login(sc)
    rig.idp.call(rig.idp.idp.revoke_user_grants, "alice")
    await until_due(sc, api, page)

    status, body, _ = await rig.get(sc, api)
    assert status == 401 and body["error"] == "unauthenticated"
    assert body["login_url"].startswith("/oauth2/start")
    status, _, headers = await rig.get(sc, page, headers=NAVIGATE)
    assert status == 302 and headers["Location"].startswith("/oauth2/start")

    assert not await stored(sc, api) and not await stored(sc, page)
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_revoked") == 2
    assert stats(rig.idp).reuse_detected == 0


async def test_lost_rotation_told_apart_from_revocation(rig: Rig) -> None:
    """An attempt mark left by a dead holder labels the invalid_grant as a lost rotation."""
    sc = await rig.sidecar("redis")
    marked, plain = await rig.login(sc), await rig.login(sc)
    await sessions(sc).store.mark_attempt(session_hash(marked), time.time())
    rig.idp.call(rig.idp.idp.revoke_user_grants, "alice")
    await until_due(sc, marked, plain)

    assert (await rig.get(sc, marked))[0] == 401
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_lost_rotation") == 1
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_revoked") == 0
    assert (await rig.get(sc, plain))[0] == 401
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_revoked") == 1
    assert not await stored(sc, marked) and not await stored(sc, plain)


# --- 8: transient failures ------------------------------------------------------------------

PROBE_INTERVAL = 1.0  # refresh.probe_interval's default


async def test_transient_failure_opens_breaker_then_recovery(rig: Rig, store_kind: str) -> None:
    """IdP down: old valid token forwarded, no grant before the next probe, 503 once expired,
    then recovery at the first probe; the session itself is never backed off."""
    sc = await rig.sidecar(store_kind)
    cookie = await rig.login(sc)
    rec = await record(sc, cookie)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_failures=5)
    before = stats(rig.idp)

    assert await rig.token(sc, cookie) == rec.access_token
    failed_at = time.monotonic()
    failed = await record(sc, cookie)
    # The breaker opened; no per-session backoff, only a hold of one probe interval that
    # keeps other processes (their breakers closed) from granting at once.
    assert failed.failed_attempts == 0 and failed.next_attempt_at is not None
    assert failed.next_attempt_at <= time.time() + 1.0  # probe_interval's default
    assert failed.version == rec.version + 1
    assert failed.access_token == rec.access_token and failed.refresh_token == rec.refresh_token
    assert stats(rig.idp).token_requests == before.token_requests + 1  # never retried
    assert await rig.token(sc, cookie) == rec.access_token
    assert stats(rig.idp).token_requests == before.token_requests + 1  # before the next probe
    assert metric(sc, "sidecar_refresh_total", outcome="transient") == 1
    assert metric(sc, "sidecar_idp_breaker_open") == 1

    await asyncio.sleep(max(0.0, rec.access_expires_at + 0.05 - time.time()))
    status, body, headers = await rig.get(sc, cookie)
    assert status == 503 and body["error"] == "refresh_unavailable"
    assert 1 <= int(headers["Retry-After"]) <= PROBE_INTERVAL
    assert await stored(sc, cookie)

    set_idp(rig.idp, token_endpoint_failures=0)
    # A probe that left meanwhile failed too and moved the next one on by an interval.
    await asyncio.sleep(max(0.0, failed_at + 2 * PROBE_INTERVAL + 0.05 - time.monotonic()))
    new = await rig.token(sc, cookie)
    assert metric(sc, "sidecar_idp_breaker_open") == 0
    done = await record(sc, cookie)
    assert new == done.access_token != rec.access_token
    assert done.next_attempt_at is None and done.failed_attempts == 0
    after = stats(rig.idp)
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.reuse_detected == before.reuse_detected


# --- 9: logout during a refresh -------------------------------------------------------------


async def test_logout_during_refresh_not_resurrected(rig: Rig, store_kind: str) -> None:
    """Signing out while a refresh waits on the IdP: the fenced write keeps the session gone."""
    sc = await rig.sidecar(store_kind)
    cookie = await rig.login(sc)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=1.0)

    request = asyncio.create_task(rig.get(sc, cookie))
    await asyncio.sleep(0.2)
    async with rig.http.post(
        sc.url("/oauth2/sign_out"),
        headers={"Origin": sc.url(""), "Cookie": f"sidecar={cookie}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 303
    assert not await stored(sc, cookie)

    status, body, _ = await request
    assert status == 401 and body["error"] == "unauthenticated"
    assert not await stored(sc, cookie)
    assert metric(sc, "sidecar_refresh_total", outcome="ended_during_refresh") == 1
    assert (await rig.get(sc, cookie))[0] == 401


# --- 10: waiting on another holder ----------------------------------------------------------


async def locks_of(rig: Rig) -> tuple[RedisLocks, Any]:
    client = redis.Redis.from_url(REDIS_URL)
    return RedisLocks(client, rig.prefix), client


async def test_waiter_refreshes_after_lock_released(rig: Rig) -> None:
    """A request that finds the lock held waits; once it is released unchanged, it refreshes."""
    sc = await rig.sidecar("redis")
    cookie = await rig.login(sc)
    h = session_hash(cookie)
    rec = await record(sc, cookie)
    locks, client = await locks_of(rig)
    try:
        await until_due(sc, cookie)
        owner = await locks.acquire(h, 10)
        assert owner is not None
        before = stats(rig.idp)
        request = asyncio.create_task(rig.get(sc, cookie))
        await asyncio.sleep(0.5)
        assert not request.done()
        assert stats(rig.idp).token_requests == before.token_requests
        await locks.release(h, owner)
        status, body, _ = await asyncio.wait_for(request, 2)
    finally:
        await client.aclose()
    assert status == 200
    new = (await record(sc, cookie)).access_token
    assert body["authorization"] == f"Bearer {new}" and new != rec.access_token
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 1
    assert metric(sc, "sidecar_refresh_lock_contention_total") >= 1


async def test_waiter_gives_up_after_wait_timeout(rig: Rig) -> None:
    """A request waiting past refresh.wait_timeout on a held lock answers 503, session kept."""
    sc = await rig.sidecar("redis", idp_timeout="1s", lock_ttl="3s", wait_timeout="1s")
    cookie = await rig.login(sc)
    h = session_hash(cookie)
    locks, client = await locks_of(rig)
    try:
        await until_due(sc, cookie)
        owner = await locks.acquire(h, 10)
        assert owner is not None
        before = stats(rig.idp)
        started = time.monotonic()
        status, body, headers = await rig.get(sc, cookie)
        elapsed = time.monotonic() - started
        await locks.release(h, owner)
    finally:
        await client.aclose()
    assert status == 503 and body["error"] == "refresh_unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert 0.9 <= elapsed < 2.0, elapsed
    assert stats(rig.idp).token_requests == before.token_requests
    assert await stored(sc, cookie)


# --- 11: different sessions do not wait on each other ---------------------------------------


async def test_different_sessions_refresh_in_parallel(rig: Rig, store_kind: str) -> None:
    """Alice's and Bob's refreshes, each 1 s at the IdP, run side by side."""
    sc = await rig.sidecar(store_kind)
    alice, bob = await rig.login(sc, "alice"), await rig.login(sc, "bob")
    await until_due(sc, alice, bob)
    set_idp(rig.idp, token_endpoint_delay=1.0)
    before = stats(rig.idp)

    started = time.monotonic()
    results = await asyncio.gather(rig.get(sc, alice), rig.get(sc, bob))
    elapsed = time.monotonic() - started

    assert [status for status, _, _ in results] == [200, 200]
    assert elapsed < 1.8, elapsed
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 2


# --- 12: locks ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def locks(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryLocks()
        return
    client = redis.Redis.from_url(REDIS_URL)
    yield RedisLocks(client, redis_prefix)
    await client.aclose()


async def test_lock_is_exclusive_and_owned(locks: Any) -> None:
    """One owner at a time; only the owner releases or extends; other sessions are independent."""
    owner = await locks.acquire("h1", 5)
    assert owner is not None and await locks.held("h1")
    assert await locks.acquire("h1", 5) is None
    assert await locks.acquire("h2", 5) is not None

    await locks.release("h1", "not-the-owner")
    assert await locks.held("h1") and await locks.acquire("h1", 5) is None
    assert not await locks.extend("h1", "not-the-owner", 5)
    assert await locks.extend("h1", owner, 5)

    await locks.release("h1", owner)
    assert not await locks.held("h1")
    again = await locks.acquire("h1", 5)
    assert again is not None and again != owner
    assert not await locks.extend("h1", owner, 5)  # a former owner no longer extends


async def test_lock_expires_after_ttl_unless_extended(locks: Any) -> None:
    """A lock lapses after its ttl; an owner's extension pushes the lapse back."""
    short = await locks.acquire("h1", 0.1)
    kept = await locks.acquire("h2", 0.1)
    assert short is not None and kept is not None
    assert await locks.extend("h2", kept, 1.0)
    await asyncio.sleep(0.15)
    assert not await locks.held("h1")
    assert await locks.acquire("h1", 5) is not None
    assert await locks.held("h2") and await locks.acquire("h2", 5) is None
    await locks.release("h1", short)  # the lapsed owner cannot free the new holder's lock
    assert await locks.held("h1")


# --- 13: the window -------------------------------------------------------------------------


def _record(lifetime: float) -> SessionRecord:
    now = 1_000_000.0
    return SessionRecord(
        issuer="https://idp",
        subject="alice",
        idp_session_id=None,
        claims={},
        access_token="at",
        access_expires_at=now + lifetime,
        refresh_token="rt",
        refresh_expires_at=None,
        id_token=None,
        created_at=now,
        refreshed_at=now,
        expires_at=now + 86400,
    )


@pytest.mark.parametrize(
    ("lifetime", "before_expiry", "window"),
    [
        (300.0, 60.0, 60.0),  # long-lived token: before_expiry
        (60.0, 60.0, 30.0),  # before_expiry not below half the lifetime: half
        (4.0, 2.0, 2.0),  # exactly half: either
        (1.0, 2.0, 0.5),  # short-lived token: half its lifetime
        (0.0, 60.0, 0.0),  # no lifetime: no window
        (-5.0, 60.0, 0.0),  # expiry before the last refresh: never negative
    ],
)
def test_refresh_window(lifetime: float, before_expiry: float, window: float) -> None:
    """The window is min(before_expiry, lifetime / 2), never negative."""
    assert refresh_window(_record(lifetime), before_expiry) == window


# --- 14: an ID token for someone else -------------------------------------------------------


async def test_refresh_with_other_subject_id_token_ends_session(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh answer whose ID token names another sub is never used: the session ends."""
    sc = await rig.sidecar()
    alice, bob = await rig.login(sc, "alice"), await rig.login(sc, "bob")
    rec = await record(sc, alice)
    bob_id_token = (await record(sc, bob)).id_token
    assert bob_id_token is not None
    calls: list[str] = []

    async def refresh(refresh_token: str) -> TokenResponse:
        calls.append(refresh_token)
        return TokenResponse("swapped", 60.0, "rotated", None, bob_id_token, None)

    monkeypatch.setattr(sc.app[OIDC], "refresh", refresh)
    await until_due(sc, alice)

    status, body, _ = await rig.get(sc, alice)
    assert status == 401 and body["error"] == "unauthenticated"  # never "Bearer swapped"
    assert calls == [rec.refresh_token]
    assert not await stored(sc, alice)
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_id_token") == 1
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed") == 0
    assert await rig.token(sc, bob) == (await record(sc, bob)).access_token  # bob untouched


# --- a grant that timed out after the IdP rotated -------------------------------------------


async def test_timed_out_grant_then_invalid_grant_is_lost_rotation(
    rig: Rig,
) -> None:
    """A timed-out grant (maybe rotated) keeps its mark: a later refusal is a lost rotation."""
    # lock_ttl 4 s: the watchdog's first extension (at 1.33 s) misses the 1 s IdP timeout.
    # late_answer_timeout = idp_timeout: the grant itself is abandoned at 1 s.
    sc = await rig.sidecar(
        "redis",
        idp_timeout="1s",
        lock_ttl="4s",
        wait_timeout="1s",
        late_answer_timeout="1s",
        probe_interval="500ms",
    )
    cookie = await rig.login(sc)
    rec = await record(sc, cookie)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=1.5)  # the IdP rotates, then answers too late
    before = stats(rig.idp)

    status, body, headers = await rig.get(sc, cookie)  # the old token expired meanwhile
    assert status == 503 and body["error"] == "refresh_unavailable" and "Retry-After" in headers
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 1
    failed = await record(sc, cookie)
    assert failed.refresh_token == rec.refresh_token and failed.version == rec.version + 1
    assert await sessions(sc).store.attempt_mark(session_hash(cookie)) is not None

    set_idp(rig.idp, token_endpoint_delay=0.0)
    await asyncio.sleep(0.55)  # the IdP breaker's next probe: this session's next grant
    status, body, _ = await rig.get(sc, cookie)
    assert status == 401 and body["error"] == "unauthenticated"
    assert not await stored(sc, cookie)
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_lost_rotation") == 1
    assert metric(sc, "sidecar_refresh_total", outcome="invalid_grant_revoked") == 0


# --- the lock watchdog ----------------------------------------------------------------------


async def test_watchdog_stops_when_grant_ends(rig: Rig) -> None:
    """When the grant times out just as the watchdog extends the lock, the answer is not delayed."""
    # lock_ttl 3 s: the watchdog extends at 1 s, the instant the 1 s IdP timeout fires.
    sc = await rig.sidecar(
        "redis",
        RefreshTiming(watchdog_margin=1.0),  # bounds the bug's cost
        idp_timeout="1s",
        lock_ttl="3s",
        wait_timeout="1s",
        late_answer_timeout="1s",
    )
    cookie = await rig.login(sc)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=1.5)

    started = time.monotonic()
    status, _, _ = await rig.get(sc, cookie)
    elapsed = time.monotonic() - started
    assert status == 503
    assert elapsed < 1.6, f"answered {elapsed:.2f} s after the request; the IdP timeout is 1 s"


async def test_watchdog_error_does_not_discard_grant(
    rig: Rig, store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis blip while extending the lock does not throw away a successful refresh grant."""
    from sidecar.errors import StoreUnavailable
    from sidecar.web.keys import REFRESHER

    sc = await rig.sidecar(store_kind, idp_timeout="2s", lock_ttl="3s", wait_timeout="2s")
    cookie = await rig.login(sc)
    rec = await record(sc, cookie)
    locks = sc.app[REFRESHER]._locks
    blips: list[str] = []

    async def extend(h: str, owner: str, ttl: float) -> bool:
        blips.append(h)
        raise StoreUnavailable("redis: ConnectionError")  # one failed extension, at 1 s

    monkeypatch.setattr(locks, "extend", extend)
    await until_due(sc, cookie)
    set_idp(rig.idp, token_endpoint_delay=1.1)  # the grant outlives the first extension
    before = stats(rig.idp)

    status, body, _ = await rig.get(sc, cookie)
    assert blips, "the watchdog never tried to extend the lock"
    assert stats(rig.idp).refresh_grants == before.refresh_grants + 1  # the IdP rotated
    after = await record(sc, cookie)
    assert status == 200, (status, body)
    assert after.refresh_token != rec.refresh_token
    assert body["authorization"] == f"Bearer {after.access_token}"


# --- a late answer: callers stop waiting, the grant does not ------------------------------


async def test_late_answer_kept_callers_answered_at_idp_timeout(rig: Rig, store_kind: str) -> None:
    """Callers answer at idp_timeout; the grant runs on, its late answer is stored, no 2nd grant.

    Without it the timed-out grant was abandoned and the next attempt presented the same
    refresh token again: reuse detection at an IdP that rotated meanwhile (docs/refresh.md).
    """
    sc = await rig.sidecar(store_kind, idp_timeout="1s", lock_ttl="3s", wait_timeout="1s")
    cookie = await rig.login(sc)
    rec = await record(sc, cookie)
    await until_due(sc, cookie)
    delay = 2.5  # the IdP's answer: well past idp_timeout and past the first lock TTL third
    set_idp(rig.idp, token_endpoint_delay=delay)
    before = stats(rig.idp)

    async def timed() -> tuple[float, int]:
        started = time.monotonic()
        status, _, _ = await rig.get(sc, cookie)
        return time.monotonic() - started, status

    started = time.monotonic()
    first = await asyncio.gather(*(timed() for _ in range(5)))
    joined = await timed()  # arrives while the grant is still running: joins it
    mid = stats(rig.idp)
    latencies = [t for t, _ in [*first, joined]]
    print(f"\n[late answer {store_kind}] caller latencies {[round(t, 2) for t in latencies]}")
    # Each answers once idp_timeout has passed: 200 on the old token or 503 if it expired.
    assert all(0.9 <= t < 1.6 for t, _ in first), first
    assert all(status in (200, 503) for _, status in [*first, joined])
    assert 0.9 <= joined[0] < 1.6, joined
    assert mid.token_requests == before.token_requests + 1  # nobody sent a second grant
    assert (await record(sc, cookie)).version == rec.version  # the answer is not in yet

    await until_version(sc, cookie, rec.version + 1)  # the late answer, stored
    stored_after = time.monotonic() - started
    after = await record(sc, cookie)
    print(f"[late answer {store_kind}] stored after {stored_after:.2f}s (IdP delay {delay}s)")
    assert stored_after >= delay - 0.1
    assert after.refresh_token != rec.refresh_token and after.failed_attempts == 0
    set_idp(rig.idp, token_endpoint_delay=0.0)
    assert await rig.token(sc, cookie) == after.access_token
    assert await userinfo_status(rig.idp, after.access_token) == 200
    final = stats(rig.idp)
    assert final.token_requests == before.token_requests + 1
    assert final.refresh_grants == before.refresh_grants + 1
    assert final.reuse_detected == before.reuse_detected
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed_late") == 1
    assert metric(sc, "sidecar_refresh_total", outcome="transient") == 0
