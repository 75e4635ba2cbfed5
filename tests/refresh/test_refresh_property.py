"""Property-style test of the refresh protocol (the refresh invariant, docs/architecture.md),
against real Redis.

K simulated processes (K `Refresher`s, each with its own `SessionManager`, `RedisLocks`,
`RedisEvents` and Redis connection) share one `RedisSessionStore` and one fake IdP that
rotates refresh tokens and detects reuse. N tasks with random start delays call
`ensure_fresh` on one session; some are cancelled (client disconnects). Access tokens live
0.5 s (refresh window 0.25 s), so a run spans several rotations. Every run is seeded.

Invariant checked: one refresh grant per rotation, no consumed refresh token ever presented
again, every answer carries a token the IdP accepts (and never one older than the IdP's
current token when the request arrived), and the stored record is the IdP's latest.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis

from sidecar.config import RefreshConfig, SessionConfig
from sidecar.errors import IdPUnavailable, RefreshUnavailable, TokenRequestError
from sidecar.metrics import Metrics
from sidecar.oidc import TokenResponse
from sidecar.redis.events import RedisEvents
from sidecar.redis.locks import RedisLocks
from sidecar.redis.store import RedisSessionStore
from sidecar.refresh import Refresher
from sidecar.refresh.protocol import RefreshTiming
from sidecar.session import Keyring, Session, SessionManager, SessionRecord
from tests.support.keys import TEST_KEY
from tests.support.stores import REDIS_URL

LIFETIME = 0.5  # seconds per access token: window = min(1 s, 0.25 s) = 0.25 s
SPREAD = 0.6  # task start delays are drawn from [0, SPREAD)
CONFIG = RefreshConfig(before_expiry="1s", idp_timeout="2s", lock_ttl="5s", wait_timeout="4s")
SEEDS = range(20)


@dataclass
class FakeIdP:
    """Token endpoint with refresh-token rotation and reuse detection (RFC 9700 §4.14.2)."""

    rng: random.Random
    failure_rate: float = 0.0
    generation: int = 0
    refresh_token: str = "rt-0"
    access_token: str = "at-0"
    issued: dict[str, tuple[int, float]] = field(default_factory=dict)  # at -> (gen, expiry)
    presented: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # refresh tokens answered with a 503
    granted: list[str] = field(default_factory=list)  # refresh tokens exchanged
    consumed: set[str] = field(default_factory=set)
    rotations: int = 0
    failures: int = 0
    reuse: bool = False
    in_flight: int = 0

    async def refresh(self, refresh_token: str) -> TokenResponse:
        self.in_flight += 1
        try:
            await asyncio.sleep(self.rng.uniform(0, 0.05))
            self.presented.append(refresh_token)
            if refresh_token in self.consumed or refresh_token != self.refresh_token:
                self.reuse = True  # a real IdP now revokes the whole grant
                raise TokenRequestError("invalid_grant")
            if self.rng.random() < self.failure_rate:
                self.failures += 1
                self.failed.append(refresh_token)
                raise IdPUnavailable("token endpoint answered 503")
            self.consumed.add(refresh_token)
            self.granted.append(refresh_token)
            self.generation += 1
            self.rotations += 1
            self.refresh_token = f"rt-{self.generation}"
            self.access_token = f"at-{self.generation}"
            self.issued[self.access_token] = (self.generation, time.time() + LIFETIME)
            return TokenResponse(self.access_token, LIFETIME, self.refresh_token, None, None, None)
        finally:
            self.in_flight -= 1

    async def validate_id_token(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no ID token is ever returned")

    def accepts(self, access_token: str, at: float) -> bool:
        found = self.issued.get(access_token)
        return found is not None and found[1] > at


@dataclass
class Process:
    refresher: Refresher
    sessions: SessionManager
    events: RedisEvents
    client: Any


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisSessionStore]:
    shared = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    yield shared
    await shared.close()


async def start_processes(
    k: int, store: RedisSessionStore, prefix: str, idp: FakeIdP, timing: RefreshTiming
) -> list[Process]:
    config = SessionConfig(
        store="redis", cookie_name="sidecar", cookie_secure=False, encryption_keys=[TEST_KEY]
    )
    procs = []
    for _ in range(k):
        client = redis.Redis.from_url(REDIS_URL)
        sessions = SessionManager(store, Keyring.from_base64([TEST_KEY]), config)
        events = RedisEvents(client, prefix)
        await events.start()
        refresher = Refresher(
            sessions,
            idp,  # type: ignore[arg-type]  # refresh() and validate_id_token() only
            RedisLocks(client, prefix),
            events,
            CONFIG,
            Metrics(),
            timing=timing,
        )
        procs.append(Process(refresher, sessions, events, client))
    return procs


async def stop_processes(procs: list[Process]) -> None:
    for proc in procs:
        await proc.events.close()
        await proc.client.aclose()


async def new_session(sessions: SessionManager, idp: FakeIdP) -> Session:
    """A session whose 0.5 s token has 0.2 s left: inside its 0.25 s window, still valid."""
    now = time.time()
    idp.issued[idp.access_token] = (0, now + 0.2)
    return await sessions.create(
        SessionRecord(
            issuer="https://idp.test",
            subject="alice",
            idp_session_id=None,
            claims={},
            access_token=idp.access_token,
            access_expires_at=now + 0.2,
            refresh_token=idp.refresh_token,
            refresh_expires_at=None,
            id_token=None,
            created_at=now - 0.3,
            refreshed_at=now - 0.3,
            expires_at=now + 3600,
        )
    )


@dataclass
class Outcome:
    started_gen: int
    token: str | None = None
    returned_at: float = 0.0
    error: BaseException | None = None


async def storm(
    seed: int,
    store: RedisSessionStore,
    prefix: str,
    failure_rate: float,
    timing: RefreshTiming | None = None,
) -> tuple[FakeIdP, list[Process], Session, list[Outcome]]:
    """Run one seeded interleaving; returns the IdP, processes, session and outcomes."""
    rng = random.Random(seed)
    idp = FakeIdP(random.Random(seed + 10_000), failure_rate=failure_rate)
    procs = await start_processes(rng.randint(1, 4), store, prefix, idp, timing or RefreshTiming())
    session = await new_session(procs[0].sessions, idp)
    outcomes: list[Outcome] = []

    async def request(proc: Process, delay: float, outcome: Outcome) -> None:
        await asyncio.sleep(delay)
        outcome.started_gen = idp.generation
        loaded = await proc.sessions.load(session.id)
        assert loaded is not None, "the session vanished"
        try:
            fresh = await proc.refresher.ensure_fresh(loaded)
        except (RefreshUnavailable, TokenRequestError, IdPUnavailable) as exc:
            outcome.error = exc
            return
        except Exception as exc:  # any other kind breaks the property: record it
            outcome.error = exc
            return
        outcome.returned_at = time.time()
        outcome.token = fresh.record.access_token

    tasks = []
    for _ in range(rng.randint(10, 60)):
        outcome = Outcome(started_gen=-1)
        outcomes.append(outcome)
        proc = rng.choice(procs)
        tasks.append(asyncio.create_task(request(proc, rng.uniform(0, SPREAD), outcome)))
    for task in tasks:
        if rng.random() < 0.2:  # the client disconnects at a random moment
            asyncio.get_running_loop().call_later(rng.uniform(0, SPREAD + 0.1), task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, asyncio.CancelledError):
            outcomes[i].error = result
        elif isinstance(result, BaseException):
            raise result
    # Shielded refreshes whose callers were all cancelled keep running: let them finish.
    refreshing = {t for t in asyncio.all_tasks() if t.get_name() == "session-refresh"}
    if refreshing:
        await asyncio.wait(refreshing, timeout=5)
    assert idp.in_flight == 0, "a refresh grant outlived its task"
    return idp, procs, session, outcomes


def check_idp(idp: FakeIdP) -> None:
    assert not idp.reuse, f"a consumed refresh token was presented again: {idp.presented}"
    assert len(idp.granted) == len(set(idp.granted)) == idp.rotations
    # Every presentation is a grant or an IdP 503; a token is presented again only after a 503.
    assert len(idp.presented) == idp.rotations + len(idp.failed)
    repeated = {rt for rt in idp.presented if idp.presented.count(rt) > 1}
    assert repeated <= set(idp.failed), repeated


async def check_stored(proc: Process, session: Session, idp: FakeIdP) -> None:
    final = await proc.sessions.load(session.id)
    assert final is not None
    assert final.record.refresh_token == idp.refresh_token
    assert final.record.access_token == idp.access_token
    # Each rotation and each recorded failure is one fenced write of the next version.
    assert final.record.version == 1 + idp.rotations + idp.failures


@pytest.mark.parametrize("seed", SEEDS)
async def test_storm_one_grant_per_rotation(
    seed: int, store: RedisSessionStore, redis_prefix: str
) -> None:
    """Random interleavings: one grant per rotation, no reuse, every answer a current token."""
    idp, procs, session, outcomes = await storm(seed, store, redis_prefix, 0.0)
    try:
        check_idp(idp)
        assert idp.rotations >= 1 and idp.failures == 0
        for outcome in outcomes:
            if isinstance(outcome.error, asyncio.CancelledError):
                continue
            assert outcome.error is None, repr(outcome.error)
            assert outcome.token is not None
            assert idp.accepts(outcome.token, outcome.returned_at), outcome
            # Never a token older than the IdP's current one when the request came in.
            assert idp.issued[outcome.token][0] >= outcome.started_gen, outcome
        await check_stored(procs[0], session, idp)
    finally:
        await stop_processes(procs)


@pytest.mark.parametrize("seed", SEEDS[:10])
async def test_storm_with_idp_failures(
    seed: int, store: RedisSessionStore, redis_prefix: str
) -> None:
    """IdP 503s at random: still no reuse; failures end in 503 or a still-valid token."""
    p = random.Random(seed).choice([0.2, 0.4, 0.6])
    fast_backoff = RefreshTiming(backoff_base=0.1)  # several attempts per run
    idp, procs, session, outcomes = await storm(seed, store, redis_prefix, p, fast_backoff)
    try:
        check_idp(idp)
        for outcome in outcomes:
            if isinstance(outcome.error, asyncio.CancelledError):
                continue
            if outcome.error is not None:
                assert isinstance(outcome.error, RefreshUnavailable), repr(outcome.error)
                continue
            assert outcome.token is not None
            assert idp.accepts(outcome.token, outcome.returned_at), outcome
        await check_stored(procs[0], session, idp)
    finally:
        await stop_processes(procs)
