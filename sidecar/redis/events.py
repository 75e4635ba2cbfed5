"""A session's event channel in Redis (docs/refresh.md, "How", step 3): wakes waiters early.

Best effort by design: correctness rests on the waiter's slow poll of the record. One pub/sub
connection per process (on a Cluster: one per node that holds a watched channel), subscribed
to a session's channel only while someone in this process waits on it. On a Cluster the
channel is a shard channel (SPUBLISH/SSUBSCRIBE, Redis 7.0): it lives in the session's slot
(sidecar/redis/keys.py), so a message travels only to the node that holds the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import RedisError

from sidecar.redis.connect import RedisClient, is_cluster
from sidecar.redis.keys import Keys
from sidecar.session.store import Waiters

__all__ = ["RedisEvents"]

log = logging.getLogger("sidecar.refresh")


class RedisEvents:
    """Redis pub/sub (sharded on a Cluster) on one connection per node; the `Events` protocol
    of sidecar/session/store.py."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._redis = client
        self._keys = Keys(prefix)
        self._sharded = is_cluster(client)
        self._pubsub: PubSub | ClusterPubSub = client.pubsub(ignore_subscribe_messages=True)
        self._waiters = Waiters()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="refresh-events")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            # redis-py can turn a cancellation into a connection error; `_closing` ends the
            # loop in that case, and the wait is bounded either way.
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=2.0)
            self._reader = None
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()

    async def publish(self, h: str, kind: bytes) -> None:
        try:
            if self._sharded:
                await self._redis.spublish(self._keys.events(h), kind)
            else:
                await self._redis.publish(self._keys.events(h), kind)
        except (RedisError, OSError):
            log.warning("session event not published; waiters fall back to polling")

    @asynccontextmanager
    async def waiting(self, h: str) -> AsyncIterator[asyncio.Event]:
        event, first = self._waiters.join(h)
        if first:
            with contextlib.suppress(RedisError, OSError):
                await self._subscribe(self._keys.events(h))
        try:
            yield event
        finally:
            if self._waiters.leave(h, event):
                with contextlib.suppress(RedisError, OSError):
                    await self._unsubscribe(self._keys.events(h))

    async def _subscribe(self, channel: str) -> None:
        if isinstance(self._pubsub, ClusterPubSub):
            await self._pubsub.ssubscribe(channel)
        else:
            await self._pubsub.subscribe(channel)

    async def _unsubscribe(self, channel: str) -> None:
        if isinstance(self._pubsub, ClusterPubSub):
            await self._pubsub.sunsubscribe(channel)
        else:
            await self._pubsub.unsubscribe(channel)

    async def _next_message(self) -> dict[str, Any] | None:
        if isinstance(self._pubsub, ClusterPubSub):
            # One call polls each node's connection in turn for up to `timeout`: keep it short
            # so that a message on one node does not wait behind the others' timeouts.
            message: dict[str, Any] | None = await self._pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=0.05
            )
            return message
        message = await self._pubsub.get_message(timeout=1.0)
        return message

    async def _read(self) -> None:
        while not self._closing:
            if not self._pubsub.subscribed:
                await asyncio.sleep(0.05)
                continue
            try:
                message = await self._next_message()
            except (RedisError, OSError, RuntimeError):
                # RuntimeError: redis-py's cluster pub/sub while its node map is reshaped.
                await asyncio.sleep(0.5)  # the pollers carry on meanwhile
                continue
            if message is None:
                if self._sharded:
                    await asyncio.sleep(0.005)  # it may return at once (no node subscribed yet)
                continue
            if message.get("type") not in ("message", "smessage"):
                continue
            channel = message["channel"]
            h = self._keys.session_of_events(channel) if isinstance(channel, bytes) else None
            if h is not None:
                self._waiters.wake(h)
