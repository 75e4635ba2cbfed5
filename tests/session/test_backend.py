"""The backend `session.store` picks (sidecar/backend.py) and the Redis package's boundaries:
one key layout (sidecar/redis/keys.py), and redis-py imported nowhere else."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as redis
from redis.crc import key_slot

from sidecar.backend import open_backend
from sidecar.redis.events import RedisEvents
from sidecar.redis.keys import Keys
from sidecar.redis.locks import RedisLocks
from sidecar.redis.store import RedisSessionStore
from sidecar.session import MemorySessionStore
from sidecar.session.memory import MemoryEvents, MemoryLocks
from sidecar.session.store import REFRESHED
from tests.support.configs import make_config
from tests.support.repo import REPO_ROOT
from tests.support.stores import REDIS_URL, store_sections

SIDECAR = REPO_ROOT / "sidecar"
REDIS_PACKAGE = SIDECAR / "redis"


# --- open_backend ----------------------------------------------------------------------------


async def test_memory_config_gives_the_in_process_backend() -> None:
    """`session.store: memory`: store, locks and events of this process; nothing to probe."""
    backend = open_backend(make_config(**store_sections("memory", "unused")))
    assert isinstance(backend.store, MemorySessionStore)
    assert isinstance(backend.locks, MemoryLocks)
    assert isinstance(backend.events, MemoryEvents)
    assert backend.readiness is None
    await backend.store.close()


async def test_redis_config_gives_the_redis_backend(redis_prefix: str) -> None:
    """`session.store: redis`: the Redis store under the configured prefix, its locks and
    events, and /readyz follows it as "redis"."""
    backend = open_backend(make_config(**store_sections("redis", redis_prefix)))
    try:
        assert isinstance(backend.store, RedisSessionStore)
        assert backend.store.prefix == redis_prefix
        assert isinstance(backend.locks, RedisLocks)
        assert isinstance(backend.events, RedisEvents)
        assert backend.readiness == "redis"
        await backend.store.ping()
    finally:
        await backend.store.close()


async def test_a_given_store_decides_the_backend(redis_prefix: str) -> None:
    """The `store` override (tests share one store between apps) wins over the config, and
    brings the locks and events that go with it."""
    memory_config = make_config(**store_sections("memory", "unused"))
    store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    try:
        backend = open_backend(memory_config, store)
        assert backend.store is store
        assert isinstance(backend.locks, RedisLocks)
        assert isinstance(backend.events, RedisEvents)
    finally:
        await store.close()
    shared = MemorySessionStore()
    redis_config = make_config(**store_sections("redis", redis_prefix))
    assert open_backend(redis_config, shared).store is shared


async def test_the_redis_backend_writes_under_the_keys_keys_py_names(redis_prefix: str) -> None:
    """A record and a lock taken through the backend sit under `Keys`' names, and events on
    `Keys.events` reach a waiter: the store, the locks and the events share one layout."""
    backend = open_backend(make_config(**store_sections("redis", redis_prefix)))
    keys = Keys(redis_prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await backend.store.create("h1", 1, b"sealed", 30, b"meta")
        assert await client.get(keys.record("h1")) == b"1:sealed"
        assert await client.get(keys.meta("h1")) == b"meta"

        owner = await backend.locks.acquire("h1", 5)
        assert owner is not None
        assert await client.get(keys.lock("h1")) == owner.encode()
        assert 0 < await client.pttl(keys.lock("h1")) <= 5000
        await backend.locks.release("h1", owner)
        assert not await client.exists(keys.lock("h1"))

        await backend.events.start()
        async with backend.events.waiting("h1") as woken:
            assert await client.publish(keys.events("h1"), REFRESHED) == 1
            await asyncio.wait_for(woken.wait(), 5)
    finally:
        await backend.events.close()
        await backend.store.close()
        await client.aclose()


def test_every_key_of_a_session_is_in_its_slot() -> None:
    """The one-slot rule: record, attempt mark, lock and event channel share a Cluster slot,
    whatever the prefix; the change feed and the indexes are named apart."""
    for prefix, h in (("sidecar", "abc"), ("test-1", "Zm9vYmFy-_")):
        keys = Keys(prefix)
        names = [keys.record(h), keys.attempt(h), keys.meta(h), keys.lock(h), keys.events(h)]
        assert len(set(names)) == 5
        assert {key_slot(name.encode()) for name in names} == {key_slot(h.encode())}
        assert keys.session_of_events(keys.events(h).encode()) == h
        assert keys.session_of_events(keys.lock(h).encode()) is None
        assert keys.session_of_events(Keys("other").events(h).encode()) is None
        others = [keys.changes, keys.login(h), keys.logins("b"), keys.index(f"sub:{h}")]
        others += [keys.index(f"sid:{h}"), keys.logout_token(h)]
        assert len(set(others + names)) == len(others) + len(names)


# --- boundaries ------------------------------------------------------------------------------


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SIDECAR.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(tree: ast.Module) -> set[str]:
    """Absolute module names `tree` imports anywhere (top level, functions, TYPE_CHECKING)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _importers(package: str) -> set[Path]:
    return {
        path
        for path, tree in _modules()
        if any(name == package or name.startswith(package + ".") for name in _imported(tree))
    }


def test_only_the_redis_package_imports_redis_py() -> None:
    """redis-py stays inside sidecar/redis/: every other module sees only `StoreUnavailable`."""
    importers = _importers("redis")
    assert REDIS_PACKAGE / "connect.py" in importers  # the walk does see them
    outside = sorted(
        str(p.relative_to(REPO_ROOT)) for p in importers if REDIS_PACKAGE not in p.parents
    )
    assert outside == []


def test_only_the_backend_reaches_into_the_redis_package() -> None:
    """Outside sidecar/redis/, only sidecar/backend.py names the Redis backend's classes."""
    importers = _importers("sidecar.redis")
    outside = {p for p in importers if REDIS_PACKAGE not in p.parents}
    assert outside == {SIDECAR / "backend.py"}


_KEY_PARTS = (":s:", ":a:", ":lock:", ":ev:", ":changed", ":login:", ":logins:", ":sub:", ":sid:")


def test_only_keys_py_spells_a_key() -> None:
    """No module but sidecar/redis/keys.py builds a Redis key or channel name."""
    spelled = set()
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(
                    part.value
                    for part in node.values
                    if isinstance(part, ast.Constant) and isinstance(part.value, str)
                )
                if any(part in text for part in _KEY_PARTS):
                    spelled.add(path)
    assert spelled == {REDIS_PACKAGE / "keys.py"}
