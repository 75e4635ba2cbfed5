"""What the sidecar needs from storage, shared by the Redis and the memory backends: the
session store, the per-session refresh locks and the session event channel, and `Backend`,
which holds the three that go together (docs/architecture.md, "Sessions and Redis").

Stores see only `h` (the hash of the session id) and sealed bytes, never a token or an id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "ENDED",
    "FAILED",
    "REFRESHED",
    "Backend",
    "Events",
    "Locks",
    "SessionStore",
    "Waiters",
]

# The kinds of session events (docs/refresh.md, "How", step 3).
REFRESHED: Final = b"refreshed"
FAILED: Final = b"failed"
ENDED: Final = b"ended"


class SessionStore(Protocol):
    """Storage of sealed session records, pending logins and the logout indexes
    (docs/sessions.md, "What Redis holds")."""

    async def get(self, h: str) -> tuple[int, bytes] | None:
        """The record's version and sealed bytes, or None when absent or expired."""

    async def create(self, h: str, version: int, sealed: bytes, ttl: float, meta: bytes) -> None:
        """Store a new record for `ttl` seconds, with its sealed metadata (the admin view)."""

    async def replace(
        self, h: str, expected_version: int, version: int, sealed: bytes, ttl: float, meta: bytes
    ) -> bool:
        """Fenced write of record and metadata: only if the record still exists at
        `expected_version` (docs/refresh.md, "How", step 6)."""

    async def mark_attempt(self, h: str, at: float) -> None:
        """Note that a refresh grant for `h` is about to be sent; a fenced write clears it."""

    async def attempt_mark(self, h: str) -> float | None:
        """When an unfinished refresh attempt was marked (a holder died mid-rotation), or None."""

    async def touch(self, h: str, ttl: float) -> None:
        """Set the record's TTL to `ttl` seconds if it still exists (idle timeout)."""

    async def delete(self, h: str) -> bool:
        """Remove the record; True if it existed."""

    async def watch(self, changed: Callable[[str | None], None]) -> None:
        """Follow the change feed until cancelled: `changed(h)` after any process replaced
        or deleted `h`; `changed(None)` once (re)subscribed, when earlier news may be lost.

        Raises `StoreUnavailable` when the feed breaks.
        """

    async def end(self, hashes: Sequence[str]) -> int:
        """Delete many records and announce each on the change feed; how many existed."""

    async def lookup(self, hashes: Sequence[str]) -> dict[str, bytes | None]:
        """The live ones among `hashes`, each with its sealed metadata (None for a record
        stored before metadata was kept)."""

    async def index(self, h: str, refs: Sequence[str], expires_at: float) -> None:
        """Best-effort: list `h` under its user and IdP session (`sub:…`, `sid:…`)."""

    async def unindex(self, removals: Mapping[str, Collection[str]]) -> None:
        """Best-effort removal: index ref → the hashes to take out of it."""

    async def indexed(self, ref: str) -> dict[str, bytes | None]:
        """The live sessions an index lists, as `lookup` gives them; dead entries (ended or
        expired sessions) are trimmed on the way, so none is ever returned."""

    async def remember(self, key: str, until: float) -> bool:
        """Note `key` (a logout token's jti hash) until `until`; False if already noted."""

    async def forget(self, key: str) -> None:
        """Drop a `remember`ed key: the logout it stood for did not complete."""

    async def put_login(self, key: str, sealed: bytes, ttl: float, browser: str, keep: int) -> int:
        """Store a pending login under the hash of its `state`, listed under `browser`.

        Only the newest `keep` pending logins of one browser remain: the older ones are
        deleted (their `state` no longer works). Returns how many were dropped.
        """

    async def take_login(self, key: str) -> bytes | None:
        """Read and delete a pending login in one step (GETDEL): a state works once."""

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers."""

    async def eviction_risk(self) -> str | None:
        """A warning when the store may drop sessions or locks on its own under memory
        pressure (Redis' `maxmemory-policy`), else None."""

    async def close(self) -> None:
        """Release connections; idempotent."""

    def backend(self) -> Backend:
        """This store with the refresh locks and events that share its state (one process
        for the memory store, every replica for Redis): what sidecar/backend.py hands out."""


class Locks(Protocol):
    async def acquire(self, h: str, ttl: float) -> str | None:
        """Take the lock of session `h` for `ttl` seconds; the owner token, or None if held."""

    async def release(self, h: str, owner: str) -> None:
        """Give the lock back, only if `owner` still holds it."""

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        """Push the expiry to `ttl` from now, only if `owner` still holds it."""

    async def held(self, h: str) -> bool:
        """Whether anyone holds the lock of `h` now."""


# A session's event channel wakes waiters early, nothing more: correctness rests on the
# waiter's slow poll of the record; a lost message only costs a poll interval.
class Events(Protocol):
    async def publish(self, h: str, kind: bytes) -> None: ...

    def waiting(self, h: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Waiters:
    """asyncio Events per session hash, set when a message for it arrives."""

    def __init__(self) -> None:
        self._by_hash: dict[str, set[asyncio.Event]] = {}

    def join(self, h: str) -> tuple[asyncio.Event, bool]:
        """A new waiter's event for `h`, and whether it is the first one waiting on `h`."""
        event = asyncio.Event()
        waiters = self._by_hash.setdefault(h, set())
        first = not waiters
        waiters.add(event)
        return event, first

    def leave(self, h: str, event: asyncio.Event) -> bool:
        """Forget `event`; True when it was the last one waiting on `h`."""
        waiters = self._by_hash.get(h)
        if waiters is None:
            return False
        waiters.discard(event)
        if waiters:
            return False
        del self._by_hash[h]
        return True

    def wake(self, h: str) -> None:
        for event in self._by_hash.get(h, ()):
            event.set()

    def watching(self, h: str) -> bool:
        return h in self._by_hash

    def watched(self) -> list[str]:
        return list(self._by_hash)


@dataclass(frozen=True, slots=True)
class Backend:
    """A session store with the refresh locks and events that go with it."""

    store: SessionStore
    locks: Locks
    events: Events
    # The /readyz dependency that `store.ping()` answers for ("redis"); None: nothing to probe.
    readiness: str | None = None
