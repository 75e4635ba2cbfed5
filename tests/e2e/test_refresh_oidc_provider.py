"""Refresh against a certified OpenID provider, with every part a real process.

oidc-provider (Node) rotates refresh tokens and revokes the whole grant when a rotated one comes
back (reuse detection); the sidecar runs as 1 or 3 `python -m sidecar run` processes sharing the
real Redis; the upstream asks the provider's userinfo endpoint about every token it receives.
While the provider is frozen (SIGSTOP) userinfo cannot answer, so every forwarded token is also
checked against the provider's own ledger of issued access tokens and their `exp`.

These tests prove the refresh invariant (docs/architecture.md) end to end (one refresh grant
per rotation, no refresh token presented twice, every forwarded token accepted) across several
expiries, that a signing key rotation at the IdP is picked up without a restart, and the
failure policy's IdP-down rows for a token
endpoint that fails without processing grants, and for a provider frozen past the IdP timeout
(callers stop waiting; the one grant sent is kept open and its late answer stored), and that
a lock holder killed mid-grant is taken over within the lock's lease (docs/refresh.md, "The
lease"), with and without an IdP grace window for the previous refresh token.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.support.browse import browse
from tests.support.configs import config_dict, replica_configs
from tests.support.login import JSON, browser, session_cookie
from tests.support.provider import (
    ProviderHandle,
    set_outage,
    set_refresh_grace,
    set_slow_token_answers,
)
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import Serve, VerifyingUpstream


@dataclass
class Cluster:
    provider: ProviderHandle
    replicas: list[SidecarProcess]
    upstream: VerifyingUpstream
    public_url: str
    redis_prefix: str


async def start_cluster(
    oidc_provider: Callable[..., ProviderHandle],
    sidecar_process: Callable[..., SidecarProcess],
    upstream_app: Serve,
    redis_prefix: str,
    *,
    replicas: int,
    access_token_ttl: int,
    refresh: dict[str, str],
) -> Cluster:
    """Provider, verifying upstream, then `replicas` sidecar processes sharing one Redis prefix.

    Every replica has the same configuration (public URL, keys, Redis) apart from its ports:
    the browser's cookie (host 127.0.0.1, any port) reaches them all, as behind a balancer.
    """
    data = config_dict()
    public_url = data["server"]["public_url"]
    provider = oidc_provider(public_url, access_token_ttl=access_token_ttl)
    upstream = VerifyingUpstream(provider.metadata["userinfo_endpoint"], require_bearer=True)
    upstream_url = await upstream_app(upstream.app())
    data["upstreams"] = [{"path": "/", "url": upstream_url}]
    data["public_paths"] = []
    data["oidc"] = provider.sidecar_oidc(public_url + "/")
    data["session"] = {**data["session"], "store": "redis"}
    data["redis"] = {"url": REDIS_URL, "key_prefix": redis_prefix}
    data["refresh"] = refresh
    procs = [sidecar_process(config) for config in replica_configs(data, replicas)]
    return Cluster(provider, procs, upstream, public_url, redis_prefix)


async def log_in(cluster: Cluster) -> str:
    """A browser login through the provider's form; returns the session cookie's value."""
    async with browser() as s:
        hops, status, body = await browse(s, cluster.public_url + "/")
        assert status == 200, (hops, body, cluster.replicas[0].logs())
        return session_cookie(s)


@asynccontextmanager
async def api_client(cookie: str) -> AsyncIterator[aiohttp.ClientSession]:
    """An API client (JSON, no cookie jar) that always presents the session cookie."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={**JSON, "Cookie": f"sidecar={cookie}"},
        connector=aiohttp.TCPConnector(limit=0),
    ) as s:
        yield s


@dataclass
class Answer:
    replica: int
    status: int
    retry_after: str | None
    started: float
    body: bytes


async def call(s: aiohttp.ClientSession, cluster: Cluster, replica: int) -> Answer:
    started = time.time()
    url = cluster.replicas[replica].base + "/api"
    async with s.get(url, allow_redirects=False) as r:
        return Answer(replica, r.status, r.headers.get("Retry-After"), started, await r.read())


def metric(replica: SidecarProcess, name: str, labels: str = "") -> float:
    """One sample of a replica's Prometheus metrics (0 when absent)."""
    with urllib.request.urlopen(replica.management + "/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def failure_context(cluster: Cluster, answers: list[Answer] | None = None) -> str:
    """What a failed assertion should show: odd answers, provider counters, logs' tails."""
    odd = [a for a in answers or [] if a.status != 200][:5]
    stats = cluster.provider.stats()
    stats.pop("access_tokens", None)
    logs = "\n".join(p.logs()[-3000:] for p in cluster.replicas)
    return f"odd={odd}\nstats={json.dumps(stats)}\nsidecar logs:\n{logs}"


def assert_tokens_were_live(cluster: Cluster) -> None:
    """Every forwarded token was issued by the provider and had not expired on arrival."""
    ledger = {t["sha256"]: t["exp"] for t in cluster.provider.stats()["access_tokens"]}
    for seen in cluster.upstream.seen:
        assert seen.token_sha256 in ledger, "the upstream got a token the provider never issued"
        assert seen.at < ledger[seen.token_sha256], (
            f"forwarded {seen.at - ledger[seen.token_sha256]:.2f}s after the token's exp"
        )


STORM_TTL = 4  # s; the sidecar refreshes 2 s before expiry: a rotation every ~2 s
STORM_SECONDS = 8.0
STORM_WORKERS = 12
STORM_PAUSE = 0.1  # s between one worker's requests


@pytest.mark.parametrize("replicas", [1, 3], ids=["1-replica", "3-replicas"])
async def test_concurrent_requests_across_expiries_one_grant_per_rotation(
    oidc_provider: Any,
    sidecar_process: Any,
    upstream_app: Any,
    redis_prefix: str,
    replicas: int,
) -> None:
    """Hundreds of concurrent requests on one session, round-robin over the replicas, while
    the access token runs out several times: every answer is 200, every forwarded token is
    accepted by the provider, and the provider sees exactly one refresh grant per rotation
    with no rotated refresh token ever presented again (no reuse detection, no revocation)."""
    cluster = await start_cluster(
        oidc_provider,
        sidecar_process,
        upstream_app,
        redis_prefix,
        replicas=replicas,
        access_token_ttl=STORM_TTL,
        refresh={"before_expiry": "2s"},
    )
    cookie = await log_in(cluster)
    cluster.upstream.seen.clear()
    answers: list[Answer] = []
    started = time.monotonic()
    deadline = started + STORM_SECONDS

    async def worker(s: aiohttp.ClientSession, n: int) -> None:
        while time.monotonic() < deadline:
            answers.append(await call(s, cluster, n % replicas))
            n += 1
            await asyncio.sleep(STORM_PAUSE)

    async with api_client(cookie) as s:
        await asyncio.gather(*(worker(s, i) for i in range(STORM_WORKERS)))
    elapsed = time.monotonic() - started

    statuses = Counter(a.status for a in answers)
    assert statuses == {200: len(answers)}, (statuses, failure_context(cluster, answers))
    assert len(answers) >= 300, len(answers)
    assert Counter(a.replica for a in answers).keys() == set(range(replicas))
    seen = cluster.upstream.seen
    assert len(seen) == len(answers)
    assert all(x.userinfo_status == 200 and x.sub == "alice" for x in seen), [
        x for x in seen if x.userinfo_status != 200
    ][:3]
    assert_tokens_were_live(cluster)

    stats = cluster.provider.stats()
    grants = stats["grants"].get("refresh_token", 0)
    tokens = {x.token_sha256 for x in seen}
    # Each refresh grant is one rotation whose new token the requests then used.
    assert len(tokens) == grants + 1, (len(tokens), grants, failure_context(cluster))
    assert grants >= int(STORM_SECONDS // (STORM_TTL / 2)) - 1, failure_context(cluster)
    assert stats["refresh_tokens_consumed"] == grants
    assert stats["reuse_detections"] == 0
    assert stats["grant_errors"] == {} and stats["refresh_grant_errors"] == []
    assert stats["revoked_grants"] == [] and stats["server_errors"] == []
    # The replicas' own view: the refreshes they did add up to the provider's grant count.
    refreshed = [
        metric(p, "sidecar_refresh_total", '{outcome="refreshed"}') for p in cluster.replicas
    ]
    assert sum(refreshed) == grants, refreshed
    print(
        f"\nstorm replicas={replicas} requests={len(answers)} seconds={elapsed:.1f} "
        f"refresh_grants={grants} tokens={len(tokens)} reuse={stats['reuse_detections']} "
        f"refreshes_per_replica={refreshed}"
    )


def rotate_signing_keys(provider: ProviderHandle) -> list[str]:
    """The provider's test hook: a new key set replaces the old one; returns the new kids."""
    request = urllib.request.Request(provider.issuer + "/__test/rotate-keys", method="POST")
    with urllib.request.urlopen(request, timeout=5) as r:
        return list(json.loads(r.read())["kids"])


ROTATION_TTL = 4  # s; with before_expiry 2 s the first refresh is due 2 s after login


@pytest.mark.parametrize("first", ["refresh", "login"], ids=["refresh-first", "login-first"])
async def test_signing_key_rotation_picked_up_without_restart(
    oidc_provider: Any,
    sidecar_process: Any,
    upstream_app: Any,
    redis_prefix: str,
    first: str,
) -> None:
    """The provider replaces its signing keys (new kids, old ones gone from its JWKS). The
    running sidecar then accepts both a refresh whose response carries an ID token signed with
    the new key and a new login, by refetching the JWKS once on the unknown kid; whichever
    comes first triggers the refetch, and the existing session survives."""
    cluster = await start_cluster(
        oidc_provider,
        sidecar_process,
        upstream_app,
        redis_prefix,
        replicas=1,
        access_token_ttl=ROTATION_TTL,
        refresh={"before_expiry": "2s"},
    )
    provider = cluster.provider
    cookie = await log_in(cluster)
    logged_in = time.monotonic()
    async with api_client(cookie) as s:
        assert (await call(s, cluster, 0)).status == 200
    before = provider.stats()
    assert [t["kid"] for t in before["id_tokens"]] == [before["signing_kids"][0]]
    new_kids = rotate_signing_keys(provider)
    assert not set(new_kids) & set(before["signing_kids"])

    async def refresh() -> None:
        # The first request inside the refresh window refreshes: the grant returns an ID
        # token, which the sidecar validates (OIDC Core §12.2) with the new key.
        await asyncio.sleep(max(0.0, logged_in + ROTATION_TTL / 2 + 0.3 - time.monotonic()))
        async with api_client(cookie) as s:
            answer = await call(s, cluster, 0)
        assert answer.status == 200, failure_context(cluster, [answer])

    async def login() -> None:
        new_cookie = await log_in(cluster)
        assert new_cookie != cookie
        async with api_client(new_cookie) as s:
            answer = await call(s, cluster, 0)
        assert answer.status == 200, failure_context(cluster, [answer])

    steps = [refresh, login] if first == "refresh" else [login, refresh]
    for step in steps:
        await step()

    stats = provider.stats()
    issued = stats["id_tokens"][len(before["id_tokens"]) :]
    expected = ["refresh_token", "authorization_code"]
    assert [t["grant_type"] for t in issued] == (expected if first == "refresh" else expected[::-1])
    assert all(t["kid"] == new_kids[0] for t in issued), issued
    # One refetch on the unknown kid, shared by whatever came after it.
    assert stats["jwks_requests"] == before["jwks_requests"] + 1, stats["jwks_requests"]
    assert stats["grants"] == {"authorization_code": 2, "refresh_token": 1}
    assert stats["reuse_detections"] == 0 and stats["server_errors"] == []
    assert all(x.userinfo_status == 200 for x in cluster.upstream.seen)
    assert len({x.token_sha256 for x in cluster.upstream.seen}) == 3  # login, refresh, login
    # The session from before the rotation still works.
    async with api_client(cookie) as s:
        assert (await call(s, cluster, 0)).status == 200


OUTAGE_TTL = 10  # s; the sidecar stops forwarding a token min(1 s, lifetime / 10) before its
# expiry: at 10 s that 1 s covers oidc-provider's whole-second `exp` rounding, so a token the
# sidecar forwards is still live at the provider.
OUTAGE_REFRESH = {
    "before_expiry": "3s",
    "idp_timeout": "1s",
    "lock_ttl": "3s",
    "wait_timeout": "1s",
}
OUTAGE_FROM, OUTAGE_UNTIL = 6.0, 12.0  # s after login: refresh due at 7, token expires at 10
OUTAGE_WORKERS = 4
CALL_TIMEOUT = 10.0  # s; nothing may hang: the sidecar's IdP timeout is 1 s


@dataclass
class OutageRun:
    logged_in: float
    original: str  # sha256 of the access token from the login
    during: list[Answer]
    after: list[Answer]  # after the outage, until the first answer other than 503
    recovered_after: float


async def run_outage(
    cluster: Cluster, begin: Callable[[], None], end: Callable[[], None], *, frozen: bool
) -> OutageRun:
    """Log in, start the outage before the refresh window, keep it until after the token's
    expiry while OUTAGE_WORKERS clients call the API, end it, then call until not 503."""
    cookie = await log_in(cluster)
    logged_in = time.time()
    during: list[Answer] = []
    after: list[Answer] = []
    async with api_client(cookie) as s:

        async def timed_call() -> Answer:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await call(s, cluster, 0)

        first = await timed_call()
        assert first.status == 200
        original = json.loads(first.body)["token"]
        await asyncio.sleep(logged_in + OUTAGE_FROM - time.time())

        async def worker() -> None:
            while time.time() < logged_in + OUTAGE_UNTIL:
                during.append(await timed_call())
                await asyncio.sleep(0.2)

        # A frozen provider cannot answer userinfo either; the ledger check covers that time.
        cluster.upstream.verify = not frozen
        begin()
        try:
            await asyncio.gather(*(worker() for _ in range(OUTAGE_WORKERS)))
        finally:
            end()
        ended = time.time()
        cluster.upstream.verify = True
        while time.time() < ended + 15:
            after.append(await timed_call())
            if after[-1].status != 503:
                break
            await asyncio.sleep(0.2)
    return OutageRun(logged_in, original, during, after, time.time() - ended)


def assert_outage_answers(cluster: Cluster, run: OutageRun) -> None:
    """Failure policy (docs/architecture.md): IdP down, token still valid → forwarded; token
    expired → 503 + Retry-After; no other status, and no expired token forwarded."""
    context = failure_context(cluster, run.during + run.after)
    statuses = Counter(a.status for a in run.during)
    assert set(statuses) == {200, 503}, (statuses, context)
    for a in run.during + run.after:
        if a.status == 503:
            assert a.retry_after is not None and int(a.retry_after) >= 1, a
            assert json.loads(a.body)["error"] == "refresh_unavailable", a
    exp = {t["sha256"]: t["exp"] for t in cluster.provider.stats()["access_tokens"]}
    # Before the refresh window nothing needs the IdP; after the token's expiry only 503.
    window = run.logged_in + OUTAGE_TTL - 3
    assert all(a.status == 200 for a in run.during if a.started < window - 0.5), context
    assert all(a.status == 503 for a in run.during if a.started > exp[run.original]), context
    assert all(a.status == 503 for a in run.after[:-1]), context
    assert_tokens_were_live(cluster)


@pytest.fixture
async def outage_cluster(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> Cluster:
    """One replica, short tokens, the outage tests' refresh settings."""
    return await start_cluster(
        oidc_provider,
        sidecar_process,
        upstream_app,
        redis_prefix,
        replicas=1,
        access_token_ttl=OUTAGE_TTL,
        refresh=OUTAGE_REFRESH,
    )


@pytest.mark.parametrize("mode", ["503", "reset"], ids=["token-endpoint-503", "connection-reset"])
async def test_idp_token_endpoint_down_across_expiry_then_back(
    outage_cluster: Cluster, mode: str
) -> None:
    """The provider's token endpoint fails (503, or the connection dropped unanswered) from
    before the refresh window until after the access token expired, processing no grant.
    Meanwhile requests get 200 while the token is valid and 503 with Retry-After after that;
    once it is back the same session gets 200 with a fresh token the provider accepts, and no
    refresh token was ever presented twice."""
    cluster = outage_cluster
    provider = cluster.provider
    run = await run_outage(
        cluster,
        lambda: set_outage(provider, mode),
        lambda: set_outage(provider, "off"),
        frozen=False,
    )
    assert_outage_answers(cluster, run)
    context = failure_context(cluster, run.during + run.after)
    assert run.after[-1].status == 200, context
    assert json.loads(run.after[-1].body)["token"] != run.original
    assert all(x.userinfo_status == 200 for x in cluster.upstream.seen), context

    stats = provider.stats()
    assert stats["token_outage_hits"] >= 2, context  # it did try, and back off, meanwhile
    assert stats["grants"].get("refresh_token") == 1, context
    assert stats["reuse_detections"] == 0 and stats["grant_errors"] == {}, context
    assert stats["revoked_grants"] == [] and stats["server_errors"] == []
    print(
        f"\noutage={mode} answers={dict(Counter(a.status for a in run.during))} "
        f"refused_grants={stats['token_outage_hits']} recovered_after={run.recovered_after:.1f}s "
        f"after={[a.status for a in run.after]} refresh_grants={stats['grants']['refresh_token']}"
    )


async def test_idp_frozen_across_expiry_keeps_session(outage_cluster: Cluster) -> None:
    """The provider process is frozen (SIGSTOP: connections are accepted, nothing answers)
    from before the refresh window until after the access token expired. Meanwhile the answers
    are those of an IdP outage (200 while the token is valid, then 503 + Retry-After, never an
    expired token forwarded): callers stop waiting at the IdP timeout, but the one grant sent
    is not abandoned. Thawed, the provider answers it; the late answer is stored and the same
    session gets 200 with the rotated token: one grant, no refresh token presented twice, no
    reuse detection, no revocation (the refresh invariant, docs/architecture.md)."""
    cluster = outage_cluster
    provider = cluster.provider
    run = await run_outage(
        cluster,
        lambda: os.kill(provider.proc.pid, signal.SIGSTOP),
        lambda: os.kill(provider.proc.pid, signal.SIGCONT),
        frozen=True,
    )
    assert_outage_answers(cluster, run)
    context = failure_context(cluster, run.during + run.after)
    last = run.after[-1]
    assert last.status == 200, context
    assert json.loads(last.body)["token"] != run.original, context

    stats = provider.stats()
    assert stats["grants"].get("refresh_token") == 1, context
    assert stats["reuse_detections"] == 0, context
    assert stats["revoked_grants"] == [] and stats["server_errors"] == [], context
    replica = cluster.replicas[0]
    assert metric(replica, "sidecar_refresh_total", '{outcome="refreshed_late"}') == 1
    assert metric(replica, "sidecar_refresh_total", '{outcome="transient"}') == 0
    assert metric(replica, "sidecar_refresh_total", '{outcome="invalid_grant_lost_rotation"}') == 0
    assert metric(replica, "sidecar_refresh_total", '{outcome="invalid_grant_revoked"}') == 0
    print(
        f"\nfrozen answers={dict(Counter(a.status for a in run.during))} "
        f"after={[a.status for a in run.after]} recovered_after={run.recovered_after:.1f}s "
        f"refresh_grants={stats['grants']['refresh_token']} "
        f"reuse={stats['reuse_detections']} refresh_errors={stats['refresh_grant_errors']}"
    )


# --- the lock holder killed mid-grant ---------------------------------------------------------


DEAD_HOLDER_TTL = 12  # s; with before_expiry 6 s a refresh is due 6 s after login
# The default lease (lock_ttl 5 s), idp_timeout 10 s and wait_timeout 15 s.
DEAD_HOLDER_REFRESH = {"before_expiry": "6s"}
LEASE = 5.0
SLOW_ANSWER = 8.0  # s; the holder's grant is processed (rotated) at once, answered this late
KILL_INTO_GRANT = 1.0
IDP_GRACE = 30  # s; Okta's default grace period for the previous refresh token


@dataclass
class Timed:
    answer: Answer
    ended: float
    final: bool  # 401, or 200 with a token other than the login's


async def until_grant_processed(provider: ProviderHandle, grants: int) -> float:
    """When the provider had processed refresh grant number `grants + 1` (it rotated)."""
    deadline = time.time() + 5.0
    while provider.stats()["grants"].get("refresh_token", 0) == grants:
        assert time.time() < deadline, "the holder's grant never reached the provider"
        await asyncio.sleep(0.02)
    return time.time()


@pytest.mark.parametrize("grace", [True, False], ids=["idp-grace-30s", "no-grace"])
async def test_lock_holder_killed_mid_grant_others_answer_within_the_lease(
    oidc_provider: Any,
    sidecar_process: Any,
    upstream_app: Any,
    redis_prefix: str,
    grace: bool,
) -> None:
    """Three replicas; a due session; the provider processes the refresh grant at once but
    holds its answer back. The replica holding the lock is SIGKILLed 1 s into that grant,
    with requests waiting on the other two. The lease (5 s by default) lapses within 5 s of
    the kill, a waiter takes over, finds the dead holder's "grant sent" mark and sends the
    grant with the refresh token it has: every waiting request gets a final answer within
    the lease + 2 s of the kill (docs/refresh.md, "The lease").

    With an IdP that accepts the previous refresh token for 30 s the session survives: the
    upstream sees the old access token, then exactly one new one. Without that grace the
    rotation died with the holder: a clean 401 for every request, no 503 meanwhile, counted
    as a lost rotation (the refresh invariant's one hole, docs/architecture.md)."""
    cluster = await start_cluster(
        oidc_provider,
        sidecar_process,
        upstream_app,
        redis_prefix,
        replicas=3,
        access_token_ttl=DEAD_HOLDER_TTL,
        refresh=DEAD_HOLDER_REFRESH,
    )
    provider = cluster.provider
    if grace:
        set_refresh_grace(provider, IDP_GRACE)
    cookie = await log_in(cluster)
    logged_in = time.time()
    cluster.upstream.seen.clear()
    waiting: list[Timed] = []
    async with api_client(cookie) as s:
        first = [await call(s, cluster, i) for i in range(3)]
        assert [a.status for a in first] == [200, 200, 200], failure_context(cluster, first)
        original = json.loads(first[0].body)["token"]
        await asyncio.sleep(max(0.0, logged_in + DEAD_HOLDER_TTL - 6 + 0.3 - time.time()))

        set_slow_token_answers(provider, SLOW_ANSWER)
        grants = provider.stats()["grants"].get("refresh_token", 0)
        holder = asyncio.create_task(call(s, cluster, 0))
        sent = await until_grant_processed(provider, grants)
        killed = 0.0

        async def waiter(replica: int) -> None:
            """Calls until a final answer (200 with a new token, or 401) after the kill."""
            while True:
                async with asyncio.timeout(CALL_TIMEOUT * 2):
                    answer = await call(s, cluster, replica)
                final = answer.status == 401 or (
                    answer.status == 200 and json.loads(answer.body)["token"] != original
                )
                waiting.append(Timed(answer, time.time(), final))
                if killed and final:
                    return
                await asyncio.sleep(0.1)

        await asyncio.sleep(0.3)
        waiters = [asyncio.create_task(waiter(r)) for r in (1, 2, 1, 2)]
        await asyncio.sleep(max(0.0, sent + KILL_INTO_GRANT - time.time()))
        # Replicas 1 and 2 found the lock held: replica 0, the one that sent the grant, holds it.
        contention = [metric(p, "sidecar_refresh_lock_contention_total") for p in cluster.replicas]
        cluster.replicas[0].proc.kill()
        killed = time.time()
        set_slow_token_answers(provider, 0)
        await asyncio.gather(*waiters)
        with pytest.raises(aiohttp.ClientError):
            await holder
        later = [await call(s, cluster, r) for r in (1, 2)]

    context = failure_context(cluster, [t.answer for t in waiting] + later)
    # Per surviving replica: from the kill to its first final answer.
    answered = {
        r: min(t.ended for t in waiting if t.answer.replica == r and t.final and t.ended >= killed)
        - killed
        for r in (1, 2)
    }
    statuses = Counter(t.answer.status for t in waiting)
    stats = provider.stats()
    outcomes = {
        name: sum(
            metric(p, "sidecar_refresh_total", f'{{outcome="{name}"}}')
            for p in cluster.replicas[1:]
        )
        for name in ("refreshed", "invalid_grant_lost_rotation", "refreshed_elsewhere")
    }
    finals = ", ".join(f"replica {r}: {t:.2f}s" for r, t in answered.items())
    print(
        f"\n[dead holder, grace={grace}] killed {killed - sent:.2f}s into the grant; first "
        f"final answer {finals} after the kill (lease {LEASE:.0f}s); statuses "
        f"{dict(statuses)} later {[a.status for a in later]}; provider grants="
        f"{stats['grants'].get('refresh_token')} "
        f"grace_reuses={stats['refresh_grace_reuses']} reuse={stats['reuse_detections']}; "
        f"survivors' outcomes {outcomes}"
    )
    assert contention[0] == 0 and contention[1] >= 1 and contention[2] >= 1, contention
    assert set(statuses) <= {200, 401}, (statuses, context)  # no 503 while waiting
    for replica, seconds in answered.items():
        assert seconds <= LEASE + 2.0, (replica, seconds, context)
    if grace:
        new = {json.loads(t.answer.body)["token"] for t in waiting if t.answer.status == 200}
        new |= {json.loads(a.body)["token"] for a in later}
        assert new - {original} and len(new - {original}) == 1, (new, context)
        assert [a.status for a in later] == [200, 200], context
        seen: list[str] = []
        for x in cluster.upstream.seen:
            if not seen or seen[-1] != x.token_sha256:
                seen.append(x.token_sha256)
        assert len(seen) == 2, (seen, context)  # the old token, then exactly one new one
        assert all(x.userinfo_status == 200 for x in cluster.upstream.seen), context
        assert stats["refresh_grace_reuses"] >= 1 and stats["reuse_detections"] == 0, context
        assert stats["revoked_grants"] == [], context
        assert outcomes["refreshed"] == 1 and outcomes["invalid_grant_lost_rotation"] == 0
    else:
        assert statuses[200] == sum(1 for t in waiting if t.ended < killed), (statuses, context)
        assert all(t.answer.status == 401 for t in waiting if t.ended >= killed), context
        assert [a.status for a in later] == [401, 401], context
        assert stats["reuse_detections"] == 1 and stats["refresh_grace_reuses"] == 0, context
        assert outcomes["invalid_grant_lost_rotation"] == 1 and outcomes["refreshed"] == 0
    assert stats["server_errors"] == [], context
