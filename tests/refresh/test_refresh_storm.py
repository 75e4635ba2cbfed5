"""Refresh storms (the refresh invariant and the failure policy, docs/architecture.md) with
real processes and real Redis.

Sidecar replicas run as `auth-sidecar run` subprocesses sharing one Redis key prefix and
one encryption key; the module's dev IdP (3 s access tokens) and the verifying upstream run in
threads of this process (the `idp` and `upstream` fixtures). The upstream checks every Bearer
token it receives at the IdP's /userinfo endpoint and answers 502 if the IdP refuses it, so a
200 proves the forwarded token was accepted. It also returns a digest of the token, so the
test counts the distinct access tokens (rotations) it saw and compares them with the refresh
grants the IdP counted (tests/support/storm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import aiohttp

from tests.support.idp import (
    ThreadedIdP,
    idp_stats,
    set_token_failures,
    used_refresh_tokens_by_sub,
)
from tests.support.login import login_cookie
from tests.support.storm import (
    StartReplicas,
    Storm,
    Target,
    assert_all_verified,
    outcome,
    outcomes_of,
    refresh_metrics,
    statuses,
    summary,
    targets_on,
)

ACCESS_TTL = 3.0  # the `idp` fixture's token lifetime


# --- the tests ---------------------------------------------------------------------------


async def test_one_replica_storm_one_grant_per_rotation(
    idp: ThreadedIdP, start_replicas: StartReplicas
) -> None:
    """Twenty clients on one replica for 10 s: every call verified, one IdP grant per rotation."""
    (replica,) = start_replicas(1)
    cookie = await login_cookie(replica, "alice")
    before = idp_stats(idp)
    storm = Storm([Target(replica.base, cookie, 0, "alice")], clients=20, duration=10.0)
    await storm.run()
    after = idp_stats(idp)
    summary("one replica", storm, before, after)

    assert_all_verified(storm.results)
    grants = after["refresh_grants"] - before["refresh_grants"]
    assert after["reuse_detected"] == before["reuse_detected"]
    assert len(storm.tokens()) >= 4, "the storm should span at least 3 token expiries"
    assert grants == len(storm.tokens()) - 1
    assert after["code_exchanges"] == before["code_exchanges"]


async def test_three_replicas_share_one_rotation(
    idp: ThreadedIdP, start_replicas: StartReplicas
) -> None:
    """Thirty clients round-robin over three replicas for 12 s: still one grant per rotation."""
    replicas = start_replicas(3)
    cookie = await login_cookie(replicas[0], "alice")
    before = idp_stats(idp)
    targets = targets_on(replicas, cookie)
    storm = Storm(targets, clients=30, duration=12.0)
    await storm.run()
    after = idp_stats(idp)
    summary("three replicas", storm, before, after)

    metrics = [await refresh_metrics(p.management) for p in replicas]
    for i, samples in enumerate(metrics):
        outcomes = outcomes_of(samples)
        print(
            f"  replica {i}: refresh outcomes={outcomes} "
            f"lock_contention={samples.get('sidecar_refresh_lock_contention_total', 0):g} "
            f"singleflight_joins={samples.get('sidecar_refresh_singleflight_joins_total', 0):g}"
        )

    assert_all_verified(storm.results)
    per_replica = Counter(r.target.replica for r in storm.results)
    assert all(per_replica[i] > 0 for i in range(3)), per_replica
    grants = after["refresh_grants"] - before["refresh_grants"]
    assert after["reuse_detected"] == before["reuse_detected"]
    assert grants >= 3
    assert grants == len(storm.tokens()) - 1
    assert sum(outcome(m, "refreshed") for m in metrics) == grants
    assert any(
        outcome(m, "refreshed_elsewhere") > 0 or outcome(m, "already_fresh") > 0 for m in metrics
    ), "no replica ever used another replica's refresh: the shared lock was not exercised"
    assert any(m.get("sidecar_refresh_lock_contention_total", 0) > 0 for m in metrics)


async def test_several_sessions_on_three_replicas(
    idp: ThreadedIdP, start_replicas: StartReplicas
) -> None:
    """Alice, bob and carol storm three replicas at once: per session, grants equal rotations."""
    replicas = start_replicas(3)
    users = ("alice", "bob", "carol")
    cookies = {u: await login_cookie(replicas[i], u) for i, u in enumerate(users)}
    before, grants_before = idp_stats(idp), used_refresh_tokens_by_sub(idp)
    # Every (replica, user) pair, interleaved, so each client cycles through all of them.
    targets = [Target(p.base, cookies[u], i, u) for i, p in enumerate(replicas) for u in users]
    targets = [targets[(k * 4) % len(targets)] for k in range(len(targets))]
    storm = Storm(targets, clients=30, duration=9.0)
    await storm.run()
    after, grants_after = idp_stats(idp), used_refresh_tokens_by_sub(idp)
    summary("three sessions", storm, before, after)
    for u in users:
        n = sum(1 for r in storm.results if r.target.user == u)
        print(
            f"  {u}: requests={n} grants={grants_after[u] - grants_before[u]} "
            f"rotations={len(storm.tokens(u)) - 1}"
        )

    assert_all_verified(storm.results)
    assert all(r.sub == r.target.user for r in storm.results), "a response named another user"
    assert after["reuse_detected"] == before["reuse_detected"]
    for u in users:
        assert len(storm.tokens(u)) >= 3, u
        assert grants_after[u] - grants_before[u] == len(storm.tokens(u)) - 1, u
    assert storm.tokens("alice").isdisjoint(storm.tokens("bob") | storm.tokens("carol"))


async def test_idp_outage_then_recovery(idp: ThreadedIdP, start_replicas: StartReplicas) -> None:
    """A token-endpoint outage longer than a token's life: 200, then 503 + Retry-After, then 200."""
    replicas = start_replicas(2)
    cookie = await login_cookie(replicas[0], "alice")
    before = idp_stats(idp)
    targets = targets_on(replicas, cookie)
    outage: dict[str, float] = {}
    recovery_tail = 2.5  # after the first 200 following the outage, all must be 200

    async def break_idp(storm: Storm) -> None:
        await asyncio.sleep(0.5)
        set_token_failures(idp, 1_000_000)
        outage["start"] = storm.now()
        await asyncio.sleep(ACCESS_TTL + 0.5)
        set_token_failures(idp, 0)
        outage["end"] = storm.now()
        # Each replica's IdP breaker probes once per probe_interval (1 s); then a tail.
        deadline = storm.now() + 10.0
        while storm.now() < deadline:
            back = [r for r in storm.results if r.started > outage["end"] and r.status == 200]
            if back:
                outage["back"] = min(r.started for r in back)
                storm.duration = min(storm.duration, outage["back"] + recovery_tail)
                return
            await asyncio.sleep(0.1)
        storm.duration = storm.now()

    storm = Storm(targets, clients=10, duration=30.0)
    try:
        await storm.run(break_idp)
    finally:
        set_token_failures(idp, 0)
    after = idp_stats(idp)
    summary("IdP outage", storm, before, after)
    retry_after = Counter(r.retry_after for r in storm.results if r.status == 503)
    print(
        f"  outage {outage.get('start', 0):.1f}s-{outage.get('end', 0):.1f}s, "
        f"first 200 after it at {outage.get('back', float('nan')):.1f}s; "
        f"503s={sum(r.status == 503 for r in storm.results)} "
        f"Retry-After values={dict(retry_after)}"
    )

    counts = statuses(storm.results)
    assert set(counts) <= {200, 503}, counts  # never 500, never 401, never an upstream 502
    assert counts[200] + counts[503] == len(storm.results)
    assert all(r.ok for r in storm.results if r.status == 200)
    unavailable = [r for r in storm.results if r.status == 503]
    assert unavailable, "the outage outlasted the token: some calls must have got 503"
    assert all(r.retry_after and r.retry_after.isdigit() for r in unavailable)
    assert all(outage["start"] <= r.ended for r in unavailable)
    first_503 = min(r.started for r in unavailable)
    assert any(outage["start"] < r.started < first_503 and r.ok for r in storm.results), (
        "while the token was still valid, calls should have been forwarded"
    )
    assert "back" in outage, "the session never recovered after the IdP came back"
    # Requests sent within a few ms of the first 200 may reach a replica whose breaker is
    # still open and get 503 + Retry-After: correct, and not "after the recovery".
    tail = [r for r in storm.results if r.started >= outage["back"] + 0.1]
    assert tail and all(r.status == 200 for r in tail), statuses(tail)
    assert after["reuse_detected"] == before["reuse_detected"]
    assert after["code_exchanges"] == before["code_exchanges"], "no re-login happened"
    assert after["refresh_grants"] - before["refresh_grants"] == len(storm.tokens()) - 1


async def test_kill_9_replica_mid_storm(idp: ThreadedIdP, start_replicas: StartReplicas) -> None:
    """SIGKILL one of three replicas mid-storm: the survivors answer every call with 200."""
    replicas = start_replicas(3)
    cookie = await login_cookie(replicas[0], "alice")
    before = idp_stats(idp)
    victim = 1
    killed: dict[str, float] = {}

    async def kill_one(storm: Storm) -> None:
        # Kill right after a rotation is visible, so the victim holds no refresh half-way:
        # docs/architecture.md names a holder dying between grant and write as the one
        # unclosable hole.
        await asyncio.sleep(3.0)
        storm.rotated.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(storm.rotated.wait(), 2 * ACCESS_TTL)
        await asyncio.sleep(0.2)
        replicas[victim].proc.kill()
        killed["at"] = storm.now()
        storm.targets = [t for t in storm.targets if t.replica != victim]

    targets = targets_on(replicas, cookie)
    storm = Storm(targets, clients=30, duration=10.0)
    await storm.run(kill_one)
    after = idp_stats(idp)
    summary("kill -9", storm, before, after)
    assert replicas[victim].proc.wait(5) == -9
    survivors = [r for r in storm.results if r.target.replica != victim]
    victims = [r for r in storm.results if r.target.replica == victim]
    before_kill = [r for r in victims if r.ended < killed["at"]]
    print(
        f"  killed replica {victim} at {killed['at']:.1f}s; survivors: {len(survivors)} "
        f"{dict(statuses(survivors))}; victim: {dict(statuses(victims))}"
    )

    assert_all_verified(survivors)
    assert_all_verified(before_kill)
    after_kill = {r.token for r in survivors if r.started > killed["at"]}
    assert len(after_kill) >= 2, "the survivors should have rotated the token after the kill"
    assert after["reuse_detected"] == before["reuse_detected"]
    assert after["refresh_grants"] - before["refresh_grants"] == len(storm.tokens()) - 1


async def test_no_token_forwarded_past_its_exp(
    idp: ThreadedIdP, start_replicas: StartReplicas
) -> None:
    """With the token endpoint down, calls get 200 while the token is valid, then 503, never 502."""
    (replica,) = start_replicas(1)
    # The code exchange happens at 0.7 s past a whole second, so the IdP's exp (whole
    # seconds) lies ~0.7 s before issue time + expires_in: the overshoot is made certain.
    cookie = await login_cookie(replica, "alice", exchange_at_fraction=0.7)
    set_token_failures(idp, 1_000_000)
    storm = Storm([Target(replica.base, cookie, 0, "alice")], clients=1, duration=0.0)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            storm.t0, storm.wall0 = time.monotonic(), time.time()
            while storm.now() < ACCESS_TTL + 1.0:
                storm.results.append(await storm._one(http, storm.targets[0]))
                await asyncio.sleep(0.02)
    finally:
        set_token_failures(idp, 0)
    counts = statuses(storm.results)
    print(f"[expiry overshoot] sequential calls, token endpoint down: {dict(counts)}")
    assert counts[503] > 0
    assert all(r.ok for r in storm.results if r.status == 200)
    assert set(counts) <= {200, 503}, counts
