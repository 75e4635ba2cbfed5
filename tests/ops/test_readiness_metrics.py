"""The metrics behind the readiness and Redis alerts: `sidecar_ready`,
`sidecar_readiness_transitions_total` and `sidecar_dependency_up` (docs/operations.md,
"Dashboard and alerts")."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sidecar.health import READINESS, Readiness
from tests.support.configs import make_config
from tests.support.ports import free_port
from tests.support.sidecars import Sidecar, StartSidecar, ready
from tests.support.stores import store_sections


def test_on_ready_hears_each_change_once() -> None:
    """Only changes of `ready` are published; neither start-up's first ready nor draining is
    a flap."""
    heard: list[tuple[bool, bool]] = []
    reports: list[tuple[str, bool]] = []
    readiness = Readiness(
        on_ready=lambda ready, flap: heard.append((ready, flap)),
        on_report=lambda name, up: reports.append((name, up)),
    )
    readiness.register("redis")
    readiness.register("idp")
    assert heard == []  # unready from the start: nothing changed
    readiness.report("redis", up=True)
    assert heard == []
    readiness.report("idp", up=True)
    assert heard == [(True, False)]
    readiness.report("idp", up=False)  # not strict: still ready
    readiness.report("idp", up=True)
    assert heard == [(True, False)]
    readiness.draining = True
    assert heard == [(True, False), (False, False)]
    assert reports == [("redis", True), ("idp", True), ("idp", False), ("idp", True)]


def test_strict_dependency_outages_are_flaps() -> None:
    """A dependency in readiness_requires going and coming back: each change after the first
    ready is a flap, the one to unready and the one back."""
    heard: list[tuple[bool, bool]] = []
    readiness = Readiness(
        strict=["redis"], on_ready=lambda ready, flap: heard.append((ready, flap))
    )
    readiness.register("redis")
    for up in (True, False, True, False):
        readiness.report("redis", up=up)
    assert heard == [(True, False), (False, True), (True, True), (False, True)]


async def samples(http: aiohttp.ClientSession, sidecar: Sidecar) -> dict[tuple[str, str], float]:
    """`/metrics` as {(name, dependency label or ""): value}."""
    async with http.get(sidecar.management_url("/metrics")) as response:
        text = await response.text()
    return {
        (s.name, s.labels.get("dependency", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_ready_and_transitions_follow_readyz(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """`sidecar_ready` follows /readyz; the transitions counter counts an outage of a required
    dependency (down and back: two), not start-up nor draining."""
    management = {"listen": f"127.0.0.1:{free_port()}", "readiness_requires": ["redis"]}
    sidecar = await start_sidecar(make_config(management=management))
    readiness = sidecar.app[READINESS]
    # The sessions are in memory, so "redis" is ours to report.
    readiness.register("redis")
    readiness.report("redis", up=True)
    await ready(sidecar)
    found = await samples(http, sidecar)
    assert found[("sidecar_ready", "")] == 1
    assert found[("sidecar_readiness_transitions_total", "")] == 0
    assert found[("sidecar_dependency_up", "idp")] == 1
    readiness.report("redis", up=False)
    found = await samples(http, sidecar)
    assert found[("sidecar_ready", "")] == 0
    assert found[("sidecar_dependency_up", "redis")] == 0
    readiness.report("redis", up=True)
    readiness.draining = True
    found = await samples(http, sidecar)
    assert found[("sidecar_ready", "")] == 0
    assert found[("sidecar_readiness_transitions_total", "")] == 2


async def test_redis_down_shows_as_dependency_down(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """A Redis nobody listens on: its first ping fails and `sidecar_dependency_up{redis}` is 0
    (what AuthSidecarRedisUnavailable fires on); the sidecar never turns ready."""
    sections = store_sections("redis", "unused")
    sections["redis"]["url"] = f"redis://127.0.0.1:{free_port()}/0"
    sidecar = await start_sidecar(make_config(**sections))
    for _ in range(250):
        found = await samples(http, sidecar)
        if ("sidecar_dependency_up", "redis") in found:
            break
        await asyncio.sleep(0.02)
    assert found[("sidecar_dependency_up", "redis")] == 0
    assert found[("sidecar_ready", "")] == 0
