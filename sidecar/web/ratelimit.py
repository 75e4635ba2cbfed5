"""A token bucket per client address, in this process's memory: bounds `/oauth2/start`.

Each anonymous `/oauth2/start` stores a pending login for 10 minutes, so without a bound one
client could fill the session store at the speed of its connection. A token bucket allows a
browser's honest bursts (several tabs, a retry) and refuses a steady flood; refusals cost
nothing but a dict lookup. The buckets live in this process only: with `server.workers` and
replicas the limit per client multiplies by their number (docs/decisions.md).

Memory is bounded: at most `max_clients` buckets, the least recently used forgotten first
(an idle bucket refills, so forgetting it loses little), and every call is O(1).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from aiohttp import web

from sidecar.config import LoginConfig
from sidecar.forwarding.headers import ForwardedPolicy

__all__ = ["ClientRateLimiter", "TokenBuckets", "client_key"]

MAX_CLIENTS: Final = 10_000
_IPV6_PREFIX: Final = 64  # one host usually holds a whole /64: its addresses share a bucket


class TokenBuckets:
    """`burst` tokens per key, refilled at `rate` tokens per second; a call takes one."""

    __slots__ = ("_buckets", "_burst", "_clock", "_max", "_rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._max = max_keys
        self._clock = clock
        # key -> (tokens left, when counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0.0 when a token was taken; else the seconds until one is there (nothing taken)."""
        now = self._clock()
        entry = self._buckets.get(key)
        if entry is None:
            tokens = self._burst
            if len(self._buckets) >= self._max:
                self._buckets.popitem(last=False)
        else:
            tokens = min(self._burst, entry[0] + (now - entry[1]) * self._rate)
            self._buckets.move_to_end(key)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(address: str) -> str:
    """The bucket of an address: IPv4 as is, IPv6 by its /64 (anything else as is)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
        if ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip.exploded, _IPV6_PREFIX), strict=False))
    except ValueError:
        return address


class ClientRateLimiter:
    """Token buckets keyed by the client address `ForwardedPolicy` believes."""

    __slots__ = ("_buckets", "_policy")

    def __init__(
        self,
        rate_per_minute: float,
        burst: int,
        policy: ForwardedPolicy,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`rate_per_minute` 0 turns the limit off."""
        self._policy = policy
        self._buckets = (
            TokenBuckets(rate_per_minute / 60.0, burst, max_keys=max_clients, clock=clock)
            if rate_per_minute > 0
            else None
        )

    @classmethod
    def for_logins(cls, config: LoginConfig, policy: ForwardedPolicy) -> ClientRateLimiter:
        """The `/oauth2/start` limiter of `login.rate_per_minute` and `login.burst`."""
        return cls(config.rate_per_minute, config.burst, policy)

    def retry_after(self, request: web.BaseRequest) -> int | None:
        """None when the request may go on (a token was taken); else whole seconds to wait."""
        if self._buckets is None:
            return None
        wait = self._buckets.take(client_key(self._policy.client_ip(request)))
        return max(1, math.ceil(wait)) if wait > 0 else None
