"""The IdP circuit breaker end to end (docs/refresh.md, "IdP circuit breaker"; issue 18 item 4).

The certified oidc-provider's token endpoint fails (503, or the connection dropped unanswered)
while 50 sessions' access tokens expire; two `auth-sidecar run` processes share the real Redis,
and every session's client calls the API every 0.2 s, alternating between the replicas and
paying no attention to Retry-After. The provider notes when each refused token request came
(`token_outage_times`), each replica logs each grant that failed.

Asserted: at most one grant per probe interval (1 s) per process reaches the IdP during the
outage, once that process has had its first failure back (grants already on their way then
cannot be called back; their number is printed); when it is back — after 10 s and after
60 s — every session is served 200 within probe_interval + the IdP's latency (the slowest
refresh the replicas logged after the outage) + 0.5 s, with exactly one grant per session and
none lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.support.browse import browse
from tests.support.configs import config_dict, replica_configs
from tests.support.login import JSON, browser, session_cookie
from tests.support.ports import free_port
from tests.support.provider import ProviderHandle, set_outage
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import echo_app

SESSIONS = 50
REPLICAS = 2
ACCESS_TTL = 6  # s: whatever was refreshed before the outage expires within it
PROBE_INTERVAL = 1.0  # refresh.probe_interval's default
REFRESH = {"before_expiry": "2s", "idp_timeout": "2s", "lock_ttl": "3s", "wait_timeout": "2s"}
POLL = 0.2  # s between one client's calls
LOGINS_AT_ONCE = 10
JITTER = 0.05  # s: the log's clock (ms) and the grant's start against the probe's admission


@dataclass
class Cluster:
    provider: ProviderHandle
    replicas: list[SidecarProcess]
    public_url: str


async def start_cluster(oidc_provider: Any, sidecar_process: Any, upstream_app: Any) -> Cluster:
    """The provider, an echo upstream and REPLICAS sidecar processes on one Redis prefix."""
    data = config_dict()
    public_url = data["server"]["public_url"]
    provider = oidc_provider(public_url, access_token_ttl=ACCESS_TTL)
    data["upstreams"] = [{"path": "/", "url": await upstream_app(echo_app())}]
    data["public_paths"] = []
    data["oidc"] = provider.sidecar_oidc(public_url + "/")
    data["session"] = {**data["session"], "store": "redis"}
    data["redis"] = {"url": REDIS_URL, "key_prefix": f"breaker{free_port()}"}
    data["refresh"] = REFRESH
    replicas = [sidecar_process(config) for config in replica_configs(data, REPLICAS)]
    return Cluster(provider, replicas, public_url)


async def log_in(cluster: Cluster, n: int) -> list[str]:
    """n browser logins through the provider's form, LOGINS_AT_ONCE at a time."""
    gate = asyncio.Semaphore(LOGINS_AT_ONCE)

    async def one() -> str:
        # Set-up, not the contract: a login whose code exchange outran idp_timeout (2 s here)
        # on a loaded machine is tried again.
        tries = 3
        for _ in range(tries):
            async with gate, browser() as s:
                _, status, body = await browse(s, cluster.public_url + "/")
                if status == 200:
                    return session_cookie(s)
        raise AssertionError(f"login failed {tries} times: {status} {body}")

    return list(await asyncio.gather(*(one() for _ in range(n))))


def metrics_text(replica: SidecarProcess) -> str:
    with urllib.request.urlopen(replica.management + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def failed_grants(replica: SidecarProcess, since: float, until: float) -> list[tuple[float, float]]:
    """The replica's failed grants that left in [since, until): when each left and when it
    failed, from its "refresh failed" log lines (logged `duration_ms` after the grant left)."""
    grants = []
    for line in replica.logs().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("logger") == "sidecar.refresh" and entry.get("msg") == "refresh failed":
            failed = float(entry["ts"])
            left = failed - float(entry["duration_ms"]) / 1000
            if since <= left < until:
                grants.append((left, failed))
    return sorted(grants)


def slowest_refresh(replica: SidecarProcess, since: float) -> float:
    """The longest refresh (lock, re-read, grant, write) that ended after `since`, in seconds:
    the IdP's latency as the replica saw it under the recovery's load."""
    longest = 0.0
    for line in replica.logs().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            ours = entry.get("logger") == "sidecar.refresh" and entry.get("msg") == "refresh"
            if ours and entry["ts"] >= since:
                longest = max(longest, float(entry["duration_ms"]) / 1000)
    return longest


def most_in_a_window(times: list[float], window: float) -> int:
    """The most of `times` in any half-open interval of length `window`."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


@dataclass
class Polls:
    """Every answer, and per session when it was first served after the outage."""

    answers: list[tuple[int, int, float, str | None]] = field(default_factory=list)
    served: dict[int, float] = field(default_factory=dict)  # session -> s after the outage
    ended_at: float | None = None  # wall clock


async def poll(
    http: aiohttp.ClientSession, cluster: Cluster, cookies: list[str], polls: Polls, stop: float
) -> None:
    """Each session's client: a call every POLL s, alternating replicas, until it is served
    after the outage (or `stop`, wall clock)."""

    async def client(i: int, cookie: str) -> None:
        n = i
        headers = {**JSON, "Cookie": f"sidecar={cookie}"}
        await asyncio.sleep(random.uniform(0, POLL))  # clients are not in step
        while time.time() < stop:
            replica = cluster.replicas[n % REPLICAS]
            n += 1
            async with http.get(replica.url("/api"), headers=headers) as r:
                await r.read()
                done = time.time()
                polls.answers.append((i, r.status, done, r.headers.get("Retry-After")))
            if polls.ended_at is not None and r.status == 200 and done > polls.ended_at:
                polls.served[i] = done - polls.ended_at
                return
            await asyncio.sleep(POLL)

    await asyncio.gather(*(client(i, c) for i, c in enumerate(cookies)))


@pytest.mark.parametrize(
    ("mode", "seconds"),
    [("503", 10.0), ("reset", 10.0), ("503", 60.0)],
    ids=["503-10s", "reset-10s", "503-60s"],
)
async def test_outage_one_probe_per_second_per_process_then_everyone_back(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, mode: str, seconds: float
) -> None:
    """50 sessions on 2 replicas through a token-endpoint outage across their expiry."""
    cluster = await start_cluster(oidc_provider, sidecar_process, upstream_app)
    provider = cluster.provider
    cookies = await log_in(cluster, SESSIONS)
    polls = Polls()
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as http:
        began = time.time()
        await asyncio.to_thread(set_outage, provider, mode)
        clients = asyncio.create_task(poll(http, cluster, cookies, polls, began + seconds + 10))
        await asyncio.sleep(seconds)
        before = [metrics_text(p) for p in cluster.replicas]
        at_end = provider.stats()
        await asyncio.to_thread(set_outage, provider, "off")
        polls.ended_at = ended = time.time()
        await clients
    after = [metrics_text(p) for p in cluster.replicas]
    stats = provider.stats()

    # During the outage: answers are 200 (a still-valid token) or 503 + Retry-After: 1.
    during = [a for a in polls.answers if a[2] < ended]
    assert {a[1] for a in during} <= {200, 503}, Counter(a[1] for a in during)
    assert {a[3] for a in during if a[1] == 503} == {"1"}
    expired = [a for a in during if a[2] > began + ACCESS_TTL + 0.5]
    assert expired and {a[1] for a in expired} == {503}, Counter(a[1] for a in expired)

    # At most one grant per probe interval per process reached the failing IdP, once the
    # process had its first failure: grants already on their way then (sessions that fell
    # due within the same few milliseconds) cannot be called back.
    per_process = [failed_grants(p, began, ended) for p in cluster.replicas]
    first_failed = [min(failed for _, failed in grants) for grants in per_process]
    opening = [
        [left for left, _ in grants if left < first + JITTER]
        for grants, first in zip(per_process, first_failed, strict=True)
    ]
    steady = [
        [left for left, _ in grants if left >= first + JITTER]
        for grants, first in zip(per_process, first_failed, strict=True)
    ]
    hits = [t for t in at_end["token_outage_times"] if began <= t < ended]
    per_second = Counter(int(t - began) for t in hits)

    # Back: every session served within probe_interval + the IdP's latency + 0.5 s.
    name = "sidecar_idp_token_request_duration_seconds"
    grants = sum(
        sample(a, name + "_count") - sample(b, name + "_count")
        for a, b in zip(after, before, strict=True)
    )
    spent = sum(
        sample(a, name + "_sum") - sample(b, name + "_sum")
        for a, b in zip(after, before, strict=True)
    )
    mean = spent / grants if grants else 0.0
    latency = max(slowest_refresh(p, ended) for p in cluster.replicas)
    recovery = sorted(polls.served.values()) or [float("inf")]
    span = ended - began
    print(
        f"\n[breaker e2e] outage {mode} {seconds:.0f}s: IdP hits {len(hits)} "
        f"({len(hits) / span:.2f}/s, most in one second {max(per_second.values())}); per "
        f"process {[round(len(t) / span, 2) for t in per_process]}/s, at the opening "
        f"{[len(t) for t in opening]}; recovery median {statistics.median(recovery):.2f}s "
        f"max {recovery[-1]:.2f}s; IdP latency mean {mean * 1000:.0f}ms, slowest refresh "
        f"{latency * 1000:.0f}ms over {grants:g} grants"
    )
    for first, probes in zip(first_failed, steady, strict=True):
        assert not probes or probes[0] >= first + PROBE_INTERVAL - JITTER, (first, probes)
        assert most_in_a_window(probes, PROBE_INTERVAL - JITTER) <= 1, probes
    # Each refused request is a grant a replica logged as failed (give or take one in flight
    # at either end).
    assert abs(sum(len(t) for t in per_process) - len(hits)) <= REPLICAS, (per_process, hits)
    assert len(hits) >= REPLICAS * (seconds - ACCESS_TTL) / PROBE_INTERVAL - 2, hits  # probed
    assert len(polls.served) == SESSIONS, sorted(set(range(SESSIONS)) - set(polls.served))
    assert recovery[-1] <= PROBE_INTERVAL + latency + 0.5, recovery

    # Exactly one grant per session, none lost, no refresh token presented twice.
    new = stats["refresh_token_grants"][len(at_end["refresh_token_grants"]) :]
    assert len(new) == SESSIONS and len({g["grant_id"] for g in new}) == SESSIONS, new
    assert stats["grants"]["refresh_token"] - at_end["grants"].get("refresh_token", 0) == SESSIONS
    assert stats["reuse_detections"] == 0 and stats["revoked_grants"] == []
    assert not any(a[1] == 401 for a in polls.answers)
    # Each replica opened its breaker. One whose sessions were all served from records the
    # other had refreshed has had no due session since, so no probe to close it yet.
    opened = [sample(t, "sidecar_idp_breaker_transitions_total", '{state="open"}') for t in after]
    closed = [sample(t, "sidecar_idp_breaker_transitions_total", '{state="closed"}') for t in after]
    still_open = [sample(t, "sidecar_idp_breaker_open") for t in after]
    assert all(n >= 1 for n in opened), opened
    assert sum(closed) >= 1 and all(o == 1 - c for o, c in zip(still_open, closed, strict=True))
