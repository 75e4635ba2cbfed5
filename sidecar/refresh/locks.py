"""Per-session refresh locks (docs/refresh.md, "How", step 2): one owner token,
compare-and-delete and compare-and-extend.

The protocol and the in-process twin of the memory store; the Redis one, shared by every
replica, is `sidecar.redis.locks.RedisLocks`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Locks", "MemoryLocks"]


class Locks(Protocol):
    async def acquire(self, h: str, ttl: float) -> str | None:
        """Take the lock of session `h` for `ttl` seconds; the owner token, or None if held."""

    async def release(self, h: str, owner: str) -> None:
        """Give the lock back, only if `owner` still holds it."""

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        """Push the expiry to `ttl` from now, only if `owner` still holds it."""

    async def held(self, h: str) -> bool:
        """Whether anyone holds the lock of `h` now."""


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
