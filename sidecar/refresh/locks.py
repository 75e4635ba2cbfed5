"""Per-session refresh locks (DESIGN §5 step 3): one owner token, compare-and-delete/extend.

Never one global lock: each key names one session, so different users refresh in parallel.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Final, Protocol

from sidecar.redis.connect import RedisClient
from sidecar.redis.store import milliseconds, translated_errors

__all__ = ["Locks", "MemoryLocks", "RedisLocks"]

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Locks(Protocol):
    async def acquire(self, h: str, ttl: float) -> str | None:
        """Take the lock of session `h` for `ttl` seconds; the owner token, or None if held."""

    async def release(self, h: str, owner: str) -> None:
        """Give the lock back, only if `owner` still holds it."""

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        """Push the expiry to `ttl` from now, only if `owner` still holds it."""

    async def held(self, h: str) -> bool:
        """Whether anyone holds the lock of `h` now."""


class RedisLocks:
    """`SET p:lock:{h} <owner> NX PX ttl`, shared by every replica.

    Each script touches the lock key only, so it runs on a Cluster too, on the node that
    holds the session's slot.
    """

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._redis = client
        self._p = prefix
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)

    def _key(self, h: str) -> str:
        return f"{self._p}:lock:{{{h}}}"  # same hash tag as the record: one Cluster slot

    async def acquire(self, h: str, ttl: float) -> str | None:
        owner = secrets.token_urlsafe(16)
        async with translated_errors():
            taken = await self._redis.set(self._key(h), owner, nx=True, px=milliseconds(ttl))
        return owner if taken else None

    async def release(self, h: str, owner: str) -> None:
        async with translated_errors():
            await self._release(keys=[self._key(h)], args=[owner])

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        async with translated_errors():
            return bool(await self._extend(keys=[self._key(h)], args=[owner, milliseconds(ttl)]))

    async def held(self, h: str) -> bool:
        async with translated_errors():
            return bool(await self._redis.exists(self._key(h)))


class MemoryLocks:
    """The same semantics inside one process, for the memory store."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._owners: dict[str, tuple[str, float]] = {}

    def _current(self, h: str) -> str | None:
        entry = self._owners.get(h)
        if entry is None or entry[1] <= self._clock():
            self._owners.pop(h, None)
            return None
        return entry[0]

    async def acquire(self, h: str, ttl: float) -> str | None:
        if self._current(h) is not None:
            return None
        owner = secrets.token_urlsafe(16)
        self._owners[h] = (owner, self._clock() + ttl)
        return owner

    async def release(self, h: str, owner: str) -> None:
        if self._current(h) == owner:
            del self._owners[h]

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        if self._current(h) != owner:
            return False
        self._owners[h] = (owner, self._clock() + ttl)
        return True

    async def held(self, h: str) -> bool:
        await asyncio.sleep(0)
        return self._current(h) is not None
