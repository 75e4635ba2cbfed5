"""Recently opened sessions of this process, so a request with a fresh token skips the store.

Entries are keyed by the session id (a dict lookup instead of a hash, a Redis read, a key
derivation, a decryption and a JSON parse) and live `ttl` seconds at most. The cache is only
switched on while the store's change feed is live: every replace or delete of a record, by
any replica, removes the entry within milliseconds; `ttl` bounds what a lost message costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.session.record import Session

__all__ = ["SessionCache"]


class SessionCache:
    """A bounded map id → (session, loaded at); the oldest entry goes first when full."""

    __slots__ = ("_by_hash", "_clock", "_entries", "_max", "_ttl", "changes", "enabled")

    def __init__(
        self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[Session, float]] = {}
        self._by_hash: dict[str, str] = {}
        self.enabled = False
        # Changes announced by the feed so far: a read that began before the latest one
        # may hold an old version, so `put` refuses it.
        self.changes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str) -> Session | None:
        if not self.enabled:
            return None
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        session, loaded_at = entry
        if self._clock() - loaded_at >= self._ttl:
            self.forget(session.h)
            return None
        return session

    def put(self, session: Session, seen: int) -> None:
        """Cache `session`, read when `changes` was `seen`, unless a change came since."""
        if not self.enabled or seen != self.changes:
            return
        entries = self._entries
        entries.pop(session.id, None)
        if len(entries) >= self._max:
            oldest = next(iter(entries))
            self._by_hash.pop(entries.pop(oldest)[0].h, None)
        entries[session.id] = (session, self._clock())
        self._by_hash[session.h] = session.id

    def invalidate(self, h: str) -> None:
        """The feed says `h` changed or went."""
        self.changes += 1
        self.forget(h)

    def forget(self, h: str) -> None:
        session_id = self._by_hash.pop(h, None)
        if session_id is not None:
            self._entries.pop(session_id, None)

    def clear(self) -> None:
        self.changes += 1
        self._entries.clear()
        self._by_hash.clear()

    def switch_off(self) -> None:
        """No feed to trust: serve nothing from memory until it is back."""
        self.enabled = False
        self.clear()
