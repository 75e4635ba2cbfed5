"""What every Redis module does at its edge: errors translated, TTLs in milliseconds, replies
checked. Redis errors never leave the package (docs/architecture.md, "Failure policy")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable, reason

__all__ = ["as_bytes", "milliseconds", "translated_errors"]


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Redis failures become `StoreUnavailable`: a 503, never a 500 (docs/redis.md)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {reason(exc)}") from exc


def milliseconds(seconds: float) -> int:
    """A TTL for `PX`/`PEXPIRE`: never 0, which Redis refuses."""
    return max(1, int(seconds * 1000))


def as_bytes(value: object) -> bytes:
    """A reply as bytes: the clients are built with decode_responses=False."""
    if not isinstance(value, bytes):
        raise StoreUnavailable(f"redis: unexpected reply type {type(value).__name__}")
    return value
