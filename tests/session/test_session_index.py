"""The user and IdP-session indexes and the session metadata behind central logout and the
admin API (docs/sessions.md, "Central logout"): every way a session ends takes it out of the
indexes, and an index read never returns a dead session, on the memory store and on Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import RedisConfig, SessionConfig
from sidecar.redis.keys import Keys
from sidecar.redis.store import RedisSessionStore
from sidecar.session import Keyring, MemorySessionStore, Session, SessionManager
from sidecar.session.manager import idp_session_ref, user_ref
from sidecar.session.store import SessionStore
from tests.support.keys import KEY_A
from tests.support.records import record
from tests.support.redis_fleet import Fleet, start_cluster
from tests.support.stores import REDIS_URL

ISSUER = "https://idp.example"


def manager(
    store: SessionStore, *, clock: Callable[[], float] = time.time, **config: object
) -> SessionManager:
    settings_ = SessionConfig.model_validate({"encryption_keys": [KEY_A], **config})
    return SessionManager(store, Keyring.from_base64([KEY_A]), settings_, clock=clock)


async def test_metadata_follows_the_record(store: SessionStore) -> None:
    sessions = manager(store)
    created = await sessions.create(record(idp_session_id="sid-7"))
    (info,) = await sessions.sessions_of_user(ISSUER, "alice")
    assert (info.id, info.iss, info.sub, info.sid) == (created.h, ISSUER, "alice", "sid-7")
    assert info.created_at == created.record.created_at
    assert info.expires_at == created.record.expires_at
    later = created.record.evolve(version=2, refreshed_at=created.record.refreshed_at + 50)
    assert await sessions.save(created, later)
    (info,) = await sessions.sessions_of_idp_session(ISSUER, "sid-7")
    assert info.last_refresh_at == created.record.refreshed_at + 50
    assert await sessions.describe([created.h, "B" * 43]) == [info]


async def test_ending_many_at_once_removes_records_and_index_entries(store: SessionStore) -> None:
    sessions = manager(store)
    alice = [await sessions.create(record(idp_session_id=f"sid-{i}")) for i in range(5)]
    bob = await sessions.create(record(subject="bob", idp_session_id="sid-bob"))
    found = await sessions.sessions_of_user(ISSUER, "alice")
    assert {info.id for info in found} == {s.h for s in alice}
    assert await sessions.end(found, listed_under=user_ref(ISSUER, "alice")) == 5
    assert await sessions.end(found) == 0  # already gone
    for s in alice:
        assert await sessions.load(s.id) is None
        assert await sessions.sessions_of_idp_session(ISSUER, s.record.idp_session_id or "") == []
    assert await sessions.sessions_of_user(ISSUER, "alice") == []
    assert await sessions.load(bob.id) is not None


async def test_a_session_that_expired_on_its_own_is_trimmed_when_read(redis_prefix: str) -> None:
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        sessions = manager(store, idle_timeout="1s")
        await sessions.create(record())  # stays
        short = await sessions.create(record(expires_at=time.time() + 0.2))
        keys = Keys(redis_prefix)
        user_key = keys.index(user_ref(ISSUER, "alice"))
        assert await client.zcard(user_key) == 2
        meta_ttl, record_ttl = (
            await client.pttl(keys.meta(short.h)),
            await client.pttl(keys.record(short.h)),
        )
        assert abs(meta_ttl - record_ttl) <= 5
        await asyncio.sleep(0.3)
        assert len(await sessions.sessions_of_user(ISSUER, "alice")) == 1
        assert await client.zcard(user_key) == 1  # the dead entry went with the read
        assert not await client.exists(keys.meta(short.h))
    finally:
        await client.aclose()
        await store.close()


async def test_idle_timeout_touches_the_metadata_too(redis_prefix: str) -> None:
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await store.create("h" * 43, 1, b"sealed", 0.5, b"meta")
        await store.touch("h" * 43, 30)
        keys = Keys(redis_prefix)
        assert await client.pttl(keys.meta("h" * 43)) > 29_000
        assert await client.pttl(keys.record("h" * 43)) > 29_000
    finally:
        await client.aclose()
        await store.close()


async def test_a_record_without_metadata_is_listed_by_id_and_can_be_ended(
    redis_prefix: str,
) -> None:
    """Sessions stored before metadata was kept still show up, and end, by their id."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        sessions = manager(store)
        created = await sessions.create(record())
        await client.delete(Keys(redis_prefix).meta(created.h))
        (info,) = await sessions.sessions_of_user(ISSUER, "alice")
        assert (info.id, info.sub, info.created_at) == (created.h, None, None)
        assert await sessions.end([info], listed_under=user_ref(ISSUER, "alice")) == 1
        assert await sessions.load(created.id) is None
        assert not await client.exists(Keys(redis_prefix).index(user_ref(ISSUER, "alice")))
    finally:
        await client.aclose()
        await store.close()


async def test_a_logout_token_id_is_remembered_once(store: SessionStore) -> None:
    sessions = manager(store)
    until = time.time() + 60
    assert await sessions.remember_logout_token(ISSUER, "jti-1", until)
    assert not await sessions.remember_logout_token(ISSUER, "jti-1", until)
    assert await sessions.remember_logout_token("https://other.example", "jti-1", until)


async def test_over_cap_names_the_oldest_other_sessions(store: SessionStore) -> None:
    sessions = manager(store, max_per_user=2)
    now = time.time()
    made = [await sessions.create(record(created_at=now - 100 + i)) for i in range(4)]
    newest = made[-1]
    assert {info.id for info in await sessions.over_cap(newest)} == {made[0].h, made[1].h}
    assert await manager(store).over_cap(newest) == []  # 0: unlimited


async def test_a_watcher_hears_that_its_session_ended_on_another_replica(
    redis_prefix: str,
) -> None:
    """`ending(h)` is set when another process deletes the session (through the change
    feed), not when it is refreshed."""
    here_store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    there_store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    here, there = manager(here_store), manager(there_store)
    feed = asyncio.create_task(here.follow_changes())
    try:
        created = await there.create(record())
        with here.ending(created.h) as ended:
            await asyncio.sleep(1.2)  # the feed is proven within a few heartbeats
            assert await there.save(created, created.record.evolve(version=2))
            await asyncio.sleep(0.2)
            assert not ended.is_set()
            found = await there.sessions_of_user(ISSUER, "alice")
            assert await there.end(found) == 1
            await asyncio.wait_for(ended.wait(), 1.0)
    finally:
        feed.cancel()
        await asyncio.gather(feed, return_exceptions=True)
        await here_store.close()
        await there_store.close()


async def test_a_watcher_hears_a_local_delete_without_a_feed() -> None:
    sessions = manager(MemorySessionStore())
    created = await sessions.create(record())
    with sessions.ending(created.h) as ended:
        await sessions.delete(created)
        assert ended.is_set()


# --- the property: index reads only ever return live sessions ---------------------------------


@dataclass
class _Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


_USERS = ("alice", "bob")
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("login"), st.sampled_from(_USERS), st.sampled_from(["long", "short"])),
        st.tuples(st.just("refresh"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("logout"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("invalid_grant"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("expire"), st.just(0), st.just("")),
        st.tuples(st.just("idle"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("backchannel_sid"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("backchannel_sub"), st.just(0), st.sampled_from(_USERS)),
        st.tuples(st.just("admin_end"), st.just(0), st.sampled_from(_USERS)),
        st.tuples(st.just("admin_end_one"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("cap_login"), st.sampled_from(_USERS), st.just("")),
    ),
    max_size=25,
)


async def _run(
    ops: list[tuple[str, object, str]],
    store: SessionStore,
    clock: _Clock,
    raw: Callable[[str], Awaitable[set[str]]] | None = None,
) -> None:
    """Apply `ops`, keeping a model of which sessions are live; after each, every index read
    matches the model exactly and every hash it returns opens a live record. `raw` reads an
    index as stored, for sequences where nothing expires on its own."""
    sessions = manager(store, clock=clock)
    capped = manager(store, clock=clock, max_per_user=2)
    made: list[Session] = []
    live: dict[str, Session] = {}
    touched: dict[str, float] = {}  # idle sessions: when their short store TTL runs out
    serial = 0

    def pick(i: object) -> Session | None:
        return made[i % len(made)] if made and isinstance(i, int) else None

    async def new(user: str, lifetime: float, via: SessionManager) -> Session:
        nonlocal serial
        serial += 1
        rec = record(
            subject=user,
            idp_session_id=f"sid-{serial}",
            created_at=clock.now + serial * 1e-3,
            expires_at=clock.now + lifetime,
        )
        session = await via.create(rec)
        made.append(session)
        live[session.h] = session
        return session

    for op, arg, extra in ops:
        target = pick(arg)
        if op == "login":
            await new(str(arg), 3600 if extra == "long" else 5, sessions)
        elif op == "cap_login":
            session = await new(str(arg), 3600, capped)
            ended = await capped.over_cap(session)
            await capped.end(ended)
            for info in ended:
                live.pop(info.id, None)
        elif op == "refresh" and target is not None and target.h in live:
            current = live[target.h]
            after = current.record.evolve(
                version=current.record.version + 1, refreshed_at=clock.now
            )
            if await sessions.save(current, after):
                live[target.h] = current.with_record(after)
        elif op in ("logout", "invalid_grant") and target is not None:
            await sessions.delete(live.get(target.h, target))  # refresh's invalid_grant path
            live.pop(target.h, None)
        elif op == "idle" and target is not None and target.h in live:
            await store.touch(target.h, 1.0)  # an idle timeout about to run out
            touched[target.h] = clock.now + 1.0
        elif op == "expire":
            clock.now += 10
            if isinstance(store, RedisSessionStore):
                await asyncio.sleep(0)  # Redis expires on its own clock: see the TTLs below
            for h in [h for h, s in live.items() if s.record.expires_at <= clock.now]:
                del live[h]
            for h in [h for h, until in touched.items() if until <= clock.now]:
                live.pop(h, None)
        elif op == "backchannel_sid" and target is not None:
            sid = target.record.idp_session_id or ""
            found = await sessions.sessions_of_idp_session(ISSUER, sid)
            await sessions.end(found, listed_under=idp_session_ref(ISSUER, sid))
            for info in found:
                live.pop(info.id, None)
        elif op in ("backchannel_sub", "admin_end"):
            found = await sessions.sessions_of_user(ISSUER, extra)
            await sessions.end(found, listed_under=user_ref(ISSUER, extra))
            for info in found:
                live.pop(info.id, None)
        elif op == "admin_end_one" and target is not None:
            await sessions.end(await sessions.describe([target.h]))
            live.pop(target.h, None)

        if raw is not None:  # before any read trims: every ending path took its entries out
            for user in _USERS:
                expected = {h for h, s in live.items() if s.record.subject == user}
                assert await raw(user_ref(ISSUER, user)) == expected, (op, "raw", user)
        for user in _USERS:
            listed = await sessions.sessions_of_user(ISSUER, user)
            expected = {h for h, s in live.items() if s.record.subject == user}
            assert {info.id for info in listed} == expected, (op, user)
            for info in listed:
                assert await store.get(info.id) is not None
        for session in made:
            sid = session.record.idp_session_id or ""
            listed = await sessions.sessions_of_idp_session(ISSUER, sid)
            assert {info.id for info in listed} == ({session.h} & live.keys()), (op, sid)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_OPS)
def test_index_reads_only_ever_return_live_sessions(ops: list[tuple[str, object, str]]) -> None:
    """The memory store on a fake clock: expiry, idle timeouts, logouts, invalid_grant,
    back-channel and admin ends and the cap, in any order."""
    clock = _Clock()
    asyncio.run(_run(ops, MemorySessionStore(clock=clock), clock))


@pytest.mark.parametrize("seed", range(3))
async def test_index_reads_only_ever_return_live_sessions_on_redis(
    redis_prefix: str, seed: int
) -> None:
    """The same sequences on Redis, without the expiry step (Redis keeps its own clock):
    every way to end a session that a request or an operator takes."""
    import random

    rng = random.Random(seed)
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    ops: list[tuple[str, object, str]] = []
    for _ in range(40):
        op = rng.choice(
            [
                *("login", "refresh", "logout", "invalid_grant", "backchannel_sid"),
                *("backchannel_sub", "admin_end", "admin_end_one", "cap_login"),
            ]
        )
        if op in ("login", "cap_login"):
            ops.append((op, rng.choice(_USERS), "long"))
        elif op in ("backchannel_sub", "admin_end"):
            ops.append((op, 0, rng.choice(_USERS)))
        else:
            ops.append((op, rng.randrange(20), ""))
    client = redis.Redis.from_url(REDIS_URL)

    async def raw(ref: str) -> set[str]:
        return {m.decode() for m in await client.zrange(Keys(redis_prefix).index(ref), 0, -1)}

    try:
        await _run(ops, store, _Clock(), raw)
    finally:
        await client.aclose()
        await store.close()


async def test_central_logout_on_a_redis_cluster(redis_fleet: Fleet) -> None:
    """Indexes, metadata and records live in different slots and nodes: listing, ending in
    bulk and index cleanup work there too, one command per key, pipelined per node."""
    cluster = start_cluster(redis_fleet)
    config = RedisConfig(
        url="redis://127.0.0.1:1/0", cluster={"nodes": cluster.addresses}, key_prefix="c"
    )
    store = RedisSessionStore.from_config(config)
    try:
        sessions = manager(store)
        made = [await sessions.create(record(idp_session_id=f"sid-{i}")) for i in range(60)]
        bob = await sessions.create(record(subject="bob", idp_session_id="sid-bob"))
        found = await sessions.sessions_of_user(ISSUER, "alice")
        assert {info.id for info in found} == {s.h for s in made}
        assert len({cluster.node_of_key(Keys("c").record(s.h)).port for s in made}) == 3
        assert await sessions.end(found, listed_under=user_ref(ISSUER, "alice")) == 60
        assert await sessions.sessions_of_user(ISSUER, "alice") == []
        assert await sessions.sessions_of_idp_session(ISSUER, "sid-7") == []
        for s in made[:5]:
            assert await sessions.load(s.id) is None
        assert await sessions.load(bob.id) is not None
        for node in cluster.nodes:
            with node.client() as c:
                left = [k for k in c.scan_iter("c:*") if b"bob" not in k]
                assert all(
                    not k.startswith((b"c:s:", b"c:m:")) or k.endswith(bob.h.encode() + b"}")
                    for k in left
                ), left
        assert await sessions.remember_logout_token(ISSUER, "jti", time.time() + 60)
        assert not await sessions.remember_logout_token(ISSUER, "jti", time.time() + 60)
    finally:
        await store.close()
