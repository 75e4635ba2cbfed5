"""The memory backend: session store, refresh locks and session events inside one process
(the demo, single-replica setups), with the Redis backend's semantics."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

from sidecar.session.store import Backend, Waiters

__all__ = ["MAX_PENDING_LOGINS", "MemoryEvents", "MemoryLocks", "MemorySessionStore"]

log = logging.getLogger("sidecar.session")

# A pending login costs ~0.9 KB here (up to ~3 KB with a 2 KB return path): a flood from
# many addresses holds at most ~20-60 MB before the oldest go. 20,000 logins started within
# the 10-minute TTL is 33 a second, beyond what one memory-store process serves.
MAX_PENDING_LOGINS: Final = 20_000


class MemorySessionStore:
    """Same semantics as the Redis store, with expiry checked on read."""

    def __init__(
        self, clock: Callable[[], float] = time.time, max_logins: int = MAX_PENDING_LOGINS
    ) -> None:
        """`max_logins` caps the pending logins held: beyond it the oldest goes first."""
        self._clock = clock
        self._records: dict[str, tuple[int, bytes, float]] = {}
        # Pending logins in the order stored: sealed bytes (None once used), deadline, browser.
        self._logins: dict[str, tuple[bytes | None, float, str]] = {}
        # Each browser's pending logins, oldest first (dicts as ordered sets).
        self._browsers: dict[str, dict[str, None]] = {}
        self._max_logins = max_logins
        self._indexes: dict[str, dict[str, float]] = {}
        self._meta: dict[str, bytes] = {}
        self._remembered: dict[str, float] = {}
        self._attempts: dict[str, float] = {}
        self._watchers: list[Callable[[str | None], None]] = []
        log.warning(
            "memory session store: sessions live in this process only and vanish on restart; "
            "not for more than one replica or worker"
        )

    async def get(self, h: str) -> tuple[int, bytes] | None:
        entry = self._records.get(h)
        if entry is None:
            return None
        version, sealed, deadline = entry
        if deadline <= self._clock():
            del self._records[h]
            self._meta.pop(h, None)
            return None
        return version, sealed

    async def create(self, h: str, version: int, sealed: bytes, ttl: float, meta: bytes) -> None:
        self._records[h] = (version, sealed, self._clock() + ttl)
        self._meta[h] = meta
        self._attempts.pop(h, None)

    async def replace(
        self, h: str, expected_version: int, version: int, sealed: bytes, ttl: float, meta: bytes
    ) -> bool:
        current = await self.get(h)
        if current is None or current[0] != expected_version:
            return False
        self._records[h] = (version, sealed, self._clock() + ttl)
        self._meta[h] = meta
        self._attempts.pop(h, None)
        self._announce(h)
        return True

    async def touch(self, h: str, ttl: float) -> None:
        entry = self._records.get(h)
        if entry is not None:
            self._records[h] = (entry[0], entry[1], self._clock() + ttl)

    async def mark_attempt(self, h: str, at: float) -> None:
        if h in self._records:
            self._attempts[h] = at

    async def attempt_mark(self, h: str) -> float | None:
        return self._attempts.get(h)

    async def delete(self, h: str) -> bool:
        self._attempts.pop(h, None)
        self._meta.pop(h, None)
        existed = self._records.pop(h, None) is not None
        self._announce(h)
        return existed

    async def end(self, hashes: Sequence[str]) -> int:
        ended = 0
        for h in hashes:
            ended += await self.delete(h)
        return ended

    async def lookup(self, hashes: Sequence[str]) -> dict[str, bytes | None]:
        return {h: self._meta.get(h) for h in hashes if await self.get(h) is not None}

    async def watch(self, changed: Callable[[str | None], None]) -> None:
        self._watchers.append(changed)
        try:
            changed(None)
            await asyncio.Future()  # until cancelled
        finally:
            self._watchers.remove(changed)

    def _announce(self, h: str) -> None:
        for changed in self._watchers:
            changed(h)

    async def index(self, h: str, refs: Sequence[str], expires_at: float) -> None:
        now = self._clock()
        for ref in refs:
            members = self._indexes.setdefault(ref, {})
            members[h] = expires_at
            for member in [m for m, until in members.items() if until <= now]:
                del members[member]

    async def unindex(self, removals: Mapping[str, Collection[str]]) -> None:
        for ref, hashes in removals.items():
            members = self._indexes.get(ref, {})
            for h in hashes:
                members.pop(h, None)
            if not members:
                self._indexes.pop(ref, None)

    async def indexed(self, ref: str) -> dict[str, bytes | None]:
        members = self._indexes.get(ref, {})
        live = await self.lookup([h for h, until in members.items() if until > self._clock()])
        for h in [h for h in members if h not in live]:
            del members[h]
        if not members:
            self._indexes.pop(ref, None)
        return live

    async def remember(self, key: str, until: float) -> bool:
        now = self._clock()
        for seen in [k for k, t in self._remembered.items() if t <= now]:
            del self._remembered[seen]
        if key in self._remembered:
            return False
        self._remembered[key] = until
        return True

    async def forget(self, key: str) -> None:
        self._remembered.pop(key, None)

    async def put_login(self, key: str, sealed: bytes, ttl: float, browser: str, keep: int) -> int:
        now = self._clock()
        self._evict_logins(now)
        self._drop_login(key)  # a state is random: only ever a test puts one twice
        while len(self._logins) >= self._max_logins:
            self._drop_login(next(iter(self._logins)))  # full: the oldest goes
        self._logins[key] = (sealed, now + ttl, browser)
        pending = self._browsers.setdefault(browser, {})
        pending[key] = None
        dropped = 0
        while len(pending) > keep:
            self._drop_login(next(iter(pending)))
            dropped += 1
        return dropped

    async def take_login(self, key: str) -> bytes | None:
        entry = self._logins.get(key)
        if entry is None or entry[0] is None:
            return None
        if entry[1] <= self._clock():
            self._drop_login(key)
            return None
        # Used, but still listed under its browser until it expires or is pushed out, as in
        # Redis: the cap counts logins started, not logins waiting.
        self._logins[key] = (None, entry[1], entry[2])
        return entry[0]

    @property
    def pending_logins(self) -> int:
        """Pending logins held now: used and expired ones not yet evicted included."""
        return len(self._logins)

    def _evict_logins(self, now: float) -> None:
        """Drop expired pending logins, oldest first: amortised O(1) per login stored.

        Every pending login gets the same TTL, so insertion order is expiry order; one
        given a shorter TTL waits behind older ones, and `take_login` still refuses it.
        """
        while self._logins:
            key = next(iter(self._logins))
            if self._logins[key][1] > now:
                return
            self._drop_login(key)

    def _drop_login(self, key: str) -> None:
        entry = self._logins.pop(key, None)
        if entry is not None:
            pending = self._browsers.get(entry[2])
            if pending is not None:
                pending.pop(key, None)
                if not pending:
                    del self._browsers[entry[2]]

    async def ping(self) -> None:
        return None

    async def eviction_risk(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    def backend(self) -> Backend:
        """This store with in-process locks and events: one process holds all of them."""
        return Backend(self, MemoryLocks(), MemoryEvents())


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


class MemoryEvents:
    """In-process delivery for the memory store."""

    def __init__(self) -> None:
        self._waiters = Waiters()

    async def publish(self, h: str, kind: bytes) -> None:
        self._waiters.wake(h)

    @asynccontextmanager
    async def waiting(self, h: str) -> AsyncIterator[asyncio.Event]:
        event, _ = self._waiters.join(h)
        try:
            yield event
        finally:
            self._waiters.leave(h, event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
