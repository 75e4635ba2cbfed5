"""The sidecar on every Redis topology it supports, each a set of real `redis-server` processes.

ACL user and password, TLS (rediss:// with a CA file), Sentinel (one master, one replica,
three sentinels; a failover during a refresh storm) and Cluster (three masters; the record,
lock and event channel of a session in one slot, events over sharded pub/sub). Sidecar
replicas are `python -m sidecar run` processes; the dev IdP issues 3-second access tokens and
the upstream verifies every forwarded token at the IdP (the `idp` and `upstream` fixtures;
the storm of tests/support/storm.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.idp import ThreadedIdP, idp_stats
from tests.support.login import JSON, login_cookie
from tests.support.redis_fleet import (
    Fleet,
    RedisProcess,
    start_cluster,
    start_sentinel_setup,
    tls_supported,
    wait_until,
)
from tests.support.sidecars import SidecarProcess, StartProcess
from tests.support.storm import (
    COOKIE,
    Storm,
    assert_all_verified,
    outcome,
    refresh_metrics,
    replica_config,
    statuses,
    summary,
    targets_on,
)
from tests.support.tls import make_tls
from tests.support.upstreams import VerifyingUpstream

ACCESS_TTL = 3.0  # the `idp` fixture's token lifetime
FAILOVER_TTL = 8.0  # seconds: the token that is current while Sentinel switches masters
PREFIX = "topo"


def sidecar_config(
    idp: ThreadedIdP, upstream: VerifyingUpstream, redis: dict[str, Any]
) -> dict[str, Any]:
    data = replica_config(idp, upstream.url, PREFIX)
    data["redis"] = {**redis, "key_prefix": PREFIX}
    return data


async def api(base: str, cookie: str) -> tuple[int, dict[str, Any]]:
    """One authenticated API call: the status and the JSON body."""
    headers = {**JSON, "Cookie": f"{COOKIE}={cookie}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout) as http,
        http.get(base + "/api/check", headers=headers, allow_redirects=False) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body


async def logout(base: str, cookie: str) -> None:
    headers = {**JSON, "Cookie": f"{COOKIE}={cookie}", "Origin": base}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.post(base + "/oauth2/sign_out", headers=headers, allow_redirects=False) as r,
    ):
        assert r.status == 200, (r.status, await r.text())


async def login_refresh_logout(idp: ThreadedIdP, base: str, user: str = "alice") -> str:
    """Log in, see the token rotate once through the IdP, log out: the session is gone."""
    cookie = await login_cookie(base, user)
    status, body = await api(base, cookie)
    assert (status, body.get("ok"), body.get("sub")) == (200, True, user), body
    first, before = body["token"], idp_stats(idp)
    deadline = time.monotonic() + ACCESS_TTL + 3
    while body.get("token") == first and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status, body = await api(base, cookie)
        assert status == 200 and body.get("ok"), (status, body)
    assert body["token"] != first, "the access token was never refreshed"
    grants = idp_stats(idp)["refresh_grants"] - before["refresh_grants"]
    assert grants == 1
    await logout(base, cookie)
    status, _ = await api(base, cookie)
    assert status == 401
    return cookie


def unready_sidecar(config: dict[str, Any], tmp_path: Path) -> SidecarProcess:
    """A sidecar that is expected never to become ready (the caller stops it)."""
    proc = SidecarProcess(config, tmp_path)
    wait_until(lambda: _answers(proc.management + "/healthz"), 15.0, "sidecar /healthz")
    return proc


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def assert_redis_down(proc: SidecarProcess, cookie: str, why: str) -> None:
    """/readyz says Redis is down (naming `why`); session and login requests get 503."""

    async def redis_detail() -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(proc.management + "/readyz") as r,
        ):
            return r.status, (await r.json())["dependencies"].get("redis", {})

    deadline = time.monotonic() + 10
    status, detail = await redis_detail()
    while detail.get("detail") in (None, "starting") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status, detail = await redis_detail()
    assert status == 503 and detail["up"] is False and why in detail["detail"], detail
    assert (await api(proc.base, cookie))[0] == 503
    async with (
        aiohttp.ClientSession() as http,
        http.get(proc.base + "/oauth2/start?rd=/", allow_redirects=False) as r,
    ):
        assert r.status == 503, r.status


# --- ACL ---------------------------------------------------------------------------------


async def test_acl_user_and_password_from_config(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
    tmp_path: Path,
) -> None:
    """An ACL user limited to the sidecar's keys: login → refresh → logout; wrong password → 503."""
    server = redis_fleet.start(
        "acl", ["requirepass admin-pw"], client_kwargs={"password": "admin-pw"}
    )
    with server.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "sidecar", "on", ">user-pw", "resetkeys", f"~{PREFIX}:*",
            "resetchannels", f"&{PREFIX}:*", "+@all", "-@admin", "-@dangerous",
        )  # fmt: skip
    # The URL carries other credentials: the config's username and password win.
    url = f"redis://nobody:not-this@127.0.0.1:{server.port}/0"
    good = {"url": url, "username": "sidecar", "password": "user-pw"}
    replica = sidecar_process(sidecar_config(idp, upstream, good))
    cookie = await login_refresh_logout(idp, replica.base)
    with server.client() as admin:
        denied = admin.execute_command("ACL", "LOG")
    # Only the memory-policy check's CONFIG GET, asked once (docs/redis.md, "Memory policy").
    refused = [(d[b"object"], d[b"count"]) for d in denied]
    assert refused == [(b"config|get", 1)], f"the sidecar's ACL user was refused: {denied}"

    wrong = sidecar_config(idp, upstream, {**good, "password": "wrong-pw"})
    proc = unready_sidecar(wrong, tmp_path)
    try:
        live = await login_cookie(replica, "bob")  # a live session in Redis
        await assert_redis_down(proc, live, "AuthenticationError")
        assert "wrong-pw" not in proc.logs() and "user-pw" not in proc.logs()
    finally:
        proc.stop()
    assert cookie


# --- TLS ---------------------------------------------------------------------------------


async def test_tls_with_ca_file(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
    tmp_path: Path,
) -> None:
    """TLS-only Redis: rediss:// with its CA works; with another CA, readiness down and 503."""
    if not tls_supported():
        pytest.xfail("this redis-server was built without TLS (no tls-port directive)")
    tls = make_tls(tmp_path / "tls", "redis")
    other = make_tls(tmp_path / "tls-other", "other")
    server = redis_fleet.start(
        "tls",
        [
            f"tls-cert-file {tls.cert}",
            f"tls-key-file {tls.key}",
            f"tls-ca-cert-file {tls.ca_cert}",
            "tls-auth-clients no",
        ],
        tls_port=True,
        client_kwargs={"ssl": True, "ssl_ca_certs": str(tls.ca_cert)},
    )
    url = f"rediss://127.0.0.1:{server.port}/0"
    replica = sidecar_process(
        sidecar_config(idp, upstream, {"url": url, "tls_ca_file": str(tls.ca_cert)})
    )
    await login_refresh_logout(idp, replica.base)
    with server.client() as admin:
        assert int(admin.info("stats")["total_connections_received"]) >= 2

    untrusted = sidecar_config(idp, upstream, {"url": url, "tls_ca_file": str(other.ca_cert)})
    proc = unready_sidecar(untrusted, tmp_path)
    try:
        live = await login_cookie(replica, "bob")
        await assert_redis_down(proc, live, "redis:")
    finally:
        proc.stop()


# --- Sentinel ----------------------------------------------------------------------------


async def test_sentinel_storm_and_failover(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
) -> None:
    """Sentinel: a storm on two replicas, then a failover mid-storm: no session lost, 200 again."""
    setup = start_sentinel_setup(redis_fleet, password="data-pw", sentinel_password="sent-pw")
    redis = {
        "url": "redis://127.0.0.1:1/0",  # with sentinel: scheme and database only
        "password": "data-pw",
        "sentinel": {
            "master_name": setup.master_name,
            "addresses": setup.addresses,
            "password": "sent-pw",
        },
    }
    replicas = [sidecar_process(sidecar_config(idp, upstream, redis)) for _ in range(2)]
    await login_refresh_logout(idp, replicas[1].base, "carol")
    cookie = await login_cookie(replicas[0], "alice")
    targets = targets_on(replicas, cookie)

    before = idp_stats(idp)
    storm = Storm(targets, clients=10, duration=6.0)
    await storm.run()
    after = idp_stats(idp)
    summary("sentinel", storm, before, after)
    assert_all_verified(storm.results)
    assert after["reuse_detected"] == before["reuse_detected"]
    assert len(storm.tokens()) >= 3
    assert after["refresh_grants"] - before["refresh_grants"] == len(storm.tokens()) - 1

    failover: dict[str, float] = {}

    async def fail_over(storm: Storm) -> None:
        # Right after a rotation to an 8-second token, so that no refresh is due while the
        # master changes (Sentinel itself loses writes taken by the old master meanwhile);
        # WAIT makes sure the replica has every write so far (the session and its tokens).
        await asyncio.sleep(1.0)
        idp.call(setattr, idp.idp, "access_token_ttl", FAILOVER_TTL)
        storm.rotated.clear()
        await asyncio.wait_for(storm.rotated.wait(), 2 * ACCESS_TTL)
        await asyncio.sleep(0.2)
        with setup.master.client() as master:
            acked = await asyncio.to_thread(master.execute_command, "WAIT", 1, 2000)
            assert acked >= 1, "the replica did not acknowledge the writes so far"
        with setup.sentinels[0].client() as sentinel:
            failover["at"] = storm.now()
            sentinel.execute_command("SENTINEL", "FAILOVER", setup.master_name)
        await asyncio.to_thread(
            wait_until,
            lambda: setup.current_master_port() == setup.replica.port,
            10.0,
            "the sentinels name the new master",
        )
        failover["switched"] = storm.now()
        # Sentinel demotes a live old master only ~10 s later: writes it takes meanwhile are
        # lost. The sidecar must have left it within about a second.
        await asyncio.sleep(1.5)
        failover["old_master_writes"] = await asyncio.to_thread(writes, setup.master)
        storm.duration = failover["at"] + 9.0

    before = idp_stats(idp)
    storm = Storm(targets, clients=10, duration=25.0)
    try:
        await storm.run(fail_over)
    finally:
        idp.call(setattr, idp.idp, "access_token_ttl", ACCESS_TTL)
    old_master_writes = writes(setup.master) - failover["old_master_writes"]
    after = idp_stats(idp)
    summary("sentinel failover", storm, before, after)
    t0 = failover["at"]
    late = [r for r in storm.results if r.started >= t0 and r.status != 200]
    recovered = max((r.ended for r in late), default=t0)
    print(
        f"  failover at {t0:.1f}s, sentinel switched after {failover['switched'] - t0:.2f}s, "
        f"last non-200 {recovered - t0:.2f}s after it; non-200 after: {dict(statuses(late))}; "
        f"writes to the old master after the switch: {old_master_writes}"
    )

    counts = statuses(storm.results)
    assert old_master_writes == 0, f"{old_master_writes} writes went to the demoted master"
    assert set(counts) <= {200, 503}, counts  # never a 500, never a 401 (no session lost)
    assert all(r.ok for r in storm.results if r.status == 200)
    assert recovered - t0 < 5.0, "requests did not return to 200 within 5 s of the failover"
    after_switch = {r.token for r in storm.results if r.ok and r.started > recovered}
    before_switch = {r.token for r in storm.results if r.ok and r.started < t0}
    assert after_switch - before_switch, "no refresh happened on the new master"
    assert after["reuse_detected"] == before["reuse_detected"]
    assert after["code_exchanges"] == before["code_exchanges"], "someone had to log in again"
    assert after["refresh_grants"] - before["refresh_grants"] == len(storm.tokens()) - 1
    with setup.replica.client() as new_master:
        assert new_master.info("replication")["role"] == "master"
        assert list(new_master.scan_iter(match=f"{PREFIX}:s:*"))
    await logout(replicas[1].base, cookie)
    assert (await api(replicas[0].base, cookie))[0] == 401


def writes(server: RedisProcess) -> int:
    """Write commands the sidecar sends (lock SETs and scripts) that `server` has executed."""
    with server.client() as c:
        stats = c.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("set", "evalsha"))


# --- Cluster -----------------------------------------------------------------------------


async def test_cluster_storm_one_slot_per_session(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    sidecar_process: StartProcess,
    redis_fleet: Fleet,
) -> None:
    """Cluster of three masters: a storm on two replicas, one grant per rotation, sharded events."""
    cluster = start_cluster(redis_fleet)
    redis = {"url": "redis://127.0.0.1:1/0", "cluster": {"nodes": cluster.addresses[:2]}}
    replicas = [sidecar_process(sidecar_config(idp, upstream, redis)) for _ in range(2)]
    await login_refresh_logout(idp, replicas[0].base, "carol")
    cookie = await login_cookie(replicas[1], "alice")

    records = []
    for node in cluster.nodes:
        with node.client() as c:
            records += [k.decode() for k in c.scan_iter(f"{PREFIX}:s:*")]
    assert len(records) == 1, records
    h = records[0].split("{", 1)[1].rstrip("}")
    names = [f"{PREFIX}:s:{{{h}}}", f"{PREFIX}:lock:{{{h}}}", f"{PREFIX}:ev:{{{h}}}"]
    with cluster.nodes[0].client() as c:
        slots = {int(c.execute_command("CLUSTER", "KEYSLOT", name)) for name in names}
    assert len(slots) == 1, f"record, lock and channel in different slots: {slots}"
    home = cluster.node_of_key(names[0])
    with home.client() as c:
        assert c.exists(names[0]) == 1

    targets = targets_on(replicas, cookie)
    refreshed_before = sum(
        [outcome(await refresh_metrics(p.management), "refreshed") for p in replicas]
    )
    before = idp_stats(idp)
    storm = Storm(targets, clients=16, duration=8.0)
    await storm.run()
    after = idp_stats(idp)
    summary("cluster", storm, before, after)
    metrics = [await refresh_metrics(p.management) for p in replicas]
    contention = sum(m.get("sidecar_refresh_lock_contention_total", 0) for m in metrics)
    stats = {}
    for n in cluster.nodes:
        with n.client() as c:
            stats[n.port] = {
                k.removeprefix("cmdstat_"): v["calls"]
                for k, v in c.info("commandstats").items()
                if "publish" in k or "subscribe" in k
            }
    print(f"  lock contention={contention:g}; pub/sub calls per node: {stats}")

    assert_all_verified(storm.results)
    grants = after["refresh_grants"] - before["refresh_grants"]
    assert after["reuse_detected"] == before["reuse_detected"]
    assert len(storm.tokens()) >= 3
    assert grants == len(storm.tokens()) - 1
    assert sum(outcome(m, "refreshed") for m in metrics) - refreshed_before == grants
    assert contention > 0, "the replicas never met at the lock"
    assert stats[home.port].get("spublish", 0) >= grants
    assert stats[home.port].get("ssubscribe", 0) > 0, "nobody waited on the shard channel"
    # Classic pub/sub carries only the session change feed (docs/redis.md): one subscription
    # per replica unless its feed restarted; refresh events stay on the shard channel.
    assert sum(s.get("subscribe", 0) for s in stats.values()) <= 2 * len(replicas)

    await logout(replicas[0].base, cookie)
    assert (await api(replicas[1].base, cookie))[0] == 401
    with home.client() as c:
        assert c.exists(names[0]) == 0
