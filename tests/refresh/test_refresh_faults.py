"""Refresh faults left out of `test_refresh_chaos` (issue 4 "Tests"; docs/refresh.md, steps 5-6).

Real sidecar processes, real Redis, the threaded dev IdP of this module (6-second access
tokens, rotation and reuse detection; the chaos timeline of tests/support/chaos.py) and the
verifying upstream (the `idp` and `upstream` fixtures):

- /token answers an unparsable 200 (a proxy's HTML page; a truncated JSON body);
- the IdP answers later than the lock TTL (it rotated at once, like a real IdP): the late
  answer is kept;
- Redis is killed and restarted (same port, fsync'd append-only file) during a refresh.

Each asserts what docs/refresh.md promises: one IdP call per attempt, never a retry of a call that
may have reached the IdP, a clean outcome (200, 401 or 503 with Retry-After; never a 500, a
hang or a forwarded token the IdP refuses) and no reuse detection the design does not accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import redis.asyncio as redis

from tests.support import chaos
from tests.support.chaos import DUE_AFTER, REFRESH, explain, login_known_exp
from tests.support.idp import ThreadedIdP, idp_stats, set_delay, set_garbage
from tests.support.login import login_cookie
from tests.support.redis_fleet import Fleet, RedisProcess
from tests.support.sidecars import StartProcess
from tests.support.stores import REDIS_URL
from tests.support.storm import (
    COOKIE,
    Result,
    StartReplicas,
    Storm,
    Target,
    burst,
    client,
    delta,
    new_storm,
    outcome,
    refresh_metrics,
    replica_config,
    statuses,
    targets_on,
)
from tests.support.upstreams import VerifyingUpstream

ACCESS_TTL = chaos.ACCESS_TTL  # the `idp` fixture's token lifetime: the chaos timeline's
BACKOFF_1 = 1.05  # seconds: the IdP breaker's next probe after a failure (probe_interval 1 s)


class EventLog:
    """Messages published on session channels, as (channel, kind), in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()

    def add(self, channel: str, kind: bytes) -> None:
        self.items.append((channel, kind))
        self._arrived.set()

    async def kinds(self, n: int, wait: float = 2.0) -> list[bytes]:
        """The kinds so far, once there are at least `n` or `wait` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while len(self.items) < n:
                    self._arrived.clear()
                    await self._arrived.wait()
        return [kind for _, kind in self.items]

    def channel(self, i: int) -> str:
        return self.items[i][0]


@asynccontextmanager
async def session_events(url: str, prefix: str) -> AsyncIterator[EventLog]:
    """Listen to the prefix's session channels (`p:ev:{h}`) as the replicas publish."""
    conn = redis.Redis.from_url(url)
    pubsub = conn.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(f"{prefix}:ev:*")
    log = EventLog()

    async def read() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "pmessage":
                log.add(message["channel"].decode(), message["data"])

    reader = asyncio.create_task(read())
    try:
        yield log
    finally:
        reader.cancel()
        await asyncio.wait({reader}, timeout=2.0)
        await pubsub.aclose()
        await conn.aclose()


async def answer(http: aiohttp.ClientSession, base: str, cookie: str) -> tuple[int, str, str]:
    """One API call: its status, its Retry-After header and its raw body text."""
    headers = {"Accept": "application/json", "Cookie": f"{COOKIE}={cookie}"}
    async with http.get(base + "/api/faults", headers=headers, allow_redirects=False) as r:
        return r.status, r.headers.get("Retry-After", ""), await r.text()


def outcomes(samples: list[dict[str, float]], name: str) -> float:
    """One refresh outcome, summed over the replicas."""
    return sum(outcome(m, name) for m in samples)


def assert_unavailable(results: list[Result]) -> None:
    """Token expired and the IdP unusable: 503, Retry-After, a short JSON body
    (docs/architecture.md, "Failure policy")."""
    for r in results:
        assert r.status == 503, (r.status, r.body)
        assert r.retry_after is not None and int(r.retry_after) >= 1, r.retry_after
        assert r.body is not None and r.body.get("error") == "refresh_unavailable", r.body


# --- 1. an unparsable token response --------------------------------------------------------


GARBAGE_DELAY = 0.5  # the broken answers are slow too, so that waiters gather at the lock


async def test_garbage_token_answer_is_transient(
    faulty_idp: ThreadedIdP,
    start_replicas: StartReplicas,
    redis_prefix: str,
) -> None:
    """An unparsable 200 from /token: one call, the IdP breaker opens, failure published,
    session kept; the waiters on the other replica send no grant of their own.

    An HTML page (no grant spent) leaves a session that refreshes at the next probe; a
    truncated JSON answer to an expired session gives 503 + Retry-After, and the rotation it
    hid ends the session cleanly (401) at the next attempt.

    Both parts are timed from the tokens' `exp`, not from the login: counted from the login,
    alice's token stayed usable for 0.7-1.6 s after the HTML burst, by where in its second
    the code exchange fell (the IdP's exp is whole seconds, the sidecar's margin 0.6 s).
    """
    idp = faulty_idp
    a, b = start_replicas(2, REFRESH)
    # One after the other: bob's exchange falls in a later second than alice's.
    alice, alice_exp = await login_known_exp(a, "alice")
    bob, bob_exp = await login_known_exp(a, "bob")
    ta = targets_on((a, b), alice)
    tb = targets_on((a, b), bob, "bob")
    storm = new_storm(ta + tb)
    async with client() as http, session_events(REDIS_URL, redis_prefix) as events:
        first = await storm._one(http, ta[0])
        assert first.status == 200 and first.ok
        old = first.token
        # Due (2.7 s left); the calls before the next probe come about 1.5 s before the sidecar's
        # margin before exp.
        await asyncio.sleep(max(0.0, alice_exp - ACCESS_TTL + DUE_AFTER - time.time()))

        # An HTML page in place of the token response, to 2 x 10 concurrent calls.
        set_delay(idp, GARBAGE_DELAY)
        set_garbage(idp, 1, "html")
        s0 = idp_stats(idp)
        t = storm.now()
        html = await burst(storm, http, ta, 10)
        longest = max(r.ended for r in html) - t
        during = await burst(storm, http, ta, 2)  # before the next probe
        s1 = idp_stats(idp)
        kinds = await events.kinds(1)
        print(
            f"[garbage html] {dict(statuses(html))} longest {longest:.2f}s (IdP {GARBAGE_DELAY}s)"
            f"; before the next probe {dict(statuses(during))}; token_requests "
            f"+{delta(s1, s0, 'token_requests')} grants +{delta(s1, s0, 'refresh_grants')}; "
            f"events {kinds}"
        )
        kept = all(r.status == 200 and r.ok and r.token == old for r in html + during)
        assert kept, explain(html + during, old, storm, alice_exp)
        assert delta(s1, s0, "token_requests") == 1  # never retried, by no waiter either
        assert delta(s1, s0, "refresh_grants") == 0
        assert kinds == [b"failed"]  # the waiters on the other replica were told
        assert longest < GARBAGE_DELAY + 1.0, "waiters did not stop at the published failure"

        # The session was kept: at the next probe it refreshes.
        set_delay(idp, 0.0)
        await asyncio.sleep(BACKOFF_1)
        after = await storm._one(http, ta[1])
        s2 = idp_stats(idp)
        assert after.status == 200 and after.ok and after.token != old, after
        assert delta(s2, s1, "refresh_grants") == 1
        kinds = await events.kinds(2)
        assert kinds == [b"failed", b"refreshed"] and events.channel(0) == events.channel(1)

        # A truncated JSON answer (the IdP did rotate) while bob's token has expired.
        await asyncio.sleep(max(0.0, bob_exp - time.time()))  # expired, at the IdP too
        set_delay(idp, GARBAGE_DELAY)
        set_garbage(idp, 1, "truncated_json")
        t = storm.now()
        cut = await burst(storm, http, tb, 10)
        longest = max(r.ended for r in cut) - t
        status, retry_after, text = await answer(http, b.base, bob)  # before the next probe
        s3 = idp_stats(idp)
        kinds = await events.kinds(3)
        print(
            f"[garbage truncated] expired token: {dict(statuses(cut))} Retry-After "
            f"{sorted({r.retry_after for r in cut})} longest {longest:.2f}s; before the next probe "
            f"{status}; token_requests +{delta(s3, s2, 'token_requests')} "
            f"grants +{delta(s3, s2, 'refresh_grants')}; events {kinds}"
        )
        assert_unavailable(cut)
        assert status == 503 and int(retry_after) >= 1, (status, text)
        assert "Traceback" not in text and "refresh_unavailable" in text, text
        assert delta(s3, s2, "token_requests") == 1
        assert delta(s3, s2, "refresh_grants") == 1  # rotated at the IdP, answer lost
        assert kinds[2:] == [b"failed"] and events.channel(2) != events.channel(0)
        assert longest < GARBAGE_DELAY + 1.0, "waiters did not stop at the published failure"

        # The next attempt presents the refresh token the IdP rotated away: a clean 401.
        set_delay(idp, 0.0)
        await asyncio.sleep(BACKOFF_1)
        ended = await burst(storm, http, tb, 3)
        s4 = idp_stats(idp)
        kinds = await events.kinds(4)
        assert {r.status for r in ended} == {401}, statuses(ended)
        assert delta(s4, s3, "token_requests") == 1
        assert delta(s4, s3, "reuse_detected") == 1
        assert kinds[3:] == [b"ended"] and events.channel(3) == events.channel(2)
    metrics = [await refresh_metrics(p.management) for p in (a, b)]
    print(
        f"[garbage] transient={outcomes(metrics, 'transient'):g} "
        f"unavailable={outcomes(metrics, 'unavailable'):g} "
        f"refreshed={outcomes(metrics, 'refreshed'):g} "
        f"lost_rotation={outcomes(metrics, 'invalid_grant_lost_rotation'):g}"
    )
    # The failure that left no usable token is counted as `unavailable` (answered 503) by
    # the holder, and by the other replica's refresh task that waited for it.
    assert outcomes(metrics, "transient") == 1
    assert 1 <= outcomes(metrics, "unavailable") <= 2
    assert outcomes(metrics, "refreshed") == 1
    assert outcomes(metrics, "invalid_grant_lost_rotation") == 1


# --- 2. an IdP slower than the lock TTL -------------------------------------------------------


# wait_timeout 1.5 s: the other replica's callers give up while the old token is still valid.
SLOW_REFRESH = {
    "before_expiry": "3s",
    "idp_timeout": "1s",
    "lock_ttl": "2s",
    "wait_timeout": "1.5s",
}
SLOW_DELAY = 3.0  # the IdP's answer: later than idp_timeout and than lock_ttl


async def test_idp_slower_than_lock_ttl(
    faulty_idp: ThreadedIdP,
    start_replicas: StartReplicas,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_prefix: str,
) -> None:
    """IdP answers after the lock TTL: callers give up at idp_timeout, the grant does not.

    The holder's callers answer at idp_timeout (1 s), the other replica's at wait_timeout
    (1.5 s), all with the still-valid token; the grant keeps running under the watchdog-held
    lock, its late answer is stored and used, and nobody presents the refresh token again:
    one grant, no reuse detection, the session kept (the refresh invariant, docs/architecture.md).

    The timeline is counted from the token's `exp`, not from the login: the IdP's `exp` is
    whole seconds (floor(issue time) + 6), up to 1 s before the code exchange + 6 s, and the
    sidecar rightly stops forwarding the token 0.6 s before it. Counted from the login, the
    waiting replica's answer at wait_timeout fell after that whenever the exchange happened
    late in its second (503 for that replica's callers, correctly).
    """
    idp = faulty_idp
    a, b = start_replicas(2, SLOW_REFRESH)
    cookie, exp = await login_known_exp(a, "alice")
    targets = targets_on((a, b), cookie)
    storm = new_storm(targets)
    async with client() as http:
        first = await storm._one(http, targets[1])
        assert first.status == 200 and first.ok
        # Due (2.7 s left, less than before_expiry 3 s); the last caller should answer at
        # wait_timeout, 1.2 s before exp: 0.6 s before the sidecar's margin.
        await asyncio.sleep(max(0.0, exp - ACCESS_TTL + DUE_AFTER - time.time()))

        set_delay(idp, SLOW_DELAY)
        s0 = idp_stats(idp)
        t = storm.now()
        slow = await burst(storm, http, targets, 20)
        shortest = min(r.ended for r in slow) - t
        longest = max(r.ended for r in slow) - t
        # Until the IdP has sent its late answer, well past the lock TTL.
        await asyncio.sleep(max(0.0, t + SLOW_DELAY + 0.3 - storm.now()))
        s1 = idp_stats(idp)
        async with redis.Redis.from_url(REDIS_URL) as conn:  # released, not left to expire
            lock_keys = [k async for k in conn.scan_iter(match=f"{redis_prefix}:lock:*")]
        set_delay(idp, 0.0)
        # The stored token counts from the grant's request time, so it is already due: the
        # next grant, with the late answer's refresh token, is an ordinary rotation.
        after = await burst(storm, http, targets, 10)
        s2 = idp_stats(idp)
        print(
            f"[IdP slower than lock TTL] {dict(statuses(slow))} callers answered after "
            f"{shortest:.2f}-{longest:.2f}s (idp_timeout 1s, wait_timeout 1.5s, lock_ttl 2s, "
            f"IdP {SLOW_DELAY}s); until the late answer token_requests "
            f"+{delta(s1, s0, 'token_requests')} grants +{delta(s1, s0, 'refresh_grants')}; "
            f"afterwards {dict(statuses(after))} grants +{delta(s2, s1, 'refresh_grants')} "
            f"reuse +{delta(s2, s0, 'reuse_detected')}"
        )
        kept = all(r.status == 200 and r.ok and r.token == first.token for r in slow)
        assert kept, explain(slow, first.token, storm, exp)
        assert shortest >= 1.0 and longest < 2.1, (shortest, longest)
        assert delta(s1, s0, "token_requests") == 1, "another replica called the IdP in turn"
        assert delta(s1, s0, "refresh_grants") == 1  # one grant for the one rotation
        assert lock_keys == []
        assert all(r.status == 200 and r.ok for r in after), statuses(after)
        assert first.token not in {r.token for r in after}
        assert delta(s2, s1, "refresh_grants") <= 1
        assert delta(s2, s0, "reuse_detected") == 0
    metrics = [await refresh_metrics(p.management) for p in (a, b)]
    assert outcomes(metrics, "refreshed_late") == 1
    assert outcomes(metrics, "transient") == 0
    assert outcomes(metrics, "invalid_grant_lost_rotation") == 0


# --- 3. Redis restarted during a refresh ------------------------------------------------------


KILL_AT = 0.3  # seconds into the grant: the IdP has rotated, its answer is on its way
LOST_REFRESH = {
    "before_expiry": "3s",
    "idp_timeout": "1.5s",
    "lock_ttl": "3s",
    "wait_timeout": "3s",
}
KEPT_REFRESH = {**LOST_REFRESH, "lock_ttl": "6s"}
RESTART_REFRESH = {**REFRESH, "idp_timeout": "3s"}


def persistent_replicas(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
    refresh: dict[str, str],
) -> tuple[RedisProcess, list[Any]]:
    """An own redis-server with an fsync'd append-only file, and two replicas on it."""
    server = redis_fleet.start("persistent", [], persist=True)
    replicas = []
    for _ in range(2):
        config = replica_config(idp, upstream.url, "restart", refresh)
        config["redis"] = {"url": f"redis://127.0.0.1:{server.port}/0", "key_prefix": "restart"}
        replicas.append(sidecar_process(config))
    return server, replicas


async def during_outage(
    storm: Storm, http: aiohttp.ClientSession, targets: list[Target], seconds: float
) -> list[Result]:
    """Waves of calls on `targets` for about `seconds`, while Redis is down."""
    results: list[Result] = []
    until = storm.now() + seconds
    while storm.now() < until:
        results += await burst(storm, http, targets, 5)
        await asyncio.sleep(0.05)
    return results


async def redis_outage_in_a_grant(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
    refresh: dict[str, str],
    answer_at: float,
    back_at: float,
) -> dict[str, Any]:
    """A refresh on replica 0 whose grant the IdP answers `answer_at` s after it left;
    Redis is killed 0.3 s into it and restarted `back_at` s into it (the session, lock and
    attempt mark survive in its append-only file). Replica 1 is called during the outage:
    its calls need Redis and never join replica 0's grant, so they end at once and the
    restart keeps to its time. Returns what each call got, with the IdP's and the
    replicas' counters."""
    server, replicas = persistent_replicas(idp, upstream, sidecar_process, redis_fleet, refresh)
    cookie = await login_cookie(replicas[0], "alice")
    issued = time.monotonic()
    targets = targets_on(replicas, cookie)
    storm = new_storm(targets)
    async with client(total=10.0) as http:
        first = await storm._one(http, targets[1])
        assert first.status == 200 and first.ok
        await asyncio.sleep(max(0.0, issued + DUE_AFTER - time.monotonic()))
        set_delay(idp, answer_at)
        s0 = idp_stats(idp)
        sent = time.monotonic()
        holder = asyncio.create_task(storm._one(http, targets[0]))
        await asyncio.sleep(KILL_AT)
        server.kill()
        outage = await during_outage(storm, http, targets[1:], back_at - KILL_AT - 0.3)
        await asyncio.sleep(max(0.0, sent + back_at - time.monotonic()))
        await asyncio.to_thread(redis_fleet.restart, server)
        back = time.monotonic() - sent
        set_delay(idp, 0.0)
        held = await holder
        later = await burst(storm, http, targets, 10)
        s1 = idp_stats(idp)
    metrics = [await refresh_metrics(p.management) for p in replicas]
    run = {
        "first": first,
        "held": held,
        "later": later,
        "back": back,
        "slowest": max(r.ended - r.started for r in [*outage, held, *later]),
        "token_requests": delta(s1, s0, "token_requests"),
        "grants": delta(s1, s0, "refresh_grants"),
        "reuse": delta(s1, s0, "reuse_detected"),
        "code_exchanges": delta(s1, s0, "code_exchanges"),
        "metrics": metrics,
    }
    print(
        f"[redis down {KILL_AT}-{back:.2f}s into a grant answered at {answer_at}s] outage "
        f"{dict(statuses(outage))}; holder {held.status}; after the restart "
        f"{dict(statuses(later))}; slowest request {run['slowest']:.2f}s; token_requests "
        f"+{run['token_requests']} grants +{run['grants']} reuse +{run['reuse']}; "
        f"refreshed={outcomes(metrics, 'refreshed'):g} "
        f"lost_rotation={outcomes(metrics, 'invalid_grant_lost_rotation'):g}"
    )
    assert outage and {r.status for r in outage} == {503}, statuses(outage)
    return run


async def test_redis_restarted_during_refresh(
    faulty_idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
) -> None:
    """Redis killed mid-grant and back before the answer: 503 meanwhile, then the new token.

    The holder's fenced write lands on the restarted server, so nobody logs in again and the
    IdP sees neither a second grant nor a reused refresh token.
    """
    run = await redis_outage_in_a_grant(
        faulty_idp, upstream, sidecar_process, redis_fleet, RESTART_REFRESH, 2.0, 0.9
    )
    assert run["back"] < 2.0, f"Redis back at {run['back']:.2f}s, after the IdP's answer"
    held, first = run["held"], run["first"]
    assert held.status == 200 and held.ok and held.token != first.token, held
    later = run["later"]
    assert all(r.status == 200 and r.ok and r.token == held.token for r in later), statuses(later)
    assert run["token_requests"] == 1 and run["grants"] == 1 and run["reuse"] == 0
    assert run["code_exchanges"] == 0
    assert run["slowest"] < 3.0 + 1.0, f"a request took {run['slowest']:.2f}s: beyond idp_timeout"
    assert outcomes(run["metrics"], "refreshed") == 1


async def test_redis_down_at_the_answer_back_while_locked(
    faulty_idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
) -> None:
    """Redis down when the IdP answers, back while the holder's lock still holds: the
    holder keeps the rotated tokens and writes them once Redis is back. Nobody logs in
    again, and the IdP sees one grant and no reuse."""
    run = await redis_outage_in_a_grant(
        faulty_idp, upstream, sidecar_process, redis_fleet, KEPT_REFRESH, 1.0, 1.8
    )
    assert run["back"] < 6.0 - 0.25 - 0.3, f"Redis back at {run['back']:.2f}s: too late"
    later, first = run["later"], run["first"]
    assert all(r.status == 200 and r.ok for r in later), statuses(later)
    assert len({r.token for r in later}) == 1 and later[0].token != first.token
    # The holder's own call waited idp_timeout (1.5 s), then went on with the old token
    # while it was still valid, or got 503: never the new one before Redis took it.
    held = run["held"]
    assert (held.status, held.ok) in {(200, True), (503, False)}, (held.status, held.body)
    assert run["token_requests"] == 1 and run["grants"] == 1 and run["reuse"] == 0
    assert outcomes(run["metrics"], "refreshed") == 1
    assert outcomes(run["metrics"], "invalid_grant_lost_rotation") == 0


async def test_redis_down_at_the_answer_until_the_lock_expired(
    faulty_idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
) -> None:
    """Redis down from before the IdP's answer until the holder's lock has expired: the
    rotation is lost, cleanly.

    The refresh invariant's one hole (docs/architecture.md): the new refresh token could not be
    stored while the lock held.
    Once Redis is back the next attempt meets reuse detection: 401, a lost rotation in the
    metrics, no 500, no hang.
    """
    run = await redis_outage_in_a_grant(
        faulty_idp, upstream, sidecar_process, redis_fleet, LOST_REFRESH, 1.0, 3.6
    )
    held = run["held"]
    assert (held.status, held.ok) in {(200, True), (503, False)}, (held.status, held.body)
    assert {r.status for r in run["later"]} == {401}, statuses(run["later"])
    assert run["grants"] == 1
    assert run["token_requests"] == 2  # the lost grant, then the one that met reuse
    assert run["reuse"] == 1
    assert outcomes(run["metrics"], "invalid_grant_lost_rotation") == 1
    assert run["back"] > 3.0, f"Redis back at {run['back']:.2f}s, before the lock expired"
    assert run["slowest"] < 3.6 + 3.0, f"a request took {run['slowest']:.2f}s"
