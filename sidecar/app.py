"""The one wiring point: builds the main and management applications from a `Config`.

Every route (docs/architecture.md, "Endpoints") is registered here, so the table can be checked
on one screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.access.admission import Admission
from sidecar.access.routes import RouteTable
from sidecar.backend import Backend, open_backend
from sidecar.config import Config
from sidecar.errors import StoreUnavailable
from sidecar.forwarding.headers import ForwardedPolicy, injected_names
from sidecar.forwarding.upstream import PathPrefixes, Router, Upstream
from sidecar.health import Readiness, healthz, readyz
from sidecar.metrics import Metrics, metrics_endpoint
from sidecar.oidc import BearerVerifier, OIDCClient
from sidecar.refresh import Refresher, RefreshTiming
from sidecar.session import Keyring, SessionManager
from sidecar.session.cookie import Cookies
from sidecar.session.manager import TracedSessionManager
from sidecar.session.store import SessionStore
from sidecar.telemetry import TRACE_HEADERS, Tracing
from sidecar.web import idp_logout, login, logout, userinfo
from sidecar.web.admin import add_admin_routes
from sidecar.web.csrf import CsrfPolicy
from sidecar.web.forward_auth import AUTH_PATH, forward_auth
from sidecar.web.keys import (
    ADMISSION,
    BEARER,
    CONFIG,
    COOKIES,
    CSRF,
    FORWARDED,
    LOGIN_LIMITER,
    METRICS,
    OIDC,
    PUBLIC,
    READINESS,
    REFRESHER,
    ROUTER,
    SESSIONS,
    TRACING,
)
from sidecar.web.middleware import add_request_id, map_errors, observe
from sidecar.web.proxy import proxy
from sidecar.web.ratelimit import ClientRateLimiter
from sidecar.web.routing import Dispatcher
from sidecar.web.tracing import trace_requests

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["build_apps", "open_sessions"]

log = logging.getLogger("sidecar")

_STORE_PROBE_INTERVAL: Final = 5.0  # seconds between Redis pings for /readyz
_CLOSE_TIMEOUT: Final = 2.0  # a background task gets this long to stop at shutdown
_BACKEND: Final = web.AppKey("backend", Backend)  # what `_session_store` starts and stops


def build_apps(
    config: Config,
    store: SessionStore | None = None,
    *,
    refresh_timing: RefreshTiming | None = None,
    span_exporter: SpanExporter | None = None,
) -> tuple[web.Application, web.Application]:
    """The main application (proxy and sidecar endpoints) and the management one.

    `store` lets tests share one in-memory store between apps; normally it comes from config.
    `refresh_timing` lets tests run the refresh protocol with shorter fixed intervals.
    `span_exporter` takes the spans instead of `telemetry.otlp_endpoint` (tests keep them).
    """
    # Off without telemetry.otlp_endpoint: then nothing below traces (sidecar/telemetry.py).
    tracing = Tracing.open(config.telemetry, span_exporter)
    metrics = Metrics()
    readiness = Readiness(
        config.management.readiness_requires,
        on_ready=metrics.readiness_changed,
        on_report=metrics.dependency_reported,
    )
    policy = ForwardedPolicy(config.server.trusted_proxies)
    cookies = Cookies(config.session)
    # Client copies of every injected header are dropped, even on public paths.
    dropped = injected_names(config.inject)
    if tracing is not None:
        dropped |= TRACE_HEADERS  # the upstream gets our span's instead (docs/decisions.md)
    router = Router(
        Upstream(
            u,
            policy,
            metrics,
            drop=dropped,
            cookie_filter=cookies.strip,
            body_timeout=config.server.body_timeout,
            tracing=tracing,
        )
        for u in config.upstreams
    )
    backend = open_backend(config, store)
    oidc = OIDCClient(
        config.oidc,
        redirect_uri=config.server.public_url + "/oauth2/callback",
        timeout=config.refresh.idp_timeout,
        readiness=readiness,
        # A refresh grant outliving its callers is waited for, not abandoned (docs/refresh.md).
        answer_within=config.refresh.late_answer_timeout,
        tracing=tracing,
    )

    # The only router: every request, routed on its canonical path (sidecar/web/routing.py).
    endpoints: dict[str, dict[str, Handler]] = {
        "/oauth2/start": {"GET": login.start},
        "/oauth2/callback": {"GET": login.callback},
        "/oauth2/sign_out": {"GET": logout.sign_out, "POST": logout.sign_out},
        "/oauth2/userinfo": {"GET": userinfo.userinfo},
        AUTH_PATH: {"*": forward_auth},  # front proxies may send the original method
        "/oauth2/backchannel-logout": {"POST": idp_logout.backchannel_logout},
        "/oauth2/frontchannel-logout": {"GET": idp_logout.frontchannel_logout},
    }
    # Envoy's ext_authz sends `/oauth2/auth<original path>` (docs/forward-auth.md).
    prefixes = {AUTH_PATH + "/": endpoints[AUTH_PATH]}
    # The request span, only with tracing on: outside map_errors, it sees the final status.
    traced = [] if tracing is None else [trace_requests(tracing, endpoints)]
    main = web.Application(
        middlewares=[observe, *traced, map_errors, Dispatcher(endpoints, proxy, prefixes)]
    )
    main[CONFIG] = config
    main[METRICS] = metrics
    main[READINESS] = readiness
    main[ROUTER] = router
    main[FORWARDED] = policy
    main[OIDC] = oidc
    sessions = open_sessions(
        config, backend.store, on_caching=metrics.session_cache_live.set, tracing=tracing
    )
    main[SESSIONS] = sessions
    main[_BACKEND] = backend
    main[REFRESHER] = Refresher(
        sessions,
        oidc,
        backend.locks,
        backend.events,
        config.refresh,
        metrics,
        timing=refresh_timing or RefreshTiming(),
        tracing=tracing,
    )
    main[COOKIES] = cookies
    main[LOGIN_LIMITER] = ClientRateLimiter.for_logins(config.login, policy)
    main[ADMISSION] = Admission(
        config.access,
        config.inject,
        {u.path: RouteTable(u.rules) for u in config.upstreams},
    )
    main[CSRF] = CsrfPolicy(config)
    main[BEARER] = BearerVerifier(config.bearer, oidc)
    main[PUBLIC] = PathPrefixes(config.public_paths)
    # A route every origin-form path matches, never called: without one, aiohttp builds a
    # 404 exception for each request before the dispatcher (the last middleware) runs.
    main.router.add_route("*", "/{tail:.*}", proxy)
    if tracing is not None:
        main[TRACING] = tracing
        main.cleanup_ctx.append(_tracing)  # first in, last out: the shutdown's spans go too
    main.cleanup_ctx.append(_upstream_pools)
    main.cleanup_ctx.append(_session_store)
    main.cleanup_ctx.append(_identity_provider)
    main.on_response_prepare.append(add_request_id)

    management = web.Application()
    management[METRICS] = metrics
    management[READINESS] = readiness
    management.router.add_get("/healthz", healthz)
    management.router.add_get("/readyz", readyz)
    management.router.add_get("/metrics", metrics_endpoint)
    add_admin_routes(management, config.admin.tokens, sessions, config.oidc.issuer)
    return main, management


def open_sessions(
    config: Config,
    store: SessionStore,
    *,
    on_caching: Callable[[bool], None] = lambda _: None,
    tracing: Tracing | None = None,
) -> SessionManager:
    """The session manager over `store` with the configured keys: the main application's, and
    the one the supervisor's admin API and the `sessions` command use."""
    keyring = Keyring.from_base64([k.get_secret_value() for k in config.session.encryption_keys])
    if tracing is not None:
        return TracedSessionManager(tracing, store, keyring, config.session, on_caching=on_caching)
    return SessionManager(store, keyring, config.session, on_caching=on_caching)


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    """The tracer provider exports until the end: its queue is flushed at shutdown."""
    yield
    await app[TRACING].close()


async def _upstream_pools(app: web.Application) -> AsyncIterator[None]:
    """Open every upstream's connection pool at start-up; close them after draining."""
    upstreams = app[ROUTER].upstreams
    for upstream in upstreams:
        await upstream.start()
    yield
    for upstream in upstreams:
        await upstream.close()


async def _session_store(app: web.Application) -> AsyncIterator[None]:
    """Probe the store for /readyz in the background; close it last."""
    backend = app[_BACKEND]
    store = backend.store
    readiness = app[READINESS]
    stop = asyncio.Event()
    probe = None
    if backend.readiness is not None:
        readiness.register(backend.readiness)
        probe = asyncio.create_task(_probe_store(store, backend.readiness, readiness, stop))
    await backend.events.start()
    changes = asyncio.create_task(app[SESSIONS].follow_changes(), name="session-changes")
    yield
    changes.cancel()
    await asyncio.wait({changes}, timeout=_CLOSE_TIMEOUT)
    await backend.events.close()
    stop.set()
    if probe is not None:
        # redis-py may turn a cancellation inside a command into a connection error, so
        # the loop also ends on `stop`, and shutdown never waits on it for long.
        probe.cancel()
        await asyncio.wait({probe}, timeout=_CLOSE_TIMEOUT)
    await store.close()


async def _probe_store(
    store: SessionStore, name: str, readiness: Readiness, stop: asyncio.Event
) -> None:
    up: bool | None = None  # what the last probe found: logged when it changes
    warned: str | None = None  # the eviction warning last logged (docs/redis.md)
    while not stop.is_set():
        try:
            await store.ping()
            readiness.report(name, True)
            if up is False:
                log.info("session store reachable again", extra={"dependency": name})
            # Each probe: a failover or a CONFIG SET may change it; logged when it changes.
            warning = await store.eviction_risk()
            readiness.warn(name, warning)
            if warning is not None and warning != warned:
                log.warning(warning, extra={"dependency": name})
            warned = warning
            up = True
        except StoreUnavailable as exc:
            readiness.report(name, False, str(exc))
            if up is not False:
                log.warning(
                    "session store unavailable", extra={"dependency": name, "error": str(exc)}
                )
            up = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _STORE_PROBE_INTERVAL)


async def _identity_provider(app: web.Application) -> AsyncIterator[None]:
    """Start the IdP client (and the bearer-token verifier, which leans on it) and load its
    metadata in the background (start-up never blocks)."""
    oidc, bearer = app[OIDC], app[BEARER]
    await oidc.start()
    await bearer.start()
    discovery = asyncio.create_task(oidc.discover_forever())
    yield
    discovery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await discovery
    await bearer.close()
    await oidc.close()
