"""Traces across replicas, exported for real: two `auth-sidecar run` processes sharing Redis
send OTLP/HTTP to a receiver in the test, and one session's refresh shows as the holder's
lock, grant and fenced write on one replica and a lock wait on the other
(docs/operations.md, "Traces").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support import chaos
from tests.support.chaos import DUE_AFTER, login_known_exp
from tests.support.idp import ThreadedIdP, set_delay
from tests.support.sidecars import StartProcess
from tests.support.storm import replica_config
from tests.support.tracing import OTLPReceiver, Recorded, children, named, one, secrets_in
from tests.support.upstreams import VerifyingUpstream

ACCESS_TTL = chaos.ACCESS_TTL  # the `idp` fixture's token lifetime: the chaos timeline's
GRANT_DELAY = 1.0  # the IdP's answer to the refresh grant: the other replica waits meanwhile
SECOND_AFTER = 0.3  # the other replica's request, once the first holds the lock


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver()
    yield server
    server.stop()


def _server_spans(spans: list[Recorded], service: str) -> list[Recorded]:
    return [s for s in spans if s.service == service and s.kind == "server"]


def _below(spans: list[Recorded], top: Recorded) -> list[Recorded]:
    """`top` and every span under it."""
    found, frontier = [top], [top]
    while frontier:
        frontier = [c for p in frontier for c in children(spans, p)]
        found += frontier
    return found


async def _get(http: aiohttp.ClientSession, url: str, cookie: str) -> tuple[int, str, str]:
    """Status, request id and the access token the upstream received."""
    async with http.get(url, headers={"Cookie": f"sidecar={cookie}"}) as r:
        body = await r.json()
        return r.status, r.headers["X-Request-Id"], body["authorization"].removeprefix("Bearer ")


async def test_refresh_with_a_waiter_on_another_replica(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    redis_prefix: str,
    sidecar_process: StartProcess,
    receiver: OTLPReceiver,
) -> None:
    """Replica A takes the lock and refreshes (refresh → refresh.grant → idp.token, then
    refresh.save); replica B, asked while A's grant runs, waits (refresh → refresh.lock_wait)
    and uses A's tokens. One refresh grant in all the spans; every span reaches the receiver
    by the time the replicas have stopped (flushed at shutdown); no token, cookie or session
    id in any of them."""
    configs: list[dict[str, Any]] = []
    for name in ("replica-a", "replica-b"):
        config = replica_config(idp, upstream.url, redis_prefix, chaos.REFRESH)
        config["telemetry"] = {"otlp_endpoint": receiver.url, "service_name": name}
        configs.append(config)
    a, b = (sidecar_process(c) for c in configs)
    cookie, exp = await login_known_exp(a, "alice")
    try:
        async with aiohttp.ClientSession() as http:
            before = await _get(http, a.url("/app/page"), cookie)
            await asyncio.sleep(max(0.0, exp - ACCESS_TTL + DUE_AFTER - time.time()))
            set_delay(idp, GRANT_DELAY)
            first = asyncio.create_task(_get(http, a.url("/app/page"), cookie))
            await asyncio.sleep(SECOND_AFTER)
            second = await _get(http, b.url("/app/page"), cookie)
            refreshed = await first
            assert refreshed[0] == 200 and second[0] == 200
            assert before[2] != refreshed[2] == second[2]  # one rotation, used by both
    finally:
        set_delay(idp, 0.0)
    assert a.stop() == 0 and b.stop() == 0  # SIGTERM: each flushes its spans on the way out
    spans = receiver.received()
    assert receiver.requests >= 2  # both processes exported

    # Replica A: the login, then the request that refreshed.
    assert len(named(_server_spans(spans, "replica-a"), "GET /oauth2/callback")) == 1
    (holder_request,) = named(
        _server_spans(spans, "replica-a"), "GET /", **{"sidecar.request_id": refreshed[1]}
    )
    assert holder_request.name == "GET /" and holder_request.parent_id is None
    holder = _below(spans, holder_request)
    refresh = one(holder, "refresh")
    assert refresh.parent_id == holder_request.span_id
    assert refresh.attributes["sidecar.refresh.outcome"] == "refreshed"
    assert [s.name for s in children(spans, refresh)] == ["refresh.grant", "refresh.save"]
    grant = one(holder, "refresh.grant")
    (token,) = children(spans, grant)
    assert (token.name, token.kind) == ("idp.token", "client")
    assert token.attributes["sidecar.grant_type"] == "refresh_token"
    assert token.attributes["sidecar.idp.outcome"] == "ok"
    assert one(holder, "refresh.save").attributes["sidecar.refresh.saved"] is True
    assert one(holder, "upstream").attributes["http.response.status_code"] == 200

    # Replica B: its request waited for A's refresh and used it.
    (waiter_request,) = _server_spans(spans, "replica-b")
    assert waiter_request.attributes["sidecar.request_id"] == second[1]
    waiter = _below(spans, waiter_request)
    refresh = one(waiter, "refresh")
    assert refresh.attributes["sidecar.refresh.outcome"] == "refreshed_elsewhere"
    assert [s.name for s in children(spans, refresh)] == ["refresh.lock_wait"]
    assert (
        refresh.attributes["sidecar.session.hash"]
        == one(holder, "refresh").attributes["sidecar.session.hash"]
    )
    assert one(waiter, "upstream").attributes["http.response.status_code"] == 200

    # One grant in the whole picture: the refresh invariant, seen in the traces.
    assert len(named(spans, "idp.token", **{"sidecar.grant_type": "refresh_token"})) == 1
    assert secrets_in(spans, [cookie, before[2], refreshed[2]]) == []
