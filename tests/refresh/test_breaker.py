"""The IdP circuit breaker (sidecar/refresh/breaker.py; docs/refresh.md, "IdP circuit breaker").

First the breaker alone, on an injected clock; then the in-process sidecar on the real Redis
and a dev IdP of this module's own, whose token endpoint answers 503, nothing in time, or
garbage. A connection reset is the certified provider's (tests/e2e/test_refresh_oidc_provider.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis

from sidecar.dev.idp import DevClient
from sidecar.errors import IdPUnavailable
from sidecar.metrics import Metrics
from sidecar.refresh.breaker import IdPBreaker
from sidecar.session import SessionManager, SessionRecord
from sidecar.web.keys import METRICS, SESSIONS
from tests.support.configs import make_config
from tests.support.idp import (
    CLIENT_ID,
    ThreadedIdP,
    idp_stats,
    set_delay,
    set_garbage,
    set_token_failures,
)
from tests.support.login import JSON, login_cookie
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.stores import REDIS_URL, store_sections
from tests.support.upstreams import echo_app

ACCESS_TTL = 6  # s, the `idp` fixture's tokens: due 3 s after login, 503 from 0.6 s before exp
PROBE_INTERVAL = 1.0  # refresh.probe_interval's default
REFRESH = {
    "before_expiry": "3s",
    "idp_timeout": "500ms",
    "lock_ttl": "3s",
    "wait_timeout": "1s",
    "late_answer_timeout": "500ms",  # a grant unanswered at 0.5 s fails (timeout) at once
}
LOGINS_AT_ONCE = 4
DUE = ACCESS_TTL / 2 + 0.05  # s after login: inside the refresh window, token still valid
EXPIRED = ACCESS_TTL + 0.05  # s after login: past the token's exp

Json = dict[str, Any]


# --- the breaker alone ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(
    version: int, token: str, next_attempt_at: float | None = None, failed_attempts: int = 0
) -> SessionRecord:
    return SessionRecord(
        issuer="https://idp.example",
        subject="alice",
        idp_session_id=None,
        claims={},
        access_token=token,
        access_expires_at=0.0,
        refresh_token="r",
        refresh_expires_at=None,
        id_token=None,
        created_at=0.0,
        refreshed_at=0.0,
        expires_at=0.0,
        version=version,
        next_attempt_at=next_attempt_at,
        failed_attempts=failed_attempts,
    )


def transitions(metrics: Metrics, state: str) -> float:
    value = metrics.registry.get_sample_value(
        "sidecar_idp_breaker_transitions_total", {"state": state}
    )
    return float(value or 0.0)


def gauge(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("sidecar_idp_breaker_open") or 0.0)


class TestBreakerAlone:
    def test_metrics_exported_at_zero_before_any_transition(self) -> None:
        """Both transition children and the gauge are in /metrics from the start."""
        metrics = Metrics()
        IdPBreaker(PROBE_INTERVAL, 1.0, metrics)
        text = metrics.render().decode()
        assert "sidecar_idp_breaker_open 0.0" in text
        assert 'sidecar_idp_breaker_transitions_total{state="open"} 0.0' in text
        assert 'sidecar_idp_breaker_transitions_total{state="closed"} 0.0' in text

    def test_one_probe_per_interval_while_open(self) -> None:
        """Closed: every session passes. Open: one probe at a time, one per interval."""
        clock, metrics = Clock(), Metrics()
        breaker = IdPBreaker(PROBE_INTERVAL, 10.0, metrics, clock)
        assert all(breaker.admit(f"s{i}") for i in range(5))
        breaker.failed("503")
        assert (gauge(metrics), transitions(metrics, "open")) == (1, 1)
        assert [breaker.admit(f"s{i}") for i in range(5)] == [None] * 5
        assert breaker.retry_after() == 1

        clock.now += PROBE_INTERVAL
        probe = breaker.admit("s7")
        assert probe is not None and probe.probe and breaker.admits("s7")
        assert breaker.admit("s8") is None and not breaker.admits("s8")
        breaker.failed("503 again")  # the probe's failure: no second transition
        breaker.release(probe)
        assert breaker.admit("s8") is None  # its interval has not ended
        clock.now += PROBE_INTERVAL - 0.01
        assert breaker.admit("s8") is None
        clock.now += 0.01
        second = breaker.admit("s8")
        assert second is not None and second.probe

        breaker.succeeded()
        assert (gauge(metrics), transitions(metrics, "closed")) == (0, 1)
        assert transitions(metrics, "open") == 1
        assert all(breaker.admit(f"s{i}") for i in range(5))
        breaker.release(second)  # a pass released after the close changes nothing
        assert not breaker.is_open

    def test_probe_released_without_a_grant_frees_the_slot_only(self) -> None:
        """A probe that ended without a grant lets the next one go once its interval is over."""
        clock = Clock()
        breaker = IdPBreaker(PROBE_INTERVAL, 10.0, Metrics(), clock)
        breaker.failed("reset")
        clock.now += PROBE_INTERVAL
        probe = breaker.admit("a")
        assert probe is not None
        breaker.release(probe)
        assert breaker.admit("b") is None
        clock.now += PROBE_INTERVAL
        assert breaker.admit("b") is not None

    async def test_next_probe_counts_from_when_the_grant_left(self) -> None:
        """A probe that waited (another replica held its session's lock) and sent its grant
        late moves the next probe to an interval after that grant: never two grants closer."""
        clock = Clock()
        breaker = IdPBreaker(PROBE_INTERVAL, 10.0, Metrics(), clock)
        breaker.failed("503")
        clock.now += PROBE_INTERVAL
        probe = breaker.admit("a")
        assert probe is not None
        clock.now += 0.7  # waiting for the other replica's grant on the same session
        with pytest.raises(IdPUnavailable), breaker.watching():
            raise IdPUnavailable("503")
        breaker.release(probe)
        clock.now += 0.5  # the interval since the admission is over, not since the grant
        assert breaker.admit("b") is None
        clock.now += 0.5
        assert breaker.admit("b") is not None

    @pytest.mark.parametrize(
        ("interval", "elapsed", "expected"),
        [(1.0, 0.0, 1), (1.0, 0.7, 1), (1.0, 5.0, 1), (3.0, 0.0, 3), (3.0, 0.5, 3), (3.0, 2.5, 1),
         (2.5, 0.0, 2), (0.2, 0.0, 1)],
    )  # fmt: skip
    def test_retry_after_at_most_the_interval(
        self, interval: float, elapsed: float, expected: int
    ) -> None:
        """Whole seconds until the next probe, at least 1, never above the interval (rounded
        down): the header a 503 carries."""
        clock = Clock()
        breaker = IdPBreaker(interval, 10.0, Metrics(), clock)
        breaker.failed("timeout")
        clock.now += elapsed
        assert breaker.retry_after() == expected

    def test_learns_from_another_process_grant(self) -> None:
        """A waiter's view of the holder's grant: a new version with the same token and the
        same count of the session's own failures is a transient failure (held for one probe
        interval); a new token is a success; a counted failure (rejected) is neither."""
        metrics = Metrics()
        breaker = IdPBreaker(PROBE_INTERVAL, 10.0, metrics, Clock())
        before = record(3, "t1")
        rejected = record(4, "t1", next_attempt_at=200.0, failed_attempts=1)
        breaker.learn(before, rejected)  # the session's own failure, backed off alone
        breaker.learn(before, before)  # the lock went, nothing written (a dead holder)
        assert not breaker.is_open
        breaker.learn(before, record(4, "t1", next_attempt_at=1.0))
        assert breaker.is_open
        breaker.learn(before, record(4, "t2"))
        assert not breaker.is_open
        assert (transitions(metrics, "open"), transitions(metrics, "closed")) == (1, 1)

    async def test_unanswered_at_idp_timeout_opens_until_the_answer(self) -> None:
        """A grant still unanswered at idp_timeout opens the breaker; its late answer closes it."""
        breaker = IdPBreaker(PROBE_INTERVAL, 0.05, Metrics())
        with breaker.watching():
            await asyncio.sleep(0.1)
            assert breaker.is_open
        assert not breaker.is_open

    async def test_waiter_gets_the_running_probe_outcome(self) -> None:
        """A session refused while a probe runs is admitted as soon as the probe succeeds."""
        clock = Clock()
        breaker = IdPBreaker(PROBE_INTERVAL, 10.0, Metrics(), clock)
        breaker.failed("503")
        clock.now += PROBE_INTERVAL
        probe = breaker.admit("probe")
        assert probe is not None
        waiter = asyncio.create_task(breaker.admit_after_probe("other"))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        breaker.succeeded()
        admitted = await asyncio.wait_for(waiter, 1.0)
        assert admitted is not None and not admitted.probe


# --- the sidecar, in process, on the real Redis ---------------------------------------------


class Rig:
    """One in-process sidecar on the module's IdP and Redis, and API calls through it."""

    def __init__(self, idp: ThreadedIdP, sc: Sidecar) -> None:
        self.idp = idp
        self.sc = sc
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def logins(self, n: int) -> list[str]:
        """n logins, a few at a time: the code exchange has refresh.idp_timeout (0.5 s here),
        which 20 at once against the in-process dev IdP can outrun on a loaded machine."""
        gate = asyncio.Semaphore(LOGINS_AT_ONCE)

        async def one() -> str:
            async with gate:
                return await login_cookie(self.sc, "alice")

        return list(await asyncio.gather(*(one() for _ in range(n))))

    async def get(self, cookie: str) -> tuple[int, str | None, str | None]:
        """GET /api: status, the forwarded access token (200) and Retry-After (503)."""
        headers = {**JSON, "Cookie": f"sidecar={cookie}"}
        async with self.http.get(self.sc.url("/api"), headers=headers) as r:
            body = await r.json()
            token = str(body["authorization"]).removeprefix("Bearer ") if r.status == 200 else None
            return r.status, token, r.headers.get("Retry-After")

    async def record(self, cookie: str) -> SessionRecord:
        session = await self.sessions.load(cookie)
        assert session is not None
        return session.record

    @property
    def sessions(self) -> SessionManager:
        return self.sc.app[SESSIONS]

    def metric(self, name: str, **labels: str) -> float:
        return float(self.sc.app[METRICS].registry.get_sample_value(name, labels) or 0.0)

    def grants(self) -> int:
        return idp_stats(self.idp)["refresh_grants"]

    def token_requests(self) -> int:
        return idp_stats(self.idp)["token_requests"]


@pytest.fixture
def working_idp(idp: ThreadedIdP) -> Iterator[ThreadedIdP]:
    """The module's IdP; every fault knob is reset after the test."""
    yield idp
    set_delay(idp, 0.0)
    set_token_failures(idp, 0)
    set_garbage(idp, 0)


@pytest.fixture
async def rig(
    working_idp: ThreadedIdP,
    start_sidecar: StartSidecar,
    upstream_app: Any,
    redis_prefix: str,
) -> AsyncIterator[Rig]:
    upstream = await upstream_app(echo_app())
    config = make_config(
        upstream,
        idp=working_idp,
        refresh=REFRESH,
        public_paths=[],
        **store_sections("redis", redis_prefix),
    )
    sc = await start_sidecar(config)
    await ready(sc)
    r = Rig(working_idp, sc)
    yield r
    await r.http.close()


async def until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


@asynccontextmanager
async def lock_commands(prefix: str) -> AsyncIterator[list[str]]:
    """The commands Redis runs on the prefix's refresh locks meanwhile (MONITOR)."""
    seen: list[str] = []
    conn = redis.Redis.from_url(REDIS_URL)

    async def follow() -> None:
        async with conn.monitor() as monitor:
            started.set()
            async for info in monitor.listen():
                if f"{prefix}:lock:" in info["command"]:
                    seen.append(info["command"].split()[0].upper())

    started = asyncio.Event()
    task = asyncio.create_task(follow())
    await asyncio.wait_for(started.wait(), 5.0)
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)
        await conn.aclose()


FAULTS = {
    "503": lambda idp: set_token_failures(idp, 1_000_000),
    "timeout": lambda idp: set_delay(idp, 1.0),  # later than idp_timeout = late_answer_timeout
    "garbage-html": lambda idp: set_garbage(idp, 1_000_000, "html"),
    "garbage-truncated-json": lambda idp: set_garbage(idp, 1_000_000, "truncated_json"),
}


@pytest.mark.parametrize("kind", list(FAULTS))
async def test_each_transient_kind_opens_the_breaker(
    rig: Rig, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One failed grant opens the breaker: no session is backed off, another due session
    sends no grant before the next probe and uses its still-valid token; the first probe
    that succeeds closes it. One warning on open, one info on close, counted once each."""
    caplog.set_level(logging.INFO, logger="sidecar.refresh")
    first, other = await rig.logins(2)
    logged_in = time.monotonic()
    before = await rig.record(first)
    await until(logged_in + DUE)
    assert rig.metric("sidecar_idp_breaker_open") == 0

    FAULTS[kind](rig.idp)
    sent = rig.token_requests()
    status, token, _ = await rig.get(first)
    assert (status, token) == (200, before.access_token)
    failed_at = time.monotonic()
    assert rig.token_requests() == sent + 1
    assert rig.metric("sidecar_idp_breaker_open") == 1
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="open") == 1
    failed = await rig.record(first)
    # Not backed off: held one probe interval, for the other processes' closed breakers.
    assert failed.failed_attempts == 0 and failed.next_attempt_at is not None
    assert failed.next_attempt_at <= time.time() + PROBE_INTERVAL
    assert failed.version == before.version + 1

    # Open: another due session uses its token without a grant until the next probe.
    other_token = (await rig.record(other)).access_token
    for _ in range(3):
        assert await rig.get(other) == (200, other_token, None)
    assert rig.token_requests() == sent + 1

    set_delay(rig.idp, 0.0)
    set_token_failures(rig.idp, 0)
    set_garbage(rig.idp, 0)
    await until(failed_at + PROBE_INTERVAL + 0.05)
    status, token, _ = await rig.get(other)
    assert status == 200 and token != other_token
    assert rig.metric("sidecar_idp_breaker_open") == 0
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="closed") == 1
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="open") == 1
    messages = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "sidecar.refresh" and "circuit breaker" in r.getMessage()
    ]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO], messages


SESSIONS_N = 20
OUTAGE = 3.0  # s of requests while the IdP fails


async def test_outage_one_probe_per_interval_then_everyone_refreshes_at_once(
    rig: Rig, redis_prefix: str
) -> None:
    """20 expired sessions polled every 0.1 s through a token-endpoint outage: at most one
    grant per probe interval reaches the IdP, every answer is 503 with a Retry-After of at
    most the interval; when the IdP is back, the first probe closes the breaker and every
    session is served 200 within the interval (+0.5 s), with exactly one grant each."""
    cookies = await rig.logins(SESSIONS_N)
    logged_in = time.monotonic()
    tokens = {c: (await rig.record(c)).access_token for c in cookies}
    await until(logged_in + EXPIRED)

    set_token_failures(rig.idp, 1_000_000)
    status, _, _ = await rig.get(cookies[0])  # the failure that opens the breaker
    assert status == 503
    assert rig.metric("sidecar_idp_breaker_open") == 1
    opened = time.monotonic()
    sent, grants = rig.token_requests(), rig.grants()
    answers: list[tuple[int, str | None, str | None]] = []

    async def poll(cookie: str, until_t: float) -> None:
        while time.monotonic() < until_t:
            answers.append(await rig.get(cookie))
            await asyncio.sleep(0.1)

    async with lock_commands(redis_prefix) as locks:
        await asyncio.gather(*(poll(c, opened + OUTAGE) for c in cookies))
    probes = rig.token_requests() - sent
    # Refused sessions cost no lock traffic: one lock taken per probe, none per request.
    assert locks.count("SET") <= probes + 1, locks  # + one probe leaving as we stop
    elapsed = time.monotonic() - opened
    assert len(answers) >= SESSIONS_N * OUTAGE * 2, len(answers)
    assert {a[0] for a in answers} == {503}
    assert {a[2] for a in answers} == {"1"}  # at most probe_interval, whole seconds
    assert probes <= int(elapsed / PROBE_INTERVAL) + 1, (probes, elapsed)
    assert probes >= int(elapsed / PROBE_INTERVAL) - 1, (probes, elapsed)  # it did probe
    assert rig.grants() == grants

    set_token_failures(rig.idp, 0)
    back = time.monotonic()
    served: dict[str, float] = {}

    async def until_served(cookie: str) -> None:
        while time.monotonic() < back + 5.0:
            status, token, _ = await rig.get(cookie)
            if status == 200:
                assert token != tokens[cookie]
                served[cookie] = time.monotonic() - back
                return
            await asyncio.sleep(0.1)

    await asyncio.gather(*(until_served(c) for c in cookies))
    slowest = max(served.values(), default=float("inf"))
    print(
        f"\n[breaker] {SESSIONS_N} sessions: {probes} probes in {elapsed:.1f}s of outage; "
        f"served again after {min(served.values()):.2f}-{slowest:.2f}s"
    )
    assert len(served) == SESSIONS_N
    assert slowest <= PROBE_INTERVAL + 0.5, served
    assert rig.grants() == grants + SESSIONS_N  # one grant per session, no more
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="closed") == 1
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="open") == 1


async def test_rejected_grant_backs_off_that_session_only(rig: Rig) -> None:
    """An OAuth error other than invalid_grant (here invalid_client) concerns the session's
    grant, not the IdP: that session backs off, the breaker stays closed, and another due
    session refreshes at once."""
    rejected, other = await rig.logins(2)
    logged_in = time.monotonic()
    before = await rig.record(rejected)
    await until(logged_in + DUE)

    client = rig.idp.call(lambda: rig.idp.idp.clients[CLIENT_ID])
    assert isinstance(client, DevClient)
    rig.idp.call(rig.idp.idp.register_client, dataclasses.replace(client, client_secret="x"))
    try:
        assert await rig.get(rejected) == (200, before.access_token, None)
    finally:
        rig.idp.call(rig.idp.idp.register_client, client)
    backed_off = await rig.record(rejected)
    assert backed_off.failed_attempts == 1 and backed_off.next_attempt_at is not None
    assert rig.metric("sidecar_refresh_total", outcome="rejected") == 1
    assert rig.metric("sidecar_idp_breaker_open") == 0
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="open") == 0

    sent = rig.token_requests()
    assert await rig.get(rejected) == (200, before.access_token, None)  # backing off
    assert rig.token_requests() == sent
    status, token, _ = await rig.get(other)  # not held back by the other's failure
    assert status == 200 and token != (await rig.record(rejected)).access_token
    assert rig.token_requests() == sent + 1


async def test_record_with_an_old_next_attempt_at_keeps_working(rig: Rig) -> None:
    """A record from an earlier version that backed off a transient failure itself: its
    `next_attempt_at` is honoured (valid token used, no grant), then it refreshes as usual."""
    (cookie,) = await rig.logins(1)
    logged_in = time.monotonic()
    session = await rig.sessions.load(cookie)
    assert session is not None
    old = session.record
    at = time.time() + DUE + 1.0  # a backoff still running when the session is due
    legacy = old.evolve(version=old.version + 1, next_attempt_at=at, failed_attempts=3)
    assert await rig.sessions.save(session, legacy)
    await until(logged_in + DUE)

    sent = rig.token_requests()
    assert await rig.get(cookie) == (200, old.access_token, None)
    assert rig.token_requests() == sent
    await asyncio.sleep(max(0.0, at + 0.05 - time.time()))
    status, token, _ = await rig.get(cookie)
    assert status == 200 and token != old.access_token
    done = await rig.record(cookie)
    assert done.next_attempt_at is None and done.failed_attempts == 0
    assert rig.metric("sidecar_idp_breaker_transitions_total", state="open") == 0
