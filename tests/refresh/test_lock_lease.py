"""The refresh lock's lease (docs/refresh.md, "The lease"), in-process against a dev IdP.

The lock is taken for a short lease (`refresh.lock_ttl`, 5 s by default) that its holder's
watchdog renews every third of it for as long as it holds the lock: a live holder keeps it
through a grant of any length (up to `late_answer_timeout`), a dead one's lapses within the
lease and a waiter takes over, and a holder whose lease may have run out writes nothing.
Each test runs on the memory store and on the real Redis.

Logins get a 2 s access token (refresh window = min(2 s, lifetime / 2)), so a session is due
about a second after login; tokens issued afterwards live 60 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from sidecar.dev.idp.models import DevIdPStats
from sidecar.errors import StoreUnavailable
from sidecar.refresh import refresh_window
from sidecar.session import SessionManager, SessionRecord, session_hash
from sidecar.session.store import Locks
from sidecar.web.keys import METRICS, REFRESHER, SESSIONS
from tests.support.configs import make_config
from tests.support.idp import ThreadedIdP
from tests.support.login import JSON, NAVIGATE, login_cookie
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.stores import store_sections
from tests.support.upstreams import Serve, echo_app

ACCESS_TTL = 2  # the `idp` fixture: a dev IdP of this module's own; logins get this lifetime
LATER_TTL = 60
POLL = 0.25  # RefreshTiming.poll_interval: how often a waiter looks at the lock
DEFAULT_LEASE = 5.0  # refresh.lock_ttl's default
SHORT_LEASE = {"idp_timeout": "1s", "lock_ttl": "1s", "wait_timeout": "1s"}


@pytest.fixture(autouse=True)
def reset_idp(idp: ThreadedIdP) -> Iterator[None]:
    set_idp(idp, token_endpoint_delay=0.0, access_token_ttl=ACCESS_TTL)
    yield
    set_idp(idp, token_endpoint_delay=0.0, access_token_ttl=ACCESS_TTL)


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


def set_idp(idp: ThreadedIdP, **values: float) -> None:
    for name, value in values.items():
        idp.call(setattr, idp.idp, name, value)


def stats(idp: ThreadedIdP) -> DevIdPStats:
    """A copy of the IdP's counters, taken on its own thread."""
    return idp.call(dataclasses.replace, idp.idp.stats)  # type: ignore[no-any-return]


async def start(
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    idp: ThreadedIdP,
    kind: str,
    prefix: str,
    **refresh: str,
) -> Sidecar:
    upstream = await upstream_app(echo_app())
    config = make_config(
        upstream,
        idp=idp,
        refresh={"before_expiry": "2s", **refresh},
        public_paths=[],
        **store_sections(kind, prefix),
    )
    sc = await start_sidecar(config)
    await ready(sc)
    return sc


async def log_in(sc: Sidecar, idp: ThreadedIdP) -> str:
    """A full code flow with a short access token; the session cookie's value."""
    set_idp(idp, access_token_ttl=ACCESS_TTL)
    cookie = await login_cookie(sc, "alice", path="/app", headers=NAVIGATE)
    set_idp(idp, access_token_ttl=LATER_TTL)
    return cookie


def sessions(sc: Sidecar) -> SessionManager:
    return sc.app[SESSIONS]


def locks(sc: Sidecar) -> Locks:
    """The sidecar's own locks: for the memory store, the only ones its refreshes see."""
    return sc.app[REFRESHER]._locks  # type: ignore[no-any-return]


async def record(sc: Sidecar, cookie: str) -> SessionRecord:
    session = await sessions(sc).load(cookie)
    assert session is not None
    return session.record


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    return float(sc.app[METRICS].registry.get_sample_value(name, labels) or 0.0)


async def until_due(sc: Sidecar, cookie: str) -> None:
    rec = await record(sc, cookie)
    due = rec.access_expires_at - refresh_window(rec, 2.0)
    await asyncio.sleep(max(0.0, due + 0.03 - time.time()))


async def get(http: aiohttp.ClientSession, sc: Sidecar, cookie: str) -> tuple[int, Any]:
    """GET /api through the sidecar: status and JSON body (or None)."""
    headers = {**JSON, "Cookie": f"sidecar={cookie}"}
    async with http.get(sc.url("/api"), headers=headers, allow_redirects=False) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body


def lease_task() -> asyncio.Task[Any]:
    """The holder's lease watchdog (`Refresher._keep_lock`), running on this event loop."""
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "refresh-lease"]
    return task


async def until_sent(idp: ThreadedIdP, before: DevIdPStats) -> None:
    deadline = time.monotonic() + 3.0
    while stats(idp).token_requests == before.token_requests:
        assert time.monotonic() < deadline, "the grant never reached the IdP"
        await asyncio.sleep(0.02)


# --- a dead holder ------------------------------------------------------------------------


async def test_dead_holder_taken_over_within_the_default_lease(
    idp: ThreadedIdP,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    redis_prefix: str,
    store_kind: str,
    http: aiohttp.ClientSession,
) -> None:
    """A holder that took the lock for the default lease, marked its grant sent and died
    (it never renews): the next request waits for the lease to lapse, no longer than a poll
    more, takes over and sends the grant with the refresh token it has."""
    sc = await start(
        start_sidecar,
        upstream_app,
        idp,
        store_kind,
        redis_prefix,
        idp_timeout="2s",
        wait_timeout="8s",
    )
    assert sc.config.refresh.lock_ttl == DEFAULT_LEASE
    cookie = await log_in(sc, idp)
    old = await record(sc, cookie)
    await until_due(sc, cookie)
    h = session_hash(cookie)
    session = await sessions(sc).load(cookie)
    assert session is not None
    taken = time.monotonic()
    assert await locks(sc).acquire(h, sc.config.refresh.lock_ttl) is not None
    await sessions(sc).mark_grant_sent(session, time.time())  # the dead holder's mark
    before = stats(idp)

    status, body = await get(http, sc, cookie)
    took = time.monotonic() - taken
    new = await record(sc, cookie)
    print(f"\n[dead holder {store_kind}] taken over {took:.2f}s after the lock was taken")
    assert status == 200, (status, body)
    assert body["authorization"] == f"Bearer {new.access_token}"
    assert new.refresh_token != old.refresh_token
    assert DEFAULT_LEASE - 0.1 <= took < DEFAULT_LEASE + POLL + 0.75, took
    after = stats(idp)
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.reuse_detected == before.reuse_detected
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed") == 1
    assert metric(sc, "sidecar_refresh_lock_contention_total") >= 1


# --- a live holder keeps its lock --------------------------------------------------------


async def test_lease_renewed_through_a_grant_of_several_leases(
    idp: ThreadedIdP,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    redis_prefix: str,
    store_kind: str,
    http: aiohttp.ClientSession,
) -> None:
    """A 1 s lease and a grant the IdP answers after 3.5 s: the watchdog renews the lease
    all along, so nobody else can take the lock (on Redis, a second replica's requests wait
    for the answer); one grant, its answer stored and used by every caller afterwards."""
    sc = await start(start_sidecar, upstream_app, idp, store_kind, redis_prefix, **SHORT_LEASE)
    other = None
    if store_kind == "redis":
        other = await start(
            start_sidecar,
            upstream_app,
            idp,
            store_kind,
            redis_prefix,
            **{**SHORT_LEASE, "wait_timeout": "6s"},
        )
    cookie = await log_in(sc, idp)
    old = await record(sc, cookie)
    await until_due(sc, cookie)
    h = session_hash(cookie)
    set_idp(idp, token_endpoint_delay=3.5)
    before = stats(idp)

    holder = asyncio.create_task(get(http, sc, cookie))
    await until_sent(idp, before)
    sent = time.monotonic()
    waiters = []
    taken = []
    for at in (1.2, 2.2, 3.2):  # past the first, second and third lease
        await asyncio.sleep(max(0.0, sent + at - time.monotonic()))
        taken.append(await locks(sc).acquire(h, 1.0))
        if other is not None:
            waiters.append(asyncio.create_task(get(http, other, cookie)))
    held = await holder
    answers = await asyncio.gather(*waiters)
    await asyncio.sleep(max(0.0, sent + 3.5 + 0.2 - time.monotonic()))
    set_idp(idp, token_endpoint_delay=0.0)
    new = await record(sc, cookie)
    after = stats(idp)

    assert taken == [None, None, None], "the lock lapsed while its holder was alive"
    assert held[0] in (200, 503), held
    assert new.refresh_token != old.refresh_token and new.version == old.version + 1
    assert after.token_requests == before.token_requests + 1  # nobody sent a second grant
    assert after.refresh_grants == before.refresh_grants + 1
    assert after.reuse_detected == before.reuse_detected
    for status, body in answers:
        assert status == 200 and body["authorization"] == f"Bearer {new.access_token}", body
    assert (await get(http, sc, cookie))[1]["authorization"] == f"Bearer {new.access_token}"
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed_late") == 1
    assert not await locks(sc).held(h)


# --- a holder that lost its lease --------------------------------------------------------


async def test_holder_that_lost_its_lease_does_not_write(
    idp: ThreadedIdP,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    redis_prefix: str,
    store_kind: str,
    http: aiohttp.ClientSession,
) -> None:
    """The holder's watchdog stops (a stalled holder), its 1 s lease lapses and another takes
    the lock; when the IdP answers, the former holder writes nothing (neither the rotated
    tokens nor a failure) and leaves the new holder's lock alone."""
    sc = await start(start_sidecar, upstream_app, idp, store_kind, redis_prefix, **SHORT_LEASE)
    cookie = await log_in(sc, idp)
    old = await record(sc, cookie)
    await until_due(sc, cookie)
    h = session_hash(cookie)
    set_idp(idp, token_endpoint_delay=2.5)
    before = stats(idp)

    holder = asyncio.create_task(get(http, sc, cookie))
    await until_sent(idp, before)
    sent = time.monotonic()
    lease_task().cancel()  # renews no more
    await asyncio.sleep(1.3)
    taker = await locks(sc).acquire(h, 10.0)
    assert taker is not None, "the lease did not lapse without renewals"
    status, body = await holder
    await asyncio.sleep(max(0.0, sent + 2.5 + 0.3 - time.monotonic()))
    set_idp(idp, token_endpoint_delay=0.0)
    now = await record(sc, cookie)

    assert stats(idp).refresh_grants == before.refresh_grants + 1  # the IdP did rotate
    assert now.version == old.version, "a holder without its lease wrote"
    assert now.refresh_token == old.refresh_token and now.failed_attempts == 0
    assert await locks(sc).held(h) and await locks(sc).acquire(h, 1.0) is None
    assert metric(sc, "sidecar_refresh_total", outcome="lease_lost") == 1
    assert metric(sc, "sidecar_refresh_total", outcome="refreshed_late") == 0
    assert status in (200, 503), (status, body)
    await locks(sc).release(h, taker)


# --- Redis blips while renewing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("blip_from", "blip_until", "kept"),
    [(0.4, 1.0, True), (0.4, 1.9, False)],
    ids=["shorter-than-the-lease", "longer-than-the-lease"],
)
async def test_renewal_through_store_blips(
    idp: ThreadedIdP,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    redis_prefix: str,
    store_kind: str,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    blip_from: float,
    blip_until: float,
    kept: bool,
) -> None:
    """Renewals fail (the store unreachable) for a while during a 2.5 s grant on a 1 s
    lease. Shorter than the lease: a renewal tried again soon keeps it, the answer is
    stored. Longer: the lease lapses, and the holder writes nothing."""
    sc = await start(start_sidecar, upstream_app, idp, store_kind, redis_prefix, **SHORT_LEASE)
    cookie = await log_in(sc, idp)
    old = await record(sc, cookie)
    await until_due(sc, cookie)
    lock = locks(sc)
    real_extend = lock.extend
    started = time.monotonic() + 3600.0  # set once the grant is sent
    failed: list[float] = []
    renewals: list[float] = []

    async def extend(h: str, owner: str, ttl: float) -> bool:
        now = time.monotonic() - started
        renewals.append(now)
        if blip_from <= now < blip_until:
            failed.append(now)
            raise StoreUnavailable("redis: ConnectionError")
        return await real_extend(h, owner, ttl)

    monkeypatch.setattr(lock, "extend", extend)
    set_idp(idp, token_endpoint_delay=2.5)
    before = stats(idp)
    holder = asyncio.create_task(get(http, sc, cookie))
    await until_sent(idp, before)
    started = time.monotonic()
    status, body = await holder
    await asyncio.sleep(max(0.0, started + 2.5 + 0.3 - time.monotonic()))
    set_idp(idp, token_endpoint_delay=0.0)
    now = await record(sc, cookie)

    print(f"\n[blip {blip_from}-{blip_until}s {store_kind}] renewals failed at {failed}")
    assert failed, "no renewal met the blip"
    assert stats(idp).refresh_grants == before.refresh_grants + 1
    if kept:
        # Tried again sooner than the next third of the lease.
        retry = renewals[renewals.index(failed[0]) + 1]
        assert retry - failed[0] < 0.3, renewals
        assert now.version == old.version + 1 and now.refresh_token != old.refresh_token
        assert metric(sc, "sidecar_refresh_total", outcome="refreshed_late") == 1
        assert metric(sc, "sidecar_refresh_total", outcome="lease_lost") == 0
    else:
        assert now.version == old.version and now.refresh_token == old.refresh_token
        assert metric(sc, "sidecar_refresh_total", outcome="lease_lost") == 1
    assert status in (200, 503), (status, body)
