"""The in-process session cache and the change feed that keeps it honest (issue 7).

A replica may reuse a session it opened moments ago only while it hears every change that
other replicas make: these tests prove that a logout or a refresh elsewhere reaches it within
milliseconds, and that a quiet or broken feed turns the cache off instead of serving stale
sessions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sidecar.config import SessionConfig
from sidecar.redis.store import RedisSessionStore
from sidecar.session import (
    MemorySessionStore,
    Session,
    SessionManager,
)
from sidecar.session.cache import SessionCache
from tests.support.keys import KEY_A
from tests.support.records import record
from tests.support.redis_fleet import RedisProcess, fleet
from tests.support.stores import REDIS_URL


def config(**changes: object) -> SessionConfig:
    return SessionConfig(encryption_keys=[KEY_A], **changes)  # type: ignore[arg-type]


class Counting(MemorySessionStore):
    """A memory store that counts reads, to tell cache hits from store reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, h: str) -> tuple[int, bytes] | None:
        self.reads += 1
        return await super().get(h)


async def until(check: Callable[[], bool], within: float) -> float:
    """Seconds until `check()` holds; fails after `within` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.002)
    return time.monotonic() - started


# --- the cache on its own -------------------------------------------------------------------


def cached_session(n: int, h: str | None = None) -> Session:
    return Session(f"id-{n}", h or f"h-{n}", record())


class TestSessionCache:
    def make(self, ttl: float = 1.0, size: int = 3) -> tuple[SessionCache, list[float]]:
        now = [100.0]
        cache = SessionCache(ttl, size, clock=lambda: now[0])
        cache.enabled = True
        return cache, now

    def test_hit_until_ttl(self) -> None:
        cache, now = self.make()
        session = cached_session(1)
        cache.put(session, cache.changes)
        assert cache.get("id-1") is session
        now[0] += 0.999
        assert cache.get("id-1") is session
        now[0] += 0.002
        assert cache.get("id-1") is None
        assert len(cache) == 0

    def test_disabled_cache_neither_serves_nor_keeps(self) -> None:
        cache, _ = self.make()
        cache.put(cached_session(1), cache.changes)
        cache.enabled = False
        assert cache.get("id-1") is None
        cache.put(cached_session(2), cache.changes)
        cache.enabled = True
        assert cache.get("id-2") is None

    def test_oldest_entry_leaves_first(self) -> None:
        cache, _ = self.make(size=3)
        for n in range(4):
            cache.put(cached_session(n), cache.changes)
        assert len(cache) == 3
        assert cache.get("id-0") is None
        assert all(cache.get(f"id-{n}") is not None for n in (1, 2, 3))

    def test_invalidate_by_hash(self) -> None:
        cache, _ = self.make()
        cache.put(cached_session(1), cache.changes)
        cache.invalidate("h-1")
        assert cache.get("id-1") is None

    def test_read_older_than_an_announced_change_is_not_kept(self) -> None:
        """A load that began before a change was announced may hold the old version."""
        cache, _ = self.make()
        seen = cache.changes  # the read starts
        cache.invalidate("h-1")  # another replica writes; its news arrives first
        cache.put(cached_session(1), seen)  # the read ends with what it saw before
        assert cache.get("id-1") is None


# --- the manager with the memory store ------------------------------------------------------


@pytest.fixture
async def following() -> AsyncIterator[Callable[[SessionManager], None]]:
    tasks: list[asyncio.Task[None]] = []

    def follow(manager: SessionManager) -> None:
        tasks.append(asyncio.create_task(manager.follow_changes()))

    yield follow
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_reuse_skips_the_store_and_follows_writes(following) -> None:  # type: ignore[no-untyped-def]
    store = Counting()
    manager = SessionManager(store, _keyring(), config())
    following(manager)
    await until(lambda: manager.caching, 1.0)
    session = await manager.create(record())
    assert (await manager.current(session.id)) is not None
    reads = store.reads
    for _ in range(20):
        assert (await manager.current(session.id)).record.version == 1  # type: ignore[union-attr]
    assert store.reads == reads, "a cached session was read from the store again"

    refreshed = session.record.evolve(access_token="new", version=2)
    assert await manager.save(session, refreshed)
    assert (await manager.current(session.id)).record.access_token == "new"  # type: ignore[union-attr]
    await manager.delete(session)
    assert await manager.current(session.id) is None


async def test_cache_off_without_the_feed_and_with_ttl_zero(following) -> None:  # type: ignore[no-untyped-def]
    store = Counting()
    not_followed = SessionManager(store, _keyring(), config())
    session = await not_followed.create(record())
    for _ in range(3):
        assert await not_followed.current(session.id) is not None
    assert store.reads == 3 and not not_followed.caching

    off = SessionManager(store, _keyring(), config(cache_ttl=0))
    following(off)
    await asyncio.sleep(0.05)
    assert not off.caching


async def test_expired_session_not_served_from_cache(following) -> None:  # type: ignore[no-untyped-def]
    now = [time.time()]
    store = MemorySessionStore(clock=lambda: now[0])
    manager = SessionManager(store, _keyring(), config(), clock=lambda: now[0])
    following(manager)
    await until(lambda: manager.caching, 1.0)
    session = await manager.create(record(expires_at=now[0] + 10))
    assert await manager.current(session.id) is not None
    now[0] += 11
    assert await manager.current(session.id) is None


# --- two replicas on real Redis -------------------------------------------------------------


def _keyring():  # type: ignore[no-untyped-def]
    from sidecar.session import Keyring

    return Keyring.from_base64([KEY_A])


async def test_change_elsewhere_reaches_the_other_replica_at_once(  # type: ignore[no-untyped-def]
    following, redis_prefix: str
) -> None:
    """Replica B logs the user out: replica A stops serving the session within milliseconds."""
    stores = [RedisSessionStore.from_url(REDIS_URL, redis_prefix) for _ in range(2)]
    a, b = (SessionManager(s, _keyring(), config(cache_ttl="60s")) for s in stores)
    try:
        following(a)
        following(b)
        await until(lambda: a.caching and b.caching, 3.0)
        session = await a.create(record())
        assert await a.current(session.id) is not None  # now cached in A for up to 60 s

        on_b = await b.load(session.id)
        assert on_b is not None
        assert await b.save(on_b, on_b.record.evolve(access_token="rotated", version=2))
        refreshed_after = await until(_sees(a, session.id, "rotated"), 1.0)

        await b.delete(on_b.with_record(on_b.record.evolve(version=2)))
        deleted_after = await until(_gone(a, session.id), 1.0)
        print(
            f"[cache] refresh seen after {refreshed_after * 1000:.1f} ms, "
            f"logout after {deleted_after * 1000:.1f} ms"
        )
        assert refreshed_after < 0.5 and deleted_after < 0.5
    finally:
        for store in stores:
            await store.close()


def _sees(manager: SessionManager, session_id: str, token: str) -> Callable[[], bool]:
    """Whether the cache no longer holds an older record (gone, or the new one)."""

    def check() -> bool:
        found = manager._cache.get(session_id)
        return found is None or found.record.access_token == token

    return check


def _gone(manager: SessionManager, session_id: str) -> Callable[[], bool]:
    return lambda: manager._cache.get(session_id) is None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    with fleet(tmp_path) as f:
        yield f.start("feed", [])


async def test_silent_feed_turns_the_cache_off(following, own_redis: RedisProcess) -> None:  # type: ignore[no-untyped-def]
    """A frozen Redis: no heartbeat comes back, so the cache goes off; it returns after."""
    store = RedisSessionStore.from_url(f"redis://{own_redis.address}/0", "feed")
    reports: list[bool] = []  # what the sidecar_session_cache_live gauge is told
    manager = SessionManager(store, _keyring(), config(cache_ttl="60s"), on_caching=reports.append)
    try:
        following(manager)
        await until(lambda: manager.caching, 3.0)
        session = await manager.create(record())
        assert await manager.current(session.id) is not None

        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            off_after = await until(lambda: not manager.caching, 3.0)
            # From now on `current` goes to the (frozen) store: it fails closed.
            assert manager._cache.get(session.id) is None
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        back_after = await until(lambda: manager.caching, 10.0)
        print(f"[cache] off {off_after:.2f} s after Redis froze, back {back_after:.2f} s after")
        assert (await manager.current(session.id)) is not None
        changes = [r for i, r in enumerate(reports) if i == 0 or reports[i - 1] != r]
        assert changes == [True, False, True]
    finally:
        await store.close()


# --- requests that miss the cache together share one read ----------------------------------


class Gated(Counting):
    """Counts reads and holds each one until `open` is set, so reads overlap on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    async def get(self, h: str) -> tuple[int, bytes] | None:
        self.reads += 1
        await self.open.wait()
        return await MemorySessionStore.get(self, h)


async def test_concurrent_misses_share_one_read() -> None:
    """50 requests on a session nobody has in memory: one store read, all get the session."""
    store = Gated()
    manager = SessionManager(store, _keyring(), config())
    session = await manager.create(record())
    waiting = [asyncio.create_task(manager.current(session.id)) for _ in range(50)]
    await asyncio.sleep(0.01)
    store.open.set()
    found = await asyncio.gather(*waiting)
    assert store.reads == 1
    assert {s.h for s in found if s is not None} == {session.h} and None not in found
    assert not manager._reading, "a finished read is forgotten"


async def test_a_read_begun_before_a_change_is_not_joined() -> None:
    """A request that arrives after a change was announced must not get the older record."""
    store = Gated()
    manager = SessionManager(store, _keyring(), config())
    session = await manager.create(record())
    early = asyncio.create_task(manager.current(session.id))
    await asyncio.sleep(0.01)
    manager._changed(session.h)  # the feed: another replica rewrote the record
    late = asyncio.create_task(manager.current(session.id))
    await asyncio.sleep(0.01)
    assert store.reads == 2, "the request after the change started its own read"
    store.open.set()
    await asyncio.gather(early, late)


async def test_a_caller_going_away_does_not_cancel_the_shared_read() -> None:
    store = Gated()
    manager = SessionManager(store, _keyring(), config())
    session = await manager.create(record())
    leaver = asyncio.create_task(manager.current(session.id))
    stayer = asyncio.create_task(manager.current(session.id))
    await asyncio.sleep(0.01)
    leaver.cancel()  # its client hung up
    await asyncio.sleep(0.01)
    store.open.set()
    assert (await stayer) is not None
    assert leaver.cancelled() and store.reads == 1


async def test_concurrent_misses_share_one_redis_read(redis_prefix: str) -> None:
    """The same on real Redis: a burst on an uncached session costs one GET, not one each."""

    class CountingRedis(RedisSessionStore):
        reads = 0

        async def get(self, h: str) -> tuple[int, bytes] | None:
            CountingRedis.reads += 1
            return await super().get(h)

    store = CountingRedis.from_url(REDIS_URL, redis_prefix)
    try:
        manager = SessionManager(store, _keyring(), config())
        session = await manager.create(record())
        found = await asyncio.gather(*(manager.current(session.id) for _ in range(100)))
        assert None not in found
        assert CountingRedis.reads == 1
    finally:
        await store.close()
