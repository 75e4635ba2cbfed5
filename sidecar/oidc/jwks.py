"""The IdP's signing keys, cached; refetched once, rate-limited, when an unknown `kid` shows up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from sidecar.errors import IdPError

__all__ = ["JWKSCache"]

_MIN_REFETCH_INTERVAL: Final = 10.0  # seconds; forged kids must not turn us into a DoS amplifier


class JWKSCache:
    """Holds the last good key set; a failed fetch keeps it."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._keys: KeySet | None = None
        self._generation = 0  # bumped on every successful load
        self._refetched_at = float("-inf")  # start-up loads do not count against the limit
        self._lock = asyncio.Lock()

    @property
    def keys(self) -> KeySet | None:
        return self._keys

    async def load(self) -> KeySet:
        """Fetch now (start-up, or when no keys are cached); raise on failure."""
        async with self._lock:
            return await self._load_locked()

    async def refetch(self) -> bool:
        """Fetch again unless one happened recently; True if a newer set is now cached.

        Concurrent callers with the same unknown `kid` share one fetch: whoever waited on
        the lock sees the set loaded meanwhile. A failed fetch keeps the old set.
        """
        seen = self._generation
        async with self._lock:
            if self._generation != seen:
                return True
            if self._clock() - self._refetched_at < _MIN_REFETCH_INTERVAL:
                return False
            self._refetched_at = self._clock()
            try:
                await self._load_locked()
            except (ValueError, JoseError, IdPError):
                return False
            return True

    async def _load_locked(self) -> KeySet:
        document = await self._fetch()
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("JWKS is not a JSON object with a keys list")
        # Keys the library cannot use (other kty, encryption keys) are skipped, not fatal.
        usable = [
            k for k in document["keys"] if isinstance(k, dict) and k.get("use") in (None, "sig")
        ]
        self._keys = KeySet.import_key_set({"keys": usable})
        self._generation += 1
        return self._keys
