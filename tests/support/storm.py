"""Refresh storms: concurrent authenticated API calls on sidecar replicas sharing one Redis.

The replicas are `auth-sidecar run` processes sharing one key prefix and encryption key,
logged in at a `ThreadedIdP` of the test module; the upstream is a `VerifyingUpstream` that
answers 502 to a token the IdP refuses. A `Storm` records every answer, so a test counts the
distinct access tokens (rotations) the IdP accepted and compares them with the IdP's grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.configs import config_dict
from tests.support.idp import ThreadedIdP
from tests.support.keys import TEST_KEY
from tests.support.sidecars import SidecarProcess, StartProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import VerifyingUpstream

__all__ = [
    "COOKIE",
    "REFRESH",
    "Result",
    "StartReplicas",
    "Storm",
    "Target",
    "assert_all_verified",
    "burst",
    "client",
    "delta",
    "new_storm",
    "outcome",
    "outcomes_of",
    "refresh_metrics",
    "replica_config",
    "start_replicas",
    "statuses",
    "summary",
    "targets_on",
]

# The storm tests' refresh settings (3-second tokens): due 1 s before expiry.
REFRESH = {"before_expiry": "1s", "idp_timeout": "2s", "lock_ttl": "6s", "wait_timeout": "5s"}
COOKIE = "sidecar"
MAX_REQUESTS = 40_000  # per storm; the duration bound is what normally ends a storm
REQUEST_TIMEOUT = 10.0


def replica_config(
    idp: ThreadedIdP, upstream: str, prefix: str, refresh: dict[str, str] | None = None
) -> dict[str, Any]:
    """One replica: its own ports, the shared Redis prefix and key, registered at `idp`."""
    data = config_dict(upstream, idp=idp, public_paths=[])
    data["session"] = {
        "store": "redis",
        "cookie_name": COOKIE,
        "cookie_secure": False,
        "encryption_keys": [TEST_KEY],
    }
    data["redis"] = {"url": REDIS_URL, "key_prefix": prefix}
    data["refresh"] = dict(refresh or REFRESH)
    data["logging"] = {"level": "info", "access_log": False}
    return data


def start_replicas(
    n: int,
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    prefix: str,
    start: StartProcess,
    refresh: dict[str, str] | None = None,
) -> list[SidecarProcess]:
    """`n` ready replicas sharing `prefix`, with `refresh` (the storm's settings by default)."""
    configs = [replica_config(idp, upstream.url, prefix, refresh) for _ in range(n)]
    return [start(c) for c in configs]


# The `start_replicas` fixture (tests/refresh/conftest.py): `start_replicas(n, refresh=None)`.
StartReplicas = Callable[..., list[SidecarProcess]]


@dataclass(frozen=True)
class Target:
    """Where a storm call goes: a replica's base URL, with one user's session cookie."""

    base: str
    cookie: str
    replica: int
    user: str


def targets_on(
    replicas: Iterable[SidecarProcess], cookie: str, user: str = "alice"
) -> list[Target]:
    """One session (`user`'s `cookie`) on each replica, in order: what a storm round-robins."""
    return [Target(p.base, cookie, i, user) for i, p in enumerate(replicas)]


@dataclass
class Result:
    """One storm call's answer, timed on the storm's clock."""

    target: Target
    started: float  # seconds since the storm began
    ended: float
    status: int  # 0: no HTTP answer (connection error or timeout)
    ok: bool = False
    sub: str | None = None
    token: str | None = None
    retry_after: str | None = None
    error: str | None = None
    body: dict[str, Any] | None = None  # kept for answers other than 200


@dataclass
class Storm:
    """Concurrent clients sending authenticated API calls until the duration or count runs out."""

    targets: list[Target]
    clients: int
    duration: float
    results: list[Result] = field(default_factory=list)
    t0: float = 0.0
    wall0: float = 0.0
    rotated: asyncio.Event = field(default_factory=asyncio.Event)  # set on each new token
    _seen: set[str] = field(default_factory=set)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall(self, t: float) -> float:
        """Wall-clock time of storm time `t` (the IdP and the sidecar use wall clocks)."""
        return self.wall0 + t

    async def run(self, during: Callable[[Storm], Awaitable[None]] | None = None) -> None:
        self.t0, self.wall0 = time.monotonic(), time.time()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=self.clients * 2)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
        ) as http:
            workers = [asyncio.create_task(self._client(http, i)) for i in range(self.clients)]
            side = asyncio.create_task(during(self)) if during else None
            try:
                await asyncio.gather(*workers)
            finally:
                if side is not None:
                    if not side.done():
                        side.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await side

    async def _client(self, http: aiohttp.ClientSession, i: int) -> None:
        n = i
        while self.now() < self.duration and len(self.results) < MAX_REQUESTS:
            targets = self.targets  # may be replaced while the storm runs (a replica died)
            target = targets[n % len(targets)]
            n += 1
            result = await self._one(http, target)
            self.results.append(result)
            if result.ok and result.token and result.token not in self._seen:
                self._seen.add(result.token)
                self.rotated.set()

    async def _one(self, http: aiohttp.ClientSession, target: Target) -> Result:
        started = self.now()
        headers = {"Accept": "application/json", "Cookie": f"{COOKIE}={target.cookie}"}
        try:
            async with http.get(
                target.base + "/api/storm", headers=headers, allow_redirects=False
            ) as r:
                body = await r.json() if r.content_type == "application/json" else {}
                return Result(
                    target,
                    started,
                    self.now(),
                    r.status,
                    ok=bool(body.get("ok")),
                    sub=body.get("sub"),
                    token=body.get("token"),
                    retry_after=r.headers.get("Retry-After"),
                    body=None if r.status == 200 else body,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Result(target, started, self.now(), 0, error=type(exc).__name__)

    def rotations(self) -> int:
        """Token changes seen, summed over the sessions: distinct tokens less one per session."""
        users = {r.target.user for r in self.results}
        return sum(len(self.tokens(u)) - 1 for u in users)

    def tokens(self, user: str | None = None) -> set[str]:
        """Distinct access tokens the IdP accepted, as the upstream saw them."""
        return {
            r.token
            for r in self.results
            if r.ok and r.token and (user is None or r.target.user == user)
        }


def new_storm(targets: list[Target]) -> Storm:
    """A storm whose clock runs from now, for tests that send their calls themselves."""
    storm = Storm(targets, clients=0, duration=0.0)
    storm.t0, storm.wall0 = time.monotonic(), time.time()
    return storm


async def burst(
    storm: Storm, http: aiohttp.ClientSession, targets: list[Target], per_target: int
) -> list[Result]:
    """`per_target` concurrent calls on each target, all at once."""
    calls = [storm._one(http, t) for t in targets for _ in range(per_target)]
    return list(await asyncio.gather(*calls))


def client(limit: int = 1000, total: float = 20.0) -> aiohttp.ClientSession:
    """An API client for bursts: many connections, no cookie jar (targets carry the cookie)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=total),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def statuses(results: Iterable[Result]) -> Counter[int]:
    return Counter(r.status for r in results)


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    """How much an IdP counter (`idp_stats`) grew."""
    return after[key] - before[key]


def summary(name: str, storm: Storm, before: dict[str, int], after: dict[str, int]) -> str:
    """One printed line of what a storm did and what the IdP counted meanwhile."""
    line = (
        f"[{name}] requests={len(storm.results)} clients={storm.clients} "
        f"replicas={len({r.target.replica for r in storm.results})} "
        f"statuses={dict(statuses(storm.results))} "
        f"grants={delta(after, before, 'refresh_grants')} rotations={storm.rotations()} "
        f"reuse={delta(after, before, 'reuse_detected')} "
        f"token_requests={delta(after, before, 'token_requests')} "
        f"userinfo={delta(after, before, 'userinfo_calls')} "
        f"elapsed={storm.now():.1f}s"
    )
    print(line)
    return line


_SAMPLE = re.compile(r"^(sidecar_refresh\w*)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


async def refresh_metrics(management: str) -> dict[str, float]:
    """The refresh-related samples of one replica's /metrics, keyed by name and labels."""
    async with aiohttp.ClientSession() as http, http.get(management + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not m.group(1).endswith(("_bucket", "_created")):
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def outcome(samples: dict[str, float], name: str) -> float:
    """The count of one `sidecar_refresh_total` outcome in `refresh_metrics` samples."""
    return samples.get(f'sidecar_refresh_total{{outcome="{name}"}}', 0.0)


def outcomes_of(samples: dict[str, float]) -> dict[str, float]:
    """Every `sidecar_refresh_total` outcome in `refresh_metrics` samples, by name (printed)."""
    prefix = "sidecar_refresh_total{"
    return {k.split('"')[1]: v for k, v in samples.items() if k.startswith(prefix)}


def assert_all_verified(results: list[Result]) -> None:
    """Every answer is 200 with a token the IdP accepted."""
    bad = [r for r in results if not (r.status == 200 and r.ok)]
    assert not bad, (
        f"{len(bad)} of {len(results)} not 200+ok: {dict(statuses(bad))}; first: {bad[:3]}"
    )
