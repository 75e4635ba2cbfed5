"""The Redis session store; its keys are those of sidecar/redis/keys.py (docs/sessions.md,
"What Redis holds"). Redis errors never leave this module."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from typing import Final

from redis.exceptions import RedisError, ResponseError

from sidecar.config import RedisConfig
from sidecar.errors import StoreUnavailable
from sidecar.redis import connect as redis_connect
from sidecar.redis.boundary import as_bytes, milliseconds, translated_errors
from sidecar.redis.changes import follow_changes
from sidecar.redis.connect import RedisClient
from sidecar.redis.events import RedisEvents
from sidecar.redis.eviction import eviction_risk, maxmemory_policies
from sidecar.redis.keys import Keys
from sidecar.redis.locks import RedisLocks
from sidecar.session.store import Backend

__all__ = ["RedisSessionStore"]

log = logging.getLogger("sidecar.redis")

_BULK: Final = 500  # sessions per pipelined round trip when ending or looking up many

# Records are plain strings `<version>:<sealed bytes>`: a hash would cost a few hundred bytes
# more per session (its own table), which matters at 100k sessions (issue 7). The attempt
# mark lives in its own key (`Keys.attempt`, same slot), which exists only around a refresh.
# A new record replaces whatever was under its key, atomically (one slot: any topology).
_CREATE: Final = """
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
return 1
"""
# Fenced compare-and-set: write only if the record still exists at the version read, so a
# deleted (logged-out) session is never resurrected and a stale writer never wins. The new
# record is announced on the change feed in the same step.
_REPLACE: Final = """
local current = redis.call('GET', KEYS[1])
if (not current) or string.match(current, '^(%d+):') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""
# Delete and announce in one step, so no replica keeps serving the session from its cache.
_DELETE: Final = """
local n = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""
# Idle timeout: the record and its metadata live on together.
_TOUCH: Final = """
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
# Add a session to an index, trim the expired ones, and keep the key as long as its longest
# member (Redis 6.2 has no EXPIRE GT).
_INDEX: Final = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(last[2])) + 1) end
return 1
"""
# List a new pending login under its browser (scored by creation time, microseconds), forget
# the expired ones, and keep only the newest ARGV[4]: returns the dropped states' hashes, whose
# login keys the caller deletes. The list lives as long as a pending login.
_LIST_LOGIN: Final = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local keep = tonumber(ARGV[4])
local dropped = redis.call('ZRANGE', KEYS[1], 0, -keep - 1)
if #dropped > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -keep - 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return dropped
"""
# Marks "a refresh grant is about to be sent" for an existing record only; lives as long.
_MARK_ATTEMPT: Final = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
return 1
"""


class RedisSessionStore:
    """Sealed records as strings `<version>:<sealed>` (`Keys.record`); indexes as sorted sets.

    Works on every topology `redis_connect` builds: a script touches the keys of one session
    only, which share one Cluster slot (the one-slot rule of sidecar/redis/keys.py).
    """

    def __init__(self, client: RedisClient, prefix: str, *, owned: bool = True) -> None:
        self._redis = client
        self._k = Keys(prefix)
        self._owned = owned
        self._create = client.register_script(_CREATE)
        self._replace = client.register_script(_REPLACE)
        self._mark_attempt = client.register_script(_MARK_ATTEMPT)
        self._delete = client.register_script(_DELETE)
        self._touch = client.register_script(_TOUCH)
        # Change feed: classic pub/sub, which reaches every node of a Cluster too.
        self._changes = self._k.changes
        self._index = client.register_script(_INDEX)
        self._list_login = client.register_script(_LIST_LOGIN)
        self._closed = False
        self._policy_unreadable = False  # said once (docs/redis.md, "Memory policy")

    @classmethod
    def from_config(cls, config: RedisConfig) -> RedisSessionStore:
        """A store owning a client for the configured topology (standalone, Sentinel, Cluster)."""
        return cls(redis_connect.connect(config), config.key_prefix)

    @classmethod
    def from_url(cls, url: str, prefix: str) -> RedisSessionStore:
        """A store on one standalone server (tests and tools)."""
        return cls.from_config(RedisConfig(url=url, key_prefix=prefix))

    def backend(self) -> Backend:
        """This store with the Redis locks and events on its client and prefix; /readyz
        follows it as "redis"."""
        return Backend(
            self,
            RedisLocks(self._redis, self._k.prefix),
            RedisEvents(self._redis, self._k.prefix),
            readiness="redis",
        )

    def _keys(self, h: str) -> list[str]:
        """The record, its attempt mark and its metadata: one slot."""
        return [self._k.record(h), self._k.attempt(h), self._k.meta(h)]

    async def get(self, h: str) -> tuple[int, bytes] | None:
        async with translated_errors():
            try:
                value = await self._redis.get(self._k.record(h))
            except ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                return None  # a record in an earlier development layout: log in again
        if value is None:
            return None
        version, _, sealed = as_bytes(value).partition(b":")
        if not version.isdigit():
            raise StoreUnavailable("redis: a session record that is not <version>:<sealed>")
        return int(version), sealed

    async def create(self, h: str, version: int, sealed: bytes, ttl: float, meta: bytes) -> None:
        async with translated_errors():
            await self._create(keys=self._keys(h), args=[version, sealed, milliseconds(ttl), meta])

    async def replace(
        self, h: str, expected_version: int, version: int, sealed: bytes, ttl: float, meta: bytes
    ) -> bool:
        async with translated_errors():
            done = await self._replace(
                keys=self._keys(h),
                args=[
                    expected_version,
                    version,
                    sealed,
                    milliseconds(ttl),
                    self._changes,
                    h,
                    meta,
                ],
            )
        return bool(done)

    async def touch(self, h: str, ttl: float) -> None:
        async with translated_errors():
            await self._touch(keys=self._keys(h), args=[milliseconds(ttl)])

    async def mark_attempt(self, h: str, at: float) -> None:
        async with translated_errors():
            await self._mark_attempt(keys=self._keys(h), args=[repr(at)])

    async def attempt_mark(self, h: str) -> float | None:
        async with translated_errors():
            value = await self._redis.get(self._k.attempt(h))
        return float(value) if value is not None else None

    @property
    def client(self) -> RedisClient:
        """The connection pool, shared with the refresh lock and event channel."""
        return self._redis

    @property
    def prefix(self) -> str:
        return self._k.prefix

    async def delete(self, h: str) -> bool:
        async with translated_errors():
            return bool(await self._delete(keys=self._keys(h), args=[self._changes, h]))

    async def watch(self, changed: Callable[[str | None], None]) -> None:
        await follow_changes(self._redis, self._changes, changed)

    async def end(self, hashes: Sequence[str]) -> int:
        # One pipelined DEL per session (its keys share a slot), then one announcement per
        # chunk: two round trips per _BULK sessions, on any topology (docs/sessions.md).
        ended = 0
        async with translated_errors():
            for start in range(0, len(hashes), _BULK):
                chunk = hashes[start : start + _BULK]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for h in chunk:
                        pipe.delete(self._k.record(h))
                        pipe.delete(self._k.attempt(h), self._k.meta(h))
                    replies = await pipe.execute()
                ended += sum(1 for n in replies[::2] if n)
                await self._redis.publish(self._changes, " ".join(chunk))
        return ended

    async def lookup(self, hashes: Sequence[str]) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        async with translated_errors():
            for start in range(0, len(hashes), _BULK):
                chunk = hashes[start : start + _BULK]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for h in chunk:
                        pipe.exists(self._k.record(h))
                        pipe.get(self._k.meta(h))
                    replies = await pipe.execute()
                for h, exists, meta in zip(chunk, replies[::2], replies[1::2], strict=True):
                    if exists:
                        found[h] = as_bytes(meta) if meta is not None else None
        return found

    async def index(self, h: str, refs: Sequence[str], expires_at: float) -> None:
        # Index keys live in other Cluster slots than the record: one call each (keys.py).
        async with translated_errors():
            for ref in refs:
                await self._index(
                    keys=[self._k.index(ref)], args=[h, repr(expires_at), repr(time.time())]
                )

    async def unindex(self, removals: Mapping[str, Collection[str]]) -> None:
        # One command per key (index keys may live on different Cluster nodes), pipelined:
        # ending a user's 1,000 sessions touches 1,001 indexes.
        refs = [ref for ref, hashes in removals.items() if hashes]
        async with translated_errors():
            for start in range(0, len(refs), _BULK):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for ref in refs[start : start + _BULK]:
                        pipe.zrem(self._k.index(ref), *removals[ref])
                    await pipe.execute()

    async def indexed(self, ref: str) -> dict[str, bytes | None]:
        key = self._k.index(ref)
        now = time.time()
        async with translated_errors():
            members = await self._redis.zrangebyscore(key, now, "+inf")
            hashes = [as_bytes(m).decode() for m in members]
            live = await self.lookup(hashes)
            # Trimmed when read: sessions that ended on their own (expiry, idle timeout).
            dead = [h for h in hashes if h not in live]
            if dead:
                await self._redis.zrem(key, *dead)
            await self._redis.zremrangebyscore(key, "-inf", now)
        return live

    async def remember(self, key: str, until: float) -> bool:
        async with translated_errors():
            done = await self._redis.set(
                self._k.logout_token(key), b"1", nx=True, exat=max(1, math.ceil(until))
            )
        return bool(done)

    async def forget(self, key: str) -> None:
        async with translated_errors():
            await self._redis.delete(self._k.logout_token(key))

    async def put_login(self, key: str, sealed: bytes, ttl: float, browser: str, keep: int) -> int:
        ttl_ms = milliseconds(ttl)
        now_us = int(time.time() * 1_000_000)
        async with translated_errors():
            await self._redis.set(self._k.login(key), sealed, px=ttl_ms)
            dropped = await self._list_login(
                keys=[self._k.logins(browser)],
                args=[key, now_us, now_us - ttl_ms * 1000, keep, ttl_ms],
            )
            if dropped:
                # Other Cluster slots than the list: deleted after the (atomic) trim. A
                # process dying in between leaves them to their TTL (docs/sessions.md).
                await self._redis.delete(*(self._k.login(as_bytes(m).decode()) for m in dropped))
        return len(dropped)

    async def take_login(self, key: str) -> bytes | None:
        async with translated_errors():
            value = await self._redis.getdel(self._k.login(key))
        return as_bytes(value) if value is not None else None

    async def ping(self) -> None:
        async with translated_errors():
            await self._redis.ping()

    async def eviction_risk(self) -> str | None:
        if self._policy_unreadable:
            return None  # asked once: a refusal lands in Redis' ACL LOG each time
        policies = await maxmemory_policies(self._redis)
        if policies is None:
            log.info("redis maxmemory-policy not readable (CONFIG not permitted); not checked")
            self._policy_unreadable = True
            return None
        return eviction_risk(policies)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned:
            with suppress(RedisError, OSError):
                await redis_connect.close(self._redis)
