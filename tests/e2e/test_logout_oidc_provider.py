"""Back-channel logout (OpenID Connect Back-Channel Logout 1.0) from a certified OpenID
provider (`oidc-provider`, Node) to three sidecar replica processes sharing one Redis.

All three replicas are ONE client at the provider, whose `backchannel_logout_uri` is the first
replica's `/oauth2/backchannel-logout`: the provider posts its logout token there once, and the
Redis change feed spreads the end of the session to the other two, whose in-memory session
caches (`session.cache_ttl`, default 1 s) hold it. The user logs out at the provider itself
(its end_session endpoint, the confirmation form posted with logout=yes), never through the
sidecar's `/oauth2/sign_out`: the sidecar learns of the logout only through the back channel.

The browsers are aiohttp clients with cookie jars that follow every redirect by hand and fill in
the provider's login form (tests/support/browse.py); every replica has the same configuration
apart from its ports, so a session cookie (host-only on 127.0.0.1, any port) reaches them all,
as behind a balancer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from sidecar.session.record import session_hash
from tests.support.browse import HTML, browse
from tests.support.configs import config_dict, replica_configs
from tests.support.login import JSON, NAVIGATE, browser, session_cookie
from tests.support.provider import ProviderHandle
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import Serve

REPLICAS = 3
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"
BACKCHANNEL_PATH = "/oauth2/backchannel-logout"
BACKCHANNEL_METRIC = ("sidecar_logout_total", '{kind="backchannel"}')
MAX_LAG = 0.100  # s: every replica refuses the session this soon after the IdP is done
POLL_PAUSE = 0.002  # s between one poller's requests
POLL_AFTER = 0.2  # s the pollers go on after the IdP is done, once every replica refused
POLL_LIMIT = 2.0  # s after the IdP is done, the pollers stop whatever they saw
WS_TIMEOUT = 2.0  # s a websocket may take to be closed before the test gives up on it


# --- the upstream: JSON for any path, a websocket echo at /ws ---------------------------------


@dataclass
class UpstreamSocket:
    """One websocket the upstream accepted: whose (X-Forwarded-User) and how it ended."""

    user: str | None
    close_code: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Upstream:
    """Answers every request with who it was for; `/ws` echoes text frames as `echo:<text>`."""

    def __init__(self) -> None:
        self.sockets: list[UpstreamSocket] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.websocket)
        app.router.add_route("*", "/{tail:.*}", self.describe)
        return app

    async def describe(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"path": request.path, "user": request.headers.get("X-Forwarded-User")}
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen = UpstreamSocket(request.headers.get("X-Forwarded-User"))
        self.sockets.append(seen)
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await ws.send_str("echo:" + message.data)
        finally:
            seen.close_code = ws.close_code
            seen.ended.set()
        return ws


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    provider: ProviderHandle
    replicas: list[SidecarProcess]
    upstream: Upstream
    public_url: str

    def logs(self) -> str:
        """What a failed assertion should show: provider counters and every log's tail."""
        stats = self.provider.stats()
        stats.pop("access_tokens", None)
        sidecars = "\n".join(
            f"--- replica {i}\n{p.logs()[-3000:]}" for i, p in enumerate(self.replicas)
        )
        return f"provider stats={stats}\n{sidecars}\n--- provider\n{self.provider.logs()[-3000:]}"


async def start_cluster(
    oidc_provider: Callable[..., ProviderHandle],
    sidecar_process: Callable[..., SidecarProcess],
    upstream_app: Serve,
    redis_prefix: str,
) -> Cluster:
    """The provider (one client, its back-channel logout URI on replica 0), the upstream, then
    REPLICAS sidecar processes sharing one Redis prefix, with the admin API on."""
    data = config_dict()
    public_url = data["server"]["public_url"]  # replica 0 listens here
    provider = oidc_provider(
        public_url, client={"backchannel_logout_uri": public_url + BACKCHANNEL_PATH}
    )
    upstream = Upstream()
    upstream_url = await upstream_app(upstream.app())
    data["upstreams"] = [{"path": "/", "url": upstream_url}]
    data["public_paths"] = []
    data["oidc"] = provider.sidecar_oidc(public_url + "/")
    # cache_ttl stays at its default (1 s): each replica reuses the sessions it opened.
    data["session"] = {**data["session"], "store": "redis"}
    data["redis"] = {"url": REDIS_URL, "key_prefix": redis_prefix}
    data["admin"] = {"tokens": [ADMIN_TOKEN]}
    replicas = [sidecar_process(config) for config in replica_configs(data, REPLICAS)]
    cluster = Cluster(provider, replicas, upstream, public_url)
    await until_caching(cluster)
    return cluster


async def until_caching(cluster: Cluster) -> None:
    """Wait until every replica follows the change feed, so it reuses the sessions it opens
    (ready does not wait for that: until then a replica reads every session from Redis)."""
    deadline = time.monotonic() + 5
    async with aiohttp.ClientSession() as s:
        while True:
            live = [await metric(s, p, "sidecar_session_cache_live", "") for p in cluster.replicas]
            if live == [1.0] * REPLICAS:
                return
            assert time.monotonic() < deadline, (live, cluster.logs())
            await asyncio.sleep(0.02)


async def log_in(cluster: Cluster, s: aiohttp.ClientSession, user: str = "alice") -> str:
    """A browser login through the provider's form in jar `s`; the session cookie's value."""
    hops, status, body = await browse(s, cluster.public_url + "/", login=user)
    assert status == 200, (hops, body, cluster.logs())
    return session_cookie(s)


@asynccontextmanager
async def cookie_client(cookie: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar that always presents the session cookie."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"Cookie": f"sidecar={cookie}"},
        connector=aiohttp.TCPConnector(limit=0),
    ) as s:
        yield s


async def api_status(s: aiohttp.ClientSession, replica: SidecarProcess) -> int:
    async with s.get(replica.url("/api"), headers=JSON, allow_redirects=False) as r:
        await r.read()
        return r.status


async def statuses(cookie: str, cluster: Cluster) -> list[int]:
    """What each replica answers an API request with this cookie."""
    async with cookie_client(cookie) as s:
        return [await api_status(s, replica) for replica in cluster.replicas]


async def metric(
    s: aiohttp.ClientSession, replica: SidecarProcess, name: str, labels: str
) -> float:
    """One sample of a replica's Prometheus metrics (0 when absent)."""
    async with s.get(replica.management + "/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def backchannel_logouts(cluster: Cluster) -> list[float]:
    """`sidecar_logout_total{kind="backchannel"}` of each replica."""
    async with aiohttp.ClientSession() as s:
        return [await metric(s, p, *BACKCHANNEL_METRIC) for p in cluster.replicas]


async def sessions_listed(cluster: Cluster, sub: str, replica: int = 0) -> list[dict[str, Any]]:
    """The admin API's listing of `sub`'s live sessions, from one replica."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            cluster.replicas[replica].management + "/admin/sessions",
            params={"sub": sub},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return list((await r.json())["sessions"])


async def provider_stats(provider: ProviderHandle) -> dict[str, Any]:
    """The provider's counters, without blocking the event loop (the pollers run on it)."""
    async with aiohttp.ClientSession() as s, s.get(provider.issuer + "/__test/stats") as r:
        return dict(await r.json())


async def wait_backchannel_delivered(cluster: Cluster, count: int) -> dict[str, Any]:
    """Poll the provider until it counts `count` successful back-channel deliveries."""
    deadline = time.monotonic() + 5
    while True:
        stats = await provider_stats(cluster.provider)
        if stats["backchannel_success"] >= count or stats["backchannel_errors"]:
            break
        assert time.monotonic() < deadline, cluster.logs()
        await asyncio.sleep(0.01)
    assert stats["backchannel_errors"] == [], cluster.logs()
    assert stats["backchannel_success"] == count, cluster.logs()
    return stats


# --- logging out at the provider ---------------------------------------------------------------


@dataclass
class IdPLogout:
    """The provider's logout confirmation, ready to be posted (the moment of logout)."""

    action: str
    form: dict[str, str]


async def idp_logout_form(s: aiohttp.ClientSession, provider: ProviderHandle) -> IdPLogout:
    """RP-initiated logout at the provider, in the browser of jar `s`: its end_session page
    (no id_token_hint: the browser does not have the ID token, the sidecar keeps it), whose
    form a test posts with logout=yes to end the whole IdP session."""
    end_session = provider.metadata["end_session_endpoint"]
    async with s.get(
        end_session, params={"client_id": provider.client_id}, headers=HTML, allow_redirects=False
    ) as r:
        page = await r.text()
        assert r.status == 200, page
    action = re.search(r'<form id="op.logoutForm" method="post" action="([^"]+)"', page)
    xsrf = re.search(r'name="xsrf" value="([^"]+)"', page)
    assert action and xsrf, page
    return IdPLogout(
        urljoin(end_session, action.group(1)), {"xsrf": xsrf.group(1), "logout": "yes"}
    )


async def confirm_idp_logout(s: aiohttp.ClientSession, logout: IdPLogout) -> None:
    """Post the confirmation: oidc-provider sends its back-channel logout tokens and answers
    the browser (303) only once every one of them was answered (lib/actions/end_session.js
    awaits them all), so the sidecar has answered the back channel by the time this returns."""
    async with s.post(logout.action, data=logout.form, headers=HTML, allow_redirects=False) as r:
        body = await r.text()
        assert r.status == 303, body
        assert "/session/end/success" in r.headers["Location"], r.headers["Location"]


async def idp_logout(s: aiohttp.ClientSession, cluster: Cluster) -> None:
    await confirm_idp_logout(s, await idp_logout_form(s, cluster.provider))


async def until_refused(cookie: str, cluster: Cluster, within: float = 2.0) -> None:
    """Wait until every replica answers the cookie with 401 (nothing cached is served)."""
    deadline = time.monotonic() + within
    while (found := await statuses(cookie, cluster)) != [401] * REPLICAS:
        assert time.monotonic() < deadline, (found, cluster.logs())
        await asyncio.sleep(0.01)


# --- polling the replicas ----------------------------------------------------------------------


@dataclass
class Poll:
    """One request of a poller: an API call (JSON) or a page load (navigation)."""

    replica: int
    navigation: bool
    sent: float  # time.monotonic()
    received: float
    status: int
    location: str | None

    @property
    def served(self) -> bool:
        return self.status == 200

    @property
    def refused(self) -> bool:
        """Sent to log in: a navigation to /oauth2/start, an API call 401."""
        if self.navigation:
            return self.status == 302 and (self.location or "").startswith("/oauth2/start?")
        return self.status == 401


async def poll(
    s: aiohttp.ClientSession, cluster: Cluster, replica: int, polls: list[Poll], stop: asyncio.Event
) -> None:
    """Ask one replica about the session every POLL_PAUSE, API calls and page loads in turn."""
    url = cluster.replicas[replica].url("/app/page")
    navigation = False
    while not stop.is_set():
        sent = time.monotonic()
        async with s.get(url, headers=NAVIGATE if navigation else JSON, allow_redirects=False) as r:
            await r.read()
            polls.append(
                Poll(
                    replica, navigation, sent, time.monotonic(), r.status, r.headers.get("Location")
                )
            )
        navigation = not navigation
        await asyncio.sleep(POLL_PAUSE)


@dataclass
class Refusal:
    """When one replica stopped serving the session, relative to the logout."""

    replica: int
    polls: int
    after_trigger: float  # s from posting the logout confirmation to the first refusal seen
    after_done: float  # s from the provider's answer (back channel delivered) to it
    last_served: float  # s from the provider's answer to the sending of the last 200

    def __str__(self) -> str:
        return (
            f"replica {self.replica}: first refusal {self.after_trigger * 1000:+.1f} ms after "
            f"the logout was posted, {self.after_done * 1000:+.1f} ms after the IdP was done; "
            f"last 200 sent {self.last_served * 1000:+.1f} ms after it ({self.polls} polls)"
        )


def refusal_of(replica: int, polls: list[Poll], triggered: float, done: float) -> Refusal:
    """Served until some answer, refused from that one on (never served again)."""
    assert polls, f"replica {replica} was never polled"
    first = next((i for i, p in enumerate(polls) if not p.served), None)
    assert first is not None, f"replica {replica} still served the session {POLL_LIMIT}s later"
    assert polls[first].sent > triggered, (
        f"replica {replica} refused the session before the logout: {polls[first]}"
    )
    wrong = [p for p in polls[first:] if not p.refused]
    assert not wrong, f"replica {replica}, after its first refusal: {wrong[:3]}"
    last_served = polls[first - 1].sent if first else float("-inf")
    return Refusal(
        replica,
        len(polls),
        polls[first].received - triggered,
        polls[first].received - done,
        last_served - done,
    )


# --- the tests ---------------------------------------------------------------------------------


async def test_backchannel_logout_ends_cached_session_on_every_replica_within_100ms(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """alice's session is in use on all three replicas (each holds it in its session cache)
    when she logs out at the provider. Every replica refuses her cookie (API call 401, page load
    302 to login) within 100 ms of the provider being done, and never serves it again; the
    replica the provider posted to counts one back-channel logout.

    Measurement: one poller per replica asks it about the session from before the logout
    until after every replica refused, API calls and page loads in turn, each request 2 ms
    after the previous answer (with the round trip through the sidecar to the test's upstream,
    one request per replica every ~5-20 ms), which also keeps each replica's cache warm.
    `triggered` is when the test posts the provider's logout confirmation; `done` is when the
    provider's answer to it arrives. oidc-provider answers only after its back-channel POST
    was answered (lib/actions/end_session.js awaits it), so the sidecar answered the back
    channel within [triggered, done], and `done` is the latest moment "the back channel was
    delivered" can mean. A replica's refusal time is when its first refused answer ARRIVED, a
    late bound (the replica decided before). Asserted: max(refusal) - done < 100 ms; for each
    replica, every answer before its first refusal a 200 and no refusal sent before
    `triggered`, every answer after it a refusal. A replica that kept serving from its cache
    until `cache_ttl` ran out would show up as up to ~1 s. Printed: each replica's refusal
    relative to `triggered` and to `done`, and when it last served (the sending of its last
    200, relative to `done`)."""
    cluster = await start_cluster(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    async with browser() as alice:
        cookie = await log_in(cluster, alice)
        logout = await idp_logout_form(alice, cluster.provider)
        before = await backchannel_logouts(cluster)

        polls: list[list[Poll]] = [[] for _ in cluster.replicas]
        stop = asyncio.Event()
        async with cookie_client(cookie) as s:
            pollers = [
                asyncio.create_task(poll(s, cluster, i, polls[i], stop)) for i in range(REPLICAS)
            ]
            try:
                # Warm: every replica has served the session a few times (and cached it).
                deadline = time.monotonic() + 5
                while min(len(p) for p in polls) < 10:
                    assert time.monotonic() < deadline and all(not t.done() for t in pollers)
                    await asyncio.sleep(0.01)
                assert all(p.served for log in polls for p in log), [
                    p for log in polls for p in log if not p.served
                ][:3]

                triggered = time.monotonic()
                await confirm_idp_logout(alice, logout)
                done = time.monotonic()
                stats = await wait_backchannel_delivered(cluster, 1)

                while time.monotonic() < done + POLL_LIMIT:
                    if time.monotonic() > done + POLL_AFTER and all(
                        log and not log[-1].served for log in polls
                    ):
                        break
                    assert all(not t.done() for t in pollers), [t for t in pollers if t.done()]
                    await asyncio.sleep(0.01)
            finally:
                stop.set()
                await asyncio.gather(*pollers)

    refusals = [refusal_of(i, log, triggered, done) for i, log in enumerate(polls)]
    print(f"\nIdP logout confirmation answered {(done - triggered) * 1000:.1f} ms after posting")
    for refusal in refusals:
        print(refusal)
    lag = max(r.after_done for r in refusals)
    print(f"slowest replica: {lag * 1000:+.1f} ms after the IdP was done")
    assert lag < MAX_LAG, ([str(r) for r in refusals], cluster.logs())
    # Both kinds of request were refused, each in its own way.
    after = [p for log in polls for p in log if p.sent > done + MAX_LAG]
    assert {p.navigation for p in after} == {True, False}

    assert stats["end_sessions"] == 1 and stats["server_errors"] == []
    assert await statuses(cookie, cluster) == [401] * REPLICAS
    assert await sessions_listed(cluster, "alice") == []
    # Only the replica the provider posted to ended (and counted) the session.
    after_metrics = await backchannel_logouts(cluster)
    assert [a - b for a, b in zip(after_metrics, before, strict=True)] == [1, 0, 0], after_metrics


async def test_backchannel_logout_closes_websockets_of_the_session_only(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """alice and bob each have a websocket open through every replica. When alice logs out at
    the provider, the sidecar closes each of her websockets with 1008 (policy violation) on
    both sides, on the replica the provider posted to and on the two that learn of it through
    the change feed; bob's websockets stay open and keep working."""
    cluster = await start_cluster(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    async with browser() as alice, browser() as bob:
        alice_cookie = await log_in(cluster, alice, "alice")
        bob_cookie = await log_in(cluster, bob, "bob")
        logout = await idp_logout_form(alice, cluster.provider)
        async with cookie_client(alice_cookie) as a, cookie_client(bob_cookie) as b:
            alice_ws = [await a.ws_connect(p.url("/ws")) for p in cluster.replicas]
            bob_ws = [await b.ws_connect(p.url("/ws")) for p in cluster.replicas]
            reads: list[asyncio.Task[aiohttp.WSMessage]] = []
            try:
                for ws in alice_ws + bob_ws:
                    await ws.send_str("hello")
                    assert (await ws.receive(timeout=WS_TIMEOUT)).data == "echo:hello"
                users = sorted(str(x.user) for x in cluster.upstream.sockets)
                assert users == ["alice"] * REPLICAS + ["bob"] * REPLICAS, users

                # Each of alice's websockets is read from before the logout, and the arrival
                # of what it reads (its close frame) timed.
                arrived: dict[int, float] = {}

                async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
                    message = await ws.receive(timeout=WS_TIMEOUT + 5)
                    arrived[i] = time.monotonic()
                    return message

                reads = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(alice_ws)]
                triggered = time.monotonic()
                await confirm_idp_logout(alice, logout)
                done = time.monotonic()
                await wait_backchannel_delivered(cluster, 1)
                messages = await asyncio.wait_for(asyncio.gather(*reads), WS_TIMEOUT)

                for i, (ws, message) in enumerate(zip(alice_ws, messages, strict=True)):
                    assert message.type is WSMsgType.CLOSE, (i, message, cluster.logs())
                    assert message.data == 1008, (i, message)
                    assert message.extra == "session ended", (i, message)
                    assert ws.close_code == 1008, (i, ws.close_code)
                closed_after = [arrived[i] - done for i in range(REPLICAS)]
                print(
                    f"\nIdP logout answered {(done - triggered) * 1000:.1f} ms after posting; "
                    "alice's websockets got their 1008 close frame at "
                    + ", ".join(f"{t * 1000:+.1f} ms" for t in closed_after)
                    + " after it (replicas 0, 1, 2)"
                )
                assert all(arrived[i] > triggered for i in range(REPLICAS))
                assert max(closed_after) < MAX_LAG, (closed_after, cluster.logs())

                # The upstream side of each of alice's websockets was closed with 1008 too.
                theirs = [x for x in cluster.upstream.sockets if x.user == "alice"]
                for x in theirs:
                    await asyncio.wait_for(x.ended.wait(), WS_TIMEOUT)
                assert [x.close_code for x in theirs] == [1008] * REPLICAS

                # bob's stay open and keep working, also a while after the logout.
                await asyncio.sleep(0.3)
                for i, ws in enumerate(bob_ws):
                    assert not ws.closed, (i, ws.close_code)
                    await ws.send_str(f"still there {i}")
                    message = await ws.receive(timeout=WS_TIMEOUT)
                    assert message.data == f"echo:still there {i}", message
                assert not any(
                    x.ended.is_set() for x in cluster.upstream.sockets if x.user == "bob"
                )
                assert await statuses(bob_cookie, cluster) == [200] * REPLICAS
                assert await statuses(alice_cookie, cluster) == [401] * REPLICAS
                # A new websocket of the ended session is refused before the upgrade.
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await a.ws_connect(cluster.replicas[1].url("/ws"), headers=JSON)
                assert refused.value.status == 401
            finally:
                for task in reads:
                    task.cancel()
                await asyncio.gather(*reads, return_exceptions=True)
                for ws in alice_ws + bob_ws:
                    await ws.close()


async def test_backchannel_logout_ends_only_the_idp_session_that_logged_out(
    oidc_provider: Any, sidecar_process: Any, upstream_app: Any, redis_prefix: str
) -> None:
    """alice is logged in twice, in two browsers: two IdP sessions, so two `sid`s. Her logout
    at the provider in the first browser ends the sidecar session of that IdP session only
    (the provider's logout token names the `sid`): the second browser's session keeps working
    on every replica, and the admin API lists it alone. Then the second browser logs out too,
    and alice has no session left; bob's is never touched."""
    cluster = await start_cluster(oidc_provider, sidecar_process, upstream_app, redis_prefix)
    async with browser() as first, browser() as second, browser() as bob:
        first_cookie = await log_in(cluster, first)
        second_cookie = await log_in(cluster, second)
        bob_cookie = await log_in(cluster, bob, "bob")
        first_id, second_id = session_hash(first_cookie), session_hash(second_cookie)
        for cookie in (first_cookie, second_cookie, bob_cookie):
            assert await statuses(cookie, cluster) == [200] * REPLICAS

        listed = {s["id"]: s for s in await sessions_listed(cluster, "alice")}
        assert set(listed) == {first_id, second_id}, listed
        assert all(
            s["sub"] == "alice" and s["iss"] == cluster.provider.issuer for s in listed.values()
        )
        first_sid, second_sid = listed[first_id]["sid"], listed[second_id]["sid"]
        assert first_sid and second_sid and first_sid != second_sid, listed
        before = await backchannel_logouts(cluster)

        await idp_logout(first, cluster)
        await wait_backchannel_delivered(cluster, 1)
        await until_refused(first_cookie, cluster)
        assert await statuses(second_cookie, cluster) == [200] * REPLICAS, cluster.logs()
        assert await statuses(bob_cookie, cluster) == [200] * REPLICAS
        # Every replica's admin API sees the same store: the second session alone remains.
        for replica in range(REPLICAS):
            remaining = await sessions_listed(cluster, "alice", replica)
            assert [(s["id"], s["sid"]) for s in remaining] == [(second_id, second_sid)], remaining
        assert [s["sub"] for s in await sessions_listed(cluster, "bob")] == ["bob"]
        middle = await backchannel_logouts(cluster)
        assert [a - b for a, b in zip(middle, before, strict=True)] == [1, 0, 0], middle

        # The second IdP session logs out too: a second logout token, for its own sid.
        await idp_logout(second, cluster)
        stats = await wait_backchannel_delivered(cluster, 2)
        await until_refused(second_cookie, cluster)
        assert await sessions_listed(cluster, "alice") == []
        assert await statuses(bob_cookie, cluster) == [200] * REPLICAS
        assert [s["sub"] for s in await sessions_listed(cluster, "bob")] == ["bob"]
        after = await backchannel_logouts(cluster)
        assert [a - b for a, b in zip(after, before, strict=True)] == [2, 0, 0], after
    assert stats["end_sessions"] == 2 and stats["server_errors"] == []
