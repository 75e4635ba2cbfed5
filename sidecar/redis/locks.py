"""Per-session refresh locks in Redis (docs/refresh.md, "How", step 2): one owner token,
compare-and-delete and compare-and-extend.

Never one global lock: each key names one session, so different users refresh in parallel.
"""

from __future__ import annotations

import secrets
from typing import Final

from sidecar.redis.boundary import milliseconds, translated_errors
from sidecar.redis.connect import RedisClient
from sidecar.redis.keys import Keys

__all__ = ["RedisLocks"]

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisLocks:
    """`SET <Keys.lock(h)> <owner> NX PX ttl`, shared by every replica; the `Locks` protocol
    of sidecar/session/store.py.

    Each script touches the lock key only, so it runs on a Cluster too, on the node that
    holds the session's slot.
    """

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._redis = client
        self._keys = Keys(prefix)
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)

    async def acquire(self, h: str, ttl: float) -> str | None:
        owner = secrets.token_urlsafe(16)
        async with translated_errors():
            taken = await self._redis.set(self._keys.lock(h), owner, nx=True, px=milliseconds(ttl))
        return owner if taken else None

    async def release(self, h: str, owner: str) -> None:
        async with translated_errors():
            await self._release(keys=[self._keys.lock(h)], args=[owner])

    async def extend(self, h: str, owner: str, ttl: float) -> bool:
        async with translated_errors():
            extended = await self._extend(
                keys=[self._keys.lock(h)], args=[owner, milliseconds(ttl)]
            )
        return bool(extended)

    async def held(self, h: str) -> bool:
        async with translated_errors():
            return bool(await self._redis.exists(self._keys.lock(h)))
