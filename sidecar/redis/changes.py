"""The Redis change feed: which session records other replicas replaced or deleted.

The store's Lua scripts PUBLISH the record's hash on the feed's channel (`Keys.changes`) in
the same step as the write (classic pub/sub, which reaches every node of a Cluster). A
subscription can go quiet without an error: the connection to a demoted master may stay open,
or redis-py may reconnect and resubscribe by itself after news went by. So the follower
publishes its own heartbeat every `_HEARTBEAT` seconds through the normal client (the current
master) and trusts the feed only while it hears it back; anything else ends `follow` with
`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Final

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable
from sidecar.redis.connect import RedisClient

__all__ = ["follow_changes"]

_HEARTBEAT: Final = 0.5  # seconds between this process's own heartbeats on the feed
_SILENCE: Final = 3 * _HEARTBEAT  # no heartbeat back for this long: the feed is not trusted
_MARK: Final = b"~"  # heartbeats start with it; record hashes (base64url) never do


async def follow_changes(
    client: RedisClient, channel: str, changed: Callable[[str | None], None]
) -> None:
    """Call `changed(h)` for every announced change; `changed(None)` once the feed is proven.

    Runs until cancelled, or raises `StoreUnavailable` when the feed breaks or falls silent.
    """
    pubsub: PubSub | ClusterPubSub = client.pubsub()
    beat = _MARK + secrets.token_hex(8).encode()
    heartbeats = asyncio.create_task(_beat(client, channel, beat), name="session-feed-heartbeat")
    try:
        await client.ping()  # also makes a Cluster client learn its slot map first
        await pubsub.subscribe(channel)
        subscribed = proven = False
        heard = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=_HEARTBEAT)
            if time.monotonic() - heard > _SILENCE or heartbeats.done():
                raise StoreUnavailable("redis: the session change feed fell silent")
            if message is None:
                continue
            kind, data = message["type"], message["data"]
            if kind == "subscribe":
                if subscribed:  # redis-py reconnected by itself: news may have gone by
                    raise StoreUnavailable("redis: the session change feed reconnected")
                subscribed = True
            elif kind == "message" and isinstance(data, bytes):
                if data == beat:
                    heard = time.monotonic()
                    if not proven:
                        proven = True
                        changed(None)
                elif not data.startswith(_MARK):
                    for h in data.split(b" "):  # many at once when sessions end in bulk
                        changed(h.decode())
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
    finally:
        heartbeats.cancel()
        await asyncio.wait({heartbeats}, timeout=1.0)
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()


async def _beat(client: RedisClient, channel: str, beat: bytes) -> None:
    """Publish `beat` every `_HEARTBEAT` seconds; a failed publish just misses one beat."""
    while True:
        with contextlib.suppress(RedisError, OSError):
            await client.publish(channel, beat)
        await asyncio.sleep(_HEARTBEAT)
