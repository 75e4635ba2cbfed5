"""The one wiring point: builds the main and management applications from a `Config`.

Every route of DESIGN §2 is registered here, so the table can be checked on one screen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.appkeys import CONFIG, METRICS, READINESS, ROUTE, ROUTER
from sidecar.config import Config
from sidecar.headers import ForwardedPolicy
from sidecar.health import Readiness, healthz, readyz
from sidecar.logging import REQUEST_ID
from sidecar.metrics import Metrics
from sidecar.middleware import add_request_id, map_errors, observe
from sidecar.proxy import Router, Upstream
from sidecar.responses import error_response

__all__ = ["build_apps"]

_REQUEST_ID_HEADER = frozenset({"x-request-id"})


def build_apps(config: Config) -> tuple[web.Application, web.Application]:
    """The main application (proxy and sidecar endpoints) and the management one."""
    metrics = Metrics()
    readiness = Readiness(config.management.readiness_requires)
    policy = ForwardedPolicy(config.server.trusted_proxies)
    router = Router(Upstream(u, policy, metrics) for u in config.upstreams)

    main = web.Application(middlewares=[observe, map_errors])
    main[CONFIG] = config
    main[METRICS] = metrics
    main[READINESS] = readiness
    main[ROUTER] = router
    main.cleanup_ctx.append(_upstream_pools)
    main.on_response_prepare.append(add_request_id)
    main.router.add_route("*", "/{tail:.*}", proxy)

    management = web.Application()
    management[METRICS] = metrics
    management[READINESS] = readiness
    management.router.add_get("/healthz", healthz)
    management.router.add_get("/readyz", readyz)
    management.router.add_get("/metrics", metrics_handler)
    return main, management


async def _upstream_pools(app: web.Application) -> AsyncIterator[None]:
    """Open every upstream's connection pool at start-up; close them after draining."""
    upstreams = app[ROUTER].upstreams
    for upstream in upstreams:
        await upstream.start()
    yield
    for upstream in upstreams:
        await upstream.close()


async def proxy(request: web.Request) -> web.StreamResponse:
    """Everything that is not a sidecar endpoint goes to the upstream of its path."""
    upstream = request.app[ROUTER].match(request.path)
    if upstream is None:
        request[ROUTE] = "unrouted"
        return error_response(request, 404, "no_upstream", "no upstream serves this path")
    request[ROUTE] = upstream.prefix
    return await upstream.forward(
        request, extra=[("X-Request-Id", request[REQUEST_ID])], drop=_REQUEST_ID_HEADER
    )


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
