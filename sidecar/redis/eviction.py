"""Whether Redis may evict the sidecar's keys under memory pressure (docs/redis.md, "Memory
policy").

Every key the sidecar writes carries an expiry, so both `allkeys-*` and `volatile-*` policies
may pick sessions and refresh locks: an evicted session logs its user out, an evicted lock
lets a second replica present a refresh token that is being rotated. Only `noeviction` keeps
them; Redis then refuses writes when full, and the sidecar fails closed with 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from sidecar.redis.boundary import translated_errors
from sidecar.redis.connect import RedisClient

__all__ = ["SAFE_POLICY", "eviction_risk", "maxmemory_policies"]

SAFE_POLICY: Final = "noeviction"
_KEY: Final = "maxmemory-policy"


async def maxmemory_policies(client: RedisClient) -> set[str] | None:
    """The `maxmemory-policy` of every server the client writes to; None when Redis refuses
    to say (an ACL without CONFIG, or CONFIG renamed away as managed services do)."""
    async with translated_errors():
        try:
            if isinstance(client, RedisCluster):
                reply: object = await client.config_get(_KEY, target_nodes=RedisCluster.PRIMARIES)
            else:
                reply = await client.config_get(_KEY)
        except ResponseError:  # NOPERM, unknown command: not ours to read
            return None
    return _policies(reply)


def eviction_risk(policies: set[str]) -> str | None:
    """The warning for /readyz and the log, or None when every server keeps our keys."""
    risky = sorted(p for p in policies if p != SAFE_POLICY)
    if not risky:
        return None
    return (
        f"redis maxmemory-policy {', '.join(risky)} may evict sessions and refresh locks "
        f'under memory pressure; set {SAFE_POLICY} (docs/redis.md, "Memory policy")'
    )


def _policies(reply: object) -> set[str]:
    """CONFIG GET's answer, `{name: value}` from one server or `{node: {name: value}}`
    from several (Cluster)."""
    if not isinstance(reply, Mapping):
        return set()
    found: set[str] = set()
    for name, value in reply.items():
        if isinstance(value, Mapping):
            found |= _policies(value)
        elif _text(name) == _KEY and value is not None:
            found.add(_text(value))
    return found


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
