"""Every Redis key and channel name of the sidecar, each spelled once (docs/redis.md).

All keys of one session carry the hash tag `{h}` (the hash of the session id): on Redis
Cluster they share one slot, so a Lua script may touch them together (the fenced write clears
the attempt mark, a delete removes both) and the session's event channel is a shard channel on
the node that holds its record. Index keys (a user's and an IdP session's sessions, pending
logins) carry no session's tag and live in other slots: they are written best-effort, one
command per key, and never decide anything about a session (docs/architecture.md, "Sessions
and Redis").
"""

from __future__ import annotations

__all__ = ["Keys"]


class Keys:
    """The names under one `redis.key_prefix`; `h` is always a session's hash."""

    __slots__ = ("_event_head", "changes", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # Classic pub/sub channel: record hashes after each replace or delete, for every
        # process whatever session it holds (the change feed, sidecar/redis/changes.py).
        self.changes = f"{prefix}:changed"
        self._event_head = f"{prefix}:ev:{{".encode()

    # --- one session: one slot -------------------------------------------------------------

    def record(self, h: str) -> str:
        """The sealed record, a string `<version>:<sealed>`."""
        return f"{self.prefix}:s:{{{h}}}"

    def meta(self, h: str) -> str:
        """What operators may see of the session (issuer, sub, sid, times), sealed under a key
        of the master keys alone; written, expired and deleted with the record."""
        return f"{self.prefix}:m:{{{h}}}"

    def attempt(self, h: str) -> str:
        """When a refresh grant was sent; exists only around a refresh."""
        return f"{self.prefix}:a:{{{h}}}"

    def lock(self, h: str) -> str:
        """The refresh lock's owner token."""
        return f"{self.prefix}:lock:{{{h}}}"

    def events(self, h: str) -> str:
        """The session's event channel (a shard channel on a Cluster)."""
        return f"{self.prefix}:ev:{{{h}}}"

    def session_of_events(self, channel: bytes) -> str | None:
        """The `h` whose event channel `channel` is, or None for any other channel."""
        if channel.startswith(self._event_head) and channel.endswith(b"}"):
            return channel[len(self._event_head) : -1].decode()
        return None

    # --- indexes: other slots, best-effort --------------------------------------------------

    def login(self, state_key: str) -> str:
        """A sealed pending login, under the hash of its `state`."""
        return f"{self.prefix}:login:{state_key}"

    def logins(self, browser: str) -> str:
        """A browser's pending logins (sorted set), under the hash of its binding."""
        return f"{self.prefix}:logins:{{{browser}}}"

    def index(self, ref: str) -> str:
        """A sorted set of session hashes scored by expiry: `sub:<hash of iss+sub>` (a user's
        sessions) or `sid:<hash of iss+sid>` (an IdP session's)."""
        if not ref.startswith(("sub:", "sid:")):
            raise ValueError(f"not an index: {ref!r}")
        return f"{self.prefix}:{ref}"

    def logout_token(self, jti_key: str) -> str:
        """A back-channel logout token's `jti` seen, under its hash: accepted once only."""
        return f"{self.prefix}:jti:{jti_key}"
