"""The per-client token buckets of `/oauth2/start` (sidecar/web/ratelimit.py), on a fake clock."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from sidecar.config import LoginConfig
from sidecar.forwarding.headers import ForwardedPolicy
from sidecar.web.ratelimit import ClientRateLimiter, TokenBuckets, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refusal_then_refill() -> None:
    """`burst` calls pass at once; the next waits 1/rate; time refills, never beyond burst."""
    clock = Clock()
    buckets = TokenBuckets(rate=0.5, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)  # one token every 2 s
    clock.now += 1.0
    assert buckets.take("a") == pytest.approx(1.0)  # refusals take nothing
    clock.now += 1.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.now += 3600  # idle for an hour: a full bucket, not 1800 tokens
    assert [buckets.take("a") for _ in range(4)][-1] > 0
    assert buckets.take("b") == 0.0  # every key has its own bucket


def test_memory_bounded_least_recently_used_forgotten() -> None:
    """At most `max_keys` buckets; the least recently used goes, a busy client stays."""
    clock = Clock()
    buckets = TokenBuckets(rate=1 / 60, burst=2, max_keys=100, clock=clock)
    buckets.take("busy")
    buckets.take("busy")
    for n in range(10_000):
        buckets.take(f"10.0.{n // 256}.{n % 256}")
        if n % 50 == 0:
            assert buckets.take("busy") > 0  # touched: never the one forgotten
    assert len(buckets) == 100


def test_calls_are_constant_time() -> None:
    """A take costs about the same with 10 or 10,000 clients tracked (no scan of the table)."""

    def per_call(clients: int) -> float:
        buckets = TokenBuckets(rate=1.0, burst=5, max_keys=clients)
        keys = [f"k{n % clients}" for n in range(20_000)]
        for key in keys[:clients]:
            buckets.take(key)
        began = time.perf_counter()
        for key in keys:
            buckets.take(key)
        return (time.perf_counter() - began) / len(keys)

    small = min(per_call(10) for _ in range(3))
    large = min(per_call(10_000) for _ in range(3))
    assert large < small * 4 + 1e-6, (small, large)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2::7", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::7", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),
        ("not an address", "not an address"),
    ],
)
def test_client_key(address: str, key: str) -> None:
    """IPv4 addresses are their own bucket; an IPv6 host shares one with its /64."""
    assert client_key(address) == key


def request_from(peer: str, *forwarded: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    headers = {"X-Forwarded-For": ", ".join(forwarded)} if forwarded else {}
    return make_mocked_request("GET", "/oauth2/start", headers=headers, transport=transport)


def test_retry_after_in_whole_seconds() -> None:
    """Retry-After is the wait rounded up, at least 1; None while tokens are left."""
    clock = Clock()
    limiter = ClientRateLimiter(60, 2, ForwardedPolicy([]), clock=clock)
    request = request_from("192.0.2.1")
    assert limiter.retry_after(request) is None
    assert limiter.retry_after(request) is None
    assert limiter.retry_after(request) == 1
    clock.now += 0.999
    assert limiter.retry_after(request) == 1
    slow = ClientRateLimiter(4, 1, ForwardedPolicy([]), clock=clock)  # a token per 15 s
    assert slow.retry_after(request) is None
    assert slow.retry_after(request) == 15
    clock.now += 14.5
    assert slow.retry_after(request) == 1


def test_forwarded_for_counts_only_behind_trusted_proxies() -> None:
    """An untrusted peer is its own bucket whatever it forwards; a trusted one is not."""
    clock = Clock()
    direct = ClientRateLimiter(60, 1, ForwardedPolicy([]), clock=clock)
    assert direct.retry_after(request_from("192.0.2.1", "198.51.100.1")) is None
    assert direct.retry_after(request_from("192.0.2.1", "198.51.100.2")) == 1
    proxied = ClientRateLimiter(60, 1, ForwardedPolicy(["192.0.2.0/24"]), clock=clock)
    assert proxied.retry_after(request_from("192.0.2.1", "198.51.100.1")) is None
    assert proxied.retry_after(request_from("192.0.2.1", "198.51.100.2")) is None
    # The right-most untrusted hop decides; what the client wrote further left is ignored.
    spoofed = request_from("192.0.2.1", "203.0.113.9", "198.51.100.1")
    assert proxied.retry_after(spoofed) == 1


def test_rate_zero_is_off() -> None:
    """`login.rate_per_minute: 0` refuses nothing."""
    limiter = ClientRateLimiter.for_logins(
        LoginConfig(rate_per_minute=0, burst=1), ForwardedPolicy([])
    )
    request = request_from("192.0.2.1")
    assert all(limiter.retry_after(request) is None for _ in range(1000))


def test_invalid_buckets_refused() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBuckets(rate=1, burst=0)
