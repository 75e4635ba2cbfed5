"""Pending logins are bounded: per browser in both stores, by expiry and a cap in memory."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as redis

from sidecar.config import SessionConfig
from sidecar.redis.store import RedisSessionStore
from sidecar.session import (
    Keyring,
    MemorySessionStore,
    PendingLogin,
    SessionManager,
)
from sidecar.session.record import session_hash
from sidecar.session.store import SessionStore
from tests.support.keys import TEST_KEY
from tests.support.stores import REDIS_URL


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_browser_keeps_its_newest_logins(store: SessionStore) -> None:
    """Beyond `keep` pending logins of one browser the oldest go; other browsers keep theirs."""
    dropped = [
        await store.put_login(f"k{n}", b"sealed-%d" % n, 600, "browser", 5) for n in range(7)
    ]
    assert dropped == [0, 0, 0, 0, 0, 1, 1]
    assert await store.put_login("other", b"o", 600, "another-browser", 5) == 0
    assert await store.take_login("k0") is None
    assert await store.take_login("k1") is None
    assert [await store.take_login(f"k{n}") for n in range(2, 7)] == [
        b"sealed-%d" % n for n in range(2, 7)
    ]
    assert await store.take_login("k6") is None  # still one use
    assert await store.take_login("other") == b"o"


async def test_cap_counts_logins_started(store: SessionStore) -> None:
    """A used login keeps its place until it expires or is pushed out (both stores alike)."""
    for key in ("a", "b", "c"):
        await store.put_login(key, key.encode(), 600, "browser", 3)
    assert await store.take_login("c") == b"c"
    assert await store.put_login("d", b"d", 600, "browser", 3) == 1
    assert await store.take_login("a") is None
    assert await store.put_login("e", b"e", 600, "browser", 3) == 1  # pushes out "b"
    assert [await store.take_login(k) for k in "bcde"] == [None, None, b"d", b"e"]
    assert await store.put_login("f", b"f", 600, "browser", 1) == 3  # a cap of 1: c, d, e
    assert await store.take_login("f") == b"f"


async def test_manager_drops_the_oldest_state() -> None:
    """Through the manager: the state of a dropped login no longer opens anything."""
    config = SessionConfig(store="memory", encryption_keys=[TEST_KEY])
    sessions = SessionManager(MemorySessionStore(), Keyring.from_base64([TEST_KEY]), config)
    logins = {
        f"state-{n}": PendingLogin("verifier", "nonce", f"/{n}", "binding", time.time())
        for n in range(4)
    }
    dropped = [await sessions.put_login(state, login, keep=3) for state, login in logins.items()]
    assert dropped == [0, 0, 0, 1]
    assert await sessions.take_login("state-0") is None
    assert await sessions.take_login("state-3") == logins["state-3"]


async def test_memory_store_evicts_expired_logins() -> None:
    """Expired pending logins go when the next is stored, not only when taken."""
    clock = Clock()
    store = MemorySessionStore(clock=clock)
    for n in range(100):
        await store.put_login(f"old{n}", b"x", 600, f"browser{n}", 5)
    assert store.pending_logins == 100
    clock.now += 300
    await store.put_login("middle", b"m", 600, "browser0", 5)
    assert store.pending_logins == 101
    clock.now += 300  # the first hundred are 600 s old now
    await store.put_login("new", b"n", 600, "browser1", 5)
    assert store.pending_logins == 2
    assert await store.take_login("old0") is None
    assert await store.take_login("middle") == b"m"
    clock.now += 600
    assert await store.take_login("new") is None  # expired, even if not yet evicted
    assert store.pending_logins == 1  # "middle", used: listed until it expires
    await store.put_login("last", b"l", 600, "browser0", 5)
    assert store.pending_logins == 1


async def test_memory_store_caps_the_total() -> None:
    """A flood of distinct browsers (many addresses) cannot grow memory beyond `max_logins`."""
    store = MemorySessionStore(max_logins=1000)
    for n in range(10_000):
        await store.put_login(f"k{n}", b"x" * 300, 600, f"browser{n}", 5)
    assert store.pending_logins == 1000
    assert len(store._browsers) == 1000  # each browser's list goes with its last login
    assert await store.take_login("k8999") is None  # the oldest went first
    assert await store.take_login("k9000") == b"x" * 300
    await store.put_login("k10000", b"x", 600, "browser10000", 5)  # pushes out used k9000
    assert store.pending_logins == 1000
    assert "browser9000" not in store._browsers


async def test_redis_lists_each_browser_and_trims(redis_prefix: str) -> None:
    """One sorted set per browser, at most `keep` members, living as long as a pending login;
    the dropped logins' keys are gone from Redis, not just from the list."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for n in range(8):
            await store.put_login(f"k{n}", b"sealed", 600, "b1", 3)
        listed = f"{redis_prefix}:logins:{{b1}}"
        assert await client.zrange(listed, 0, -1) == [b"k5", b"k6", b"k7"]
        assert 599_000 < await client.pttl(listed) <= 600_000
        logins = sorted([k async for k in client.scan_iter(match=f"{redis_prefix}:login:*")])
        assert logins == [f"{redis_prefix}:login:k{n}".encode() for n in (5, 6, 7)]
        assert await store.take_login("k6") == b"sealed"
        assert await store.take_login("k6") is None  # GETDEL: one use
        # Taken logins stay listed until they are trimmed or expire: the cap counts starts.
        assert await store.put_login("k8", b"sealed", 600, "b1", 3) == 1
        assert await client.zrange(listed, 0, -1) == [b"k6", b"k7", b"k8"]
        assert await store.take_login("k5") is None
    finally:
        await client.aclose()
        await store.close()


async def test_redis_forgets_expired_members(redis_prefix: str) -> None:
    """Members older than the login TTL leave the list when the next login is stored."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await store.put_login("short", b"s", 0.05, "b", 5)
        await asyncio.sleep(0.1)
        await store.put_login("next", b"n", 0.5, "b", 5)
        assert await client.zrange(f"{redis_prefix}:logins:{{b}}", 0, -1) == [b"next"]
        await asyncio.sleep(0.6)
        assert not [k async for k in client.scan_iter(match=f"{redis_prefix}:*")]
    finally:
        await client.aclose()
        await store.close()


async def test_redis_list_key_holds_no_binding(redis_prefix: str) -> None:
    """The manager lists a browser under a hash of its binding hash, not the binding itself."""
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    config = SessionConfig(store="redis", encryption_keys=[TEST_KEY])
    sessions = SessionManager(store, Keyring.from_base64([TEST_KEY]), config)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        binding = "ab" * 32
        await sessions.put_login("state", PendingLogin("v", "n", "/", binding, time.time()), keep=5)
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:logins:*")]
        assert keys == [f"{redis_prefix}:logins:{{{session_hash(binding)}}}".encode()]
    finally:
        await client.aclose()
        await store.close()
