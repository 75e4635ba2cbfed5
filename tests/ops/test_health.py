"""The management listener: /healthz, /readyz and /metrics (docs/operations.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.health import READINESS, Readiness
from tests.support.configs import make_config
from tests.support.keys import TEST_KEY
from tests.support.ports import free_port

# --- Readiness -------------------------------------------------------------------------------


def test_ready_without_dependencies() -> None:
    """With nothing registered the sidecar is ready."""
    readiness = Readiness()
    assert readiness.ready
    assert readiness.snapshot() == {"ready": True, "draining": False, "dependencies": {}}


def test_not_ready_until_dependency_answered_once() -> None:
    """A registered dependency that never answered keeps the sidecar unready."""
    readiness = Readiness()
    readiness.register("redis")
    readiness.register("idp")
    readiness.report("redis", up=True)
    assert not readiness.ready
    assert readiness.snapshot()["dependencies"] == {
        "redis": {"up": True, "detail": "ok"},
        "idp": {"up": False, "detail": "starting"},
    }
    readiness.report("idp", up=True)
    assert readiness.ready


def test_failed_first_attempt_keeps_not_ready() -> None:
    """A dependency whose first attempts fail is not counted as having answered."""
    readiness = Readiness()
    readiness.register("idp")
    readiness.report("idp", up=False, detail="connection refused")
    assert not readiness.ready
    assert readiness.snapshot()["dependencies"] == {
        "idp": {"up": False, "detail": "connection refused"}
    }


def test_non_strict_outage_after_start_stays_ready() -> None:
    """Once up, a dependency outside readiness_requires going down does not fail readiness."""
    readiness = Readiness()
    readiness.register("redis")
    readiness.report("redis", up=True)
    readiness.report("redis", up=False, detail="timeout")
    assert readiness.ready
    assert readiness.snapshot()["dependencies"] == {"redis": {"up": False, "detail": "timeout"}}


def test_strict_outage_fails_readiness_until_back() -> None:
    """A dependency in readiness_requires turns the sidecar unready while down."""
    readiness = Readiness(strict=["redis"])
    readiness.register("redis")
    readiness.register("idp")
    readiness.report("redis", up=True)
    readiness.report("idp", up=True)
    readiness.report("idp", up=False)
    assert readiness.ready  # idp is not strict
    readiness.report("redis", up=False)
    assert not readiness.ready
    readiness.report("redis", up=True)
    assert readiness.ready


def test_draining_is_never_ready() -> None:
    """While draining the sidecar is unready whatever its dependencies say."""
    readiness = Readiness()
    readiness.register("redis")
    readiness.report("redis", up=True)
    readiness.draining = True
    assert not readiness.ready
    assert readiness.snapshot()["draining"] is True


def test_register_keeps_reported_state() -> None:
    """Registering after a report does not reset the dependency to starting."""
    readiness = Readiness()
    readiness.report("idp", up=True)
    readiness.register("idp")
    assert readiness.ready
    assert readiness.snapshot()["dependencies"] == {"idp": {"up": True, "detail": "ok"}}


# --- endpoints -------------------------------------------------------------------------------


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    """Let the sidecar's own start-up dependencies (such as the IdP metadata) come up."""
    for _ in range(250):
        async with http.get(url) as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} never became ready")


async def test_healthz(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """/healthz answers 200 on the management listener."""
    sidecar = await start_sidecar(make_config())
    assert await get_json(http, sidecar.management_url("/healthz")) == (200, {"status": "ok"})


async def test_management_paths_not_on_main_listener(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """/healthz on the main listener goes to the upstream, not to the management handler."""

    async def upstream(request: web.Request) -> web.Response:
        return web.Response(text="from upstream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    async with http.get(sidecar.url("/metrics")) as resp:
        assert await resp.text() == "from upstream"


async def test_readyz_follows_dependencies(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """/readyz: 503 before a dependency answered, 200 after, 200 on a later non-strict outage."""
    sidecar = await start_sidecar(make_config())
    readiness = sidecar.app[READINESS]
    url = sidecar.management_url("/readyz")
    await wait_ready(http, url)

    readiness.register("test-store")
    readiness.register("test-idp")
    readiness.report("test-store", up=True)
    status, body = await get_json(http, url)
    assert status == 503
    assert body["ready"] is False
    assert body["draining"] is False
    assert body["dependencies"]["test-store"] == {"up": True, "detail": "ok"}
    assert body["dependencies"]["test-idp"] == {"up": False, "detail": "starting"}

    readiness.report("test-idp", up=True)
    assert (await get_json(http, url))[0] == 200

    readiness.report("test-store", up=False, detail="connection refused")
    status, body = await get_json(http, url)
    assert status == 200
    assert body["dependencies"]["test-store"] == {"up": False, "detail": "connection refused"}


async def test_readyz_strict_dependency(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """With management.readiness_requires: [redis] an outage of Redis turns /readyz 503."""
    config = make_config(
        management={"listen": f"127.0.0.1:{free_port()}", "readiness_requires": ["redis"]}
    )
    sidecar = await start_sidecar(config)
    readiness = sidecar.app[READINESS]
    url = sidecar.management_url("/readyz")
    await wait_ready(http, url)
    # The sessions are in memory, so "redis" is ours to report; "test-idp" is not strict.
    readiness.register("redis")
    readiness.register("test-idp")
    readiness.report("redis", up=True)
    readiness.report("test-idp", up=True)
    assert (await get_json(http, url))[0] == 200
    readiness.report("test-idp", up=False)
    assert (await get_json(http, url))[0] == 200
    readiness.report("redis", up=False)
    status, body = await get_json(http, url)
    assert status == 503
    assert body["dependencies"]["redis"]["up"] is False
    readiness.report("redis", up=True)
    assert (await get_json(http, url))[0] == 200


async def test_readyz_draining(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """/readyz answers 503 with draining: true once draining starts; /healthz stays 200."""
    sidecar = await start_sidecar(make_config())
    await wait_ready(http, sidecar.management_url("/readyz"))
    sidecar.app[READINESS].draining = True
    status, body = await get_json(http, sidecar.management_url("/readyz"))
    assert status == 503
    assert body["draining"] is True
    assert (await get_json(http, sidecar.management_url("/healthz")))[0] == 200


# --- metrics ---------------------------------------------------------------------------------


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset[Any]], float]:
    """Samples of /metrics keyed by (name, labels)."""
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_request_metrics(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """Requests are counted by route, method and status, and timed by route."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    base = await upstream_app(app)
    config = make_config(base, upstreams=[{"path": "/api", "url": base}])
    sidecar = await start_sidecar(config)
    for path, method in [
        ("/api/a", "GET"),
        ("/api/b", "GET"),
        ("/api/c?status=404", "POST"),
        ("/api/d", "PROPFIND"),
        ("/elsewhere", "GET"),
    ]:
        async with http.request(method, sidecar.url(path)) as resp:
            await resp.read()
    samples = await scrape(http, sidecar.management_url("/metrics"))
    total = "sidecar_http_requests_total"
    assert sample(samples, total, route="/api", method="GET", status="200") == 2
    assert sample(samples, total, route="/api", method="POST", status="404") == 1
    assert sample(samples, total, route="/api", method="OTHER", status="200") == 1
    assert sample(samples, total, route="unrouted", method="GET", status="404") == 1
    histogram = "sidecar_http_request_duration_seconds"
    assert sample(samples, f"{histogram}_count", route="/api") == 4
    assert sample(samples, f"{histogram}_bucket", route="/api", le="+Inf") == 4
    assert (sample(samples, f"{histogram}_sum", route="/api") or 0) > 0
    assert sample(samples, "sidecar_http_requests_in_flight") == 0


async def test_in_flight_gauge(
    start_sidecar: Any, upstream_app: Any, http: aiohttp.ClientSession
) -> None:
    """The in-flight gauge counts requests being handled and drops back when they finish."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    metrics_url = sidecar.management_url("/metrics")

    async def call() -> int:
        async with http.get(sidecar.url("/slow")) as resp:
            await resp.read()
            return resp.status

    task = asyncio.create_task(call())
    await asyncio.wait_for(arrived.wait(), 5)
    assert sample(await scrape(http, metrics_url), "sidecar_http_requests_in_flight") == 1
    release.set()
    assert await task == 200
    assert sample(await scrape(http, metrics_url), "sidecar_http_requests_in_flight") == 0


async def test_upstream_error_counter(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """An unreachable upstream answers 502 and counts sidecar_upstream_errors_total."""
    sidecar = await start_sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    metrics_url = sidecar.management_url("/metrics")
    before = await scrape(http, metrics_url)
    assert sample(before, "sidecar_upstream_errors_total", upstream="/", kind="connect") is None
    async with http.get(sidecar.url("/x")) as resp:
        assert resp.status == 502
    samples = await scrape(http, metrics_url)
    assert sample(samples, "sidecar_upstream_errors_total", upstream="/", kind="connect") == 1
    total = "sidecar_http_requests_total"
    assert sample(samples, total, route="/", method="GET", status="502") == 1


async def test_metrics_per_sidecar_instance(
    start_sidecar: Any, http: aiohttp.ClientSession
) -> None:
    """Two sidecars in one process keep separate registries (no module-level globals)."""
    first = await start_sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    second = await start_sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    async with http.get(first.url("/")) as resp:
        assert resp.status == 502
    samples = await scrape(http, second.management_url("/metrics"))
    assert sample(samples, "sidecar_upstream_errors_total", upstream="/", kind="connect") is None


async def test_session_cache_live_gauge(start_sidecar: Any, http: aiohttp.ClientSession) -> None:
    """The gauge says whether sessions come from memory: 1 once the feed is followed, 0 when
    the cache is configured off (`cache_ttl: 0s`: every request reads the store)."""
    session = {
        "store": "memory",
        "cookie_name": "sidecar",
        "cookie_secure": False,
        "encryption_keys": [TEST_KEY],
    }
    on = await start_sidecar(make_config(session=session))
    off = await start_sidecar(make_config(session={**session, "cache_ttl": "0s"}))
    live = "sidecar_session_cache_live"
    for _ in range(50):
        if sample(await scrape(http, on.management_url("/metrics")), live) == 1:
            break
        await asyncio.sleep(0.02)
    assert sample(await scrape(http, on.management_url("/metrics")), live) == 1
    assert sample(await scrape(http, off.management_url("/metrics")), live) == 0


async def test_unreachable_dependencies_are_named_with_address_and_reason(
    start_sidecar: Any, http: aiohttp.ClientSession, caplog: Any
) -> None:
    """Redis and the IdP both unreachable at start-up: /readyz names each with its address
    and the reason (what an operator needs), and the log says Redis is unavailable, once."""
    dead_redis, dead_idp = free_port(), free_port()
    config = make_config(
        session={
            "store": "redis",
            "cookie_name": "sidecar",
            "cookie_secure": False,
            "encryption_keys": [TEST_KEY],
        },
        redis={"url": f"redis://127.0.0.1:{dead_redis}/0", "key_prefix": "dead"},
        oidc={
            "issuer": f"http://127.0.0.1:{dead_idp}",
            "client_id": "app",
            "client_secret": "s3cret-value",
        },
    )
    caplog.set_level("INFO")
    sidecar = await start_sidecar(config)
    url = sidecar.management_url("/readyz")
    body: Any = {}
    for _ in range(100):
        status, body = await get_json(http, url)
        deps = body["dependencies"]
        reported = [deps.get(name, {}).get("detail", "starting") for name in ("redis", "idp")]
        if "starting" not in reported:
            break
        await asyncio.sleep(0.05)
    assert status == 503
    redis_detail = body["dependencies"]["redis"]["detail"]
    idp_detail = body["dependencies"]["idp"]["detail"]
    assert f"127.0.0.1:{dead_redis}" in redis_detail and "refused" in redis_detail.lower()
    assert f"127.0.0.1:{dead_idp}" in idp_detail
    assert "s3cret-value" not in str(body)
    warnings = [r for r in caplog.records if r.getMessage() == "session store unavailable"]
    assert len(warnings) == 1 and f"127.0.0.1:{dead_redis}" in warnings[0].error
