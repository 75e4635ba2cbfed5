"""Redis' `maxmemory-policy` is checked when the store first answers (docs/redis.md, "Memory
policy"): a policy that may evict the sidecar's keys is reported in `/readyz` and logged as a
warning; `noeviction` is not; an ACL that forbids CONFIG is tolerated."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import RedisConfig
from sidecar.redis.store import RedisSessionStore
from sidecar.web.keys import SESSIONS
from tests.support.configs import make_config
from tests.support.redis_fleet import Fleet, fleet, start_cluster
from tests.support.sidecars import Sidecar, StartSidecar

PASSWORD = "policy-test-password"


def redis_config(url: str) -> dict[str, Any]:
    return {
        "session": {
            "store": "redis",
            "cookie_name": "sidecar",
            "cookie_secure": False,
            "encryption_keys": [make_config().session.encryption_keys[0].get_secret_value()],
        },
        "redis": {"url": url, "key_prefix": "policy-test"},
    }


async def readyz(http: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    """The /readyz body once the store has been probed (its first probe runs at start-up)."""
    for _ in range(200):
        async with http.get(sidecar.management_url("/readyz")) as resp:
            body: dict[str, Any] = await resp.json()
        if body["dependencies"].get("redis", {}).get("up"):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"redis never reported up: {body}")


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sidecar" and r.levelno == logging.WARNING and "maxmemory" in r.getMessage()
    ]


@pytest.fixture
def servers(tmp_path: Path) -> Any:
    with fleet(tmp_path) as f:
        yield f


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru"])
async def test_evicting_policy_is_reported_and_logged(
    servers: Fleet,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    caplog.set_level(logging.INFO)
    server = servers.start("redis", [f"maxmemory-policy {policy}"])
    sidecar = await start_sidecar(make_config(**redis_config(f"redis://{server.address}/0")))
    body = await readyz(http, sidecar)
    assert body["ready"] is True  # a warning, not a reason to take the pod out
    warning = body["warnings"]["redis"]
    assert policy in warning and "noeviction" in warning
    assert [m for m in warnings_logged(caplog) if policy in m] == [warning]


async def test_noeviction_is_quiet(
    servers: Fleet,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = servers.start("redis", ["maxmemory-policy noeviction"])
    sidecar = await start_sidecar(make_config(**redis_config(f"redis://{server.address}/0")))
    body = await readyz(http, sidecar)
    assert "warnings" not in body
    assert warnings_logged(caplog) == []


async def test_acl_without_config_is_tolerated(
    servers: Fleet,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user denied CONFIG (as managed services do) still runs; nothing is claimed."""
    caplog.set_level(logging.INFO)
    server = servers.start(
        "redis",
        [
            "maxmemory-policy allkeys-lru",
            "user default off",
            f"user sidecar on >{PASSWORD} ~* &* +@all -config",
        ],
        client_kwargs={"username": "sidecar", "password": PASSWORD},
    )
    url = f"redis://sidecar:{PASSWORD}@{server.address}/0"
    sidecar = await start_sidecar(make_config(**redis_config(url)))
    body = await readyz(http, sidecar)
    assert body["ready"] is True
    assert "warnings" not in body
    assert warnings_logged(caplog) == []
    notes = [r.getMessage() for r in caplog.records if r.name == "sidecar.redis"]
    assert len([m for m in notes if "not readable" in m]) == 1
    await sidecar.app[SESSIONS].store.eviction_risk()  # a later probe: not said again
    notes = [r.getMessage() for r in caplog.records if r.name == "sidecar.redis"]
    assert len([m for m in notes if "not readable" in m]) == 1
    assert not any(PASSWORD in r.getMessage() for r in caplog.records)


async def test_policy_followed_while_running(
    servers: Fleet,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failover or a CONFIG SET may change the policy: every store probe reads it again,
    fixing it clears the warning, and the warning is logged once per change, not per probe."""
    server = servers.start("redis", ["maxmemory-policy allkeys-lru"])
    sidecar = await start_sidecar(make_config(**redis_config(f"redis://{server.address}/0")))
    assert "allkeys-lru" in (await readyz(http, sidecar))["warnings"]["redis"]
    with server.client() as c:
        c.config_set("maxmemory-policy", "noeviction")
    for _ in range(80):  # the store is probed every 5 s
        body = await readyz(http, sidecar)
        if "warnings" not in body:
            break
        await asyncio.sleep(0.1)
    assert "warnings" not in body
    assert len(warnings_logged(caplog)) == 1


async def test_cluster_reports_every_master(servers: Fleet) -> None:
    """On a Cluster each master is asked; one evicting master is enough for a warning."""
    cluster = start_cluster(servers)
    with cluster.nodes[1].client() as c:
        c.config_set("maxmemory-policy", "allkeys-lru")
    store = RedisSessionStore.from_config(
        RedisConfig(url="redis://127.0.0.1/0", cluster={"nodes": cluster.addresses})
    )
    try:
        warning = await store.eviction_risk()
        assert warning is not None and "allkeys-lru" in warning
        with cluster.nodes[1].client() as c:
            c.config_set("maxmemory-policy", "noeviction")
        assert await store.eviction_risk() is None
    finally:
        await store.close()
