"""Prometheus metrics, kept in a registry of their own (no module-level globals)."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["METRICS", "Metrics", "metrics_endpoint"]

# Proxy latency sits mostly between 1 ms and 1 s; the tail buckets catch slow upstreams.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every collector the sidecar exports; one instance per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sidecar_http_requests",
            "Requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidecar_http_request_duration_seconds",
            "Time from request received to response finished, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "sidecar_http_requests_in_flight",
            "Requests being handled now.",
            registry=self.registry,
            multiprocess_mode="livesum",  # summed over live workers when server.workers > 1
        )
        self.session_cache_live = Gauge(
            "sidecar_session_cache_live",
            "1 while sessions are served from this process's memory (the store's change feed "
            "is followed), 0 while every request reads the store.",
            registry=self.registry,
            multiprocess_mode="livemin",  # with workers: 0 if any live worker's cache is off
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors",
            "Failures talking to an upstream, by upstream path prefix and kind.",
            ["upstream", "kind"],
            registry=self.registry,
        )

        self.refresh_outcomes = Counter(
            "sidecar_refresh",
            "Refresh attempts by outcome (refreshed, refreshed_elsewhere, transient, "
            "invalid_grant_revoked, invalid_grant_lost_rotation, unavailable, …).",
            ["outcome"],
            registry=self.registry,
        )
        self.idp_latency = Histogram(
            "sidecar_idp_token_request_duration_seconds",
            "Latency of refresh grants at the IdP token endpoint.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lock_wait = Histogram(
            "sidecar_refresh_lock_wait_seconds",
            "Time spent waiting for another process's refresh of the same session.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refresh_joins = Counter(
            "sidecar_refresh_singleflight_joins",
            "Requests that joined a refresh already running in this process.",
            registry=self.registry,
        )
        self.lock_contention = Counter(
            "sidecar_refresh_lock_contention",
            "Refresh lock acquisitions that found the session's lock held elsewhere.",
            registry=self.registry,
        )
        self.idp_breaker_open = Gauge(
            "sidecar_idp_breaker_open",
            "1 while this process's IdP circuit breaker is open (token endpoint failing: one "
            "refresh probe per refresh.probe_interval), else 0.",
            registry=self.registry,
            multiprocess_mode="livemax",  # with workers: 1 if any live worker's is open
        )
        self.idp_breaker_transitions = Counter(
            "sidecar_idp_breaker_transitions",
            "IdP circuit breaker transitions, by the state entered: open or closed.",
            ["state"],
            registry=self.registry,
        )
        for state in ("open", "closed"):
            self.idp_breaker_transitions.labels(state)  # exported at 0 before any transition
        self.login_rate_limited = Counter(
            "sidecar_login_rate_limited",
            "/oauth2/start calls refused with 429: the client address ran out of tokens.",
            registry=self.registry,
        )
        self.login_pending_dropped = Counter(
            "sidecar_login_pending_dropped",
            "Pending logins dropped because their browser started newer ones beyond "
            "login.max_pending_per_browser.",
            registry=self.registry,
        )
        self.logouts = Counter(
            "sidecar_logout",
            "Sessions ended by a logout, by kind: rp (sign-out), everywhere, backchannel, "
            "frontchannel, admin, cap (session.max_per_user).",
            ["kind"],
            registry=self.registry,
        )
        self.backchannel_rejected = Counter(
            "sidecar_backchannel_rejected",
            "Back-channel logout requests refused with 400, by the check that failed.",
            ["reason"],
            registry=self.registry,
        )
        self.access_log_dropped = Counter(
            "sidecar_access_log_dropped",
            "Access log lines lost: stderr too far behind (more than 8 MiB waiting) or a "
            "failed write.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "sidecar_ready",
            "1 while /readyz answers 200, 0 while it answers 503 (starting, draining, or a "
            "dependency in management.readiness_requires down).",
            registry=self.registry,
            multiprocess_mode="livemin",  # with workers: 0 if any live worker is unready
        )
        self.readiness_transitions = Counter(
            "sidecar_readiness_transitions",
            "Changes of /readyz between ready and unready after start-up, draining excepted; "
            "counted, so flapping between scrapes is seen.",
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "sidecar_dependency_up",
            "1 while a dependency (redis, idp) answered its last check, 0 while it failed; "
            "as /readyz reports it.",
            ["dependency"],
            registry=self.registry,
            multiprocess_mode="livemin",  # with workers: 0 if any live worker sees it down
        )

        # Labelled children by label values: `labels()` costs a lock and a tuple per call.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and observe its duration (the per-request hot path)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def readiness_changed(self, ready: bool, flap: bool) -> None:
        """/readyz turned ready or unready (sidecar/health.py calls this on each change)."""
        self.ready.set(ready)
        if flap:
            self.readiness_transitions.inc()

    def dependency_reported(self, name: str, up: bool) -> None:
        """A dependency's check answered (sidecar/health.py calls this on each report)."""
        self.dependency_up.labels(name).set(up)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS: Final = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """`/metrics` on the management listener, in Prometheus' text format."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
