"""A session's event channel (docs/refresh.md, "How", step 3): wakes waiters early, nothing more.

Correctness rests on the waiter's slow poll of the record; a lost message only costs a poll
interval. The protocol, the kinds of events and the in-process twin of the memory store; the
Redis one, shared by every replica, is `sidecar.redis.events.RedisEvents`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, Protocol

__all__ = ["ENDED", "FAILED", "REFRESHED", "Events", "MemoryEvents", "Waiters"]

REFRESHED: Final = b"refreshed"
FAILED: Final = b"failed"
ENDED: Final = b"ended"


class Events(Protocol):
    async def publish(self, h: str, kind: bytes) -> None: ...

    def waiting(self, h: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Waiters:
    """asyncio Events per session hash, set when a message for it arrives."""

    def __init__(self) -> None:
        self.by_hash: dict[str, set[asyncio.Event]] = {}

    def wake(self, h: str) -> None:
        for event in self.by_hash.get(h, ()):
            event.set()


class MemoryEvents:
    """In-process delivery for the memory store."""

    def __init__(self) -> None:
        self._waiters = Waiters()

    async def publish(self, h: str, kind: bytes) -> None:
        self._waiters.wake(h)

    @asynccontextmanager
    async def waiting(self, h: str) -> AsyncIterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.by_hash.setdefault(h, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.by_hash.get(h)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters.by_hash[h]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
