"""The request span (docs/operations.md, "Traces"): a middleware installed only with tracing
on, so that with tracing off a request does not even pass through it.

The span continues the caller's W3C trace (`traceparent`, `tracestate`) and carries the HTTP
semantic-convention attributes of a server span, the path without its query string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.forwarding.paths import PATH
from sidecar.logging import REQUEST_ID
from sidecar.telemetry import Tracing
from sidecar.web.keys import FORWARDED, ROUTE

__all__ = ["trace_requests"]

# HTTP semantic conventions: any other method is recorded as `_OTHER` (bounded values).
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


def trace_requests(tracing: Tracing, endpoints: Iterable[str]) -> Middleware:
    """The middleware; `endpoints`: the sidecar's own paths, each its own `http.route`."""
    own = frozenset(endpoints)

    @web.middleware
    async def trace(request: web.Request, handler: Handler) -> web.StreamResponse:
        method = request.method if request.method in _METHODS else "_OTHER"
        attributes = {
            "http.request.method": method,
            "url.scheme": request.scheme,
            "client.address": request.app[FORWARDED].client_ip(request),
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            "sidecar.request_id": request[REQUEST_ID],
        }
        parent = tracing.continued(request.headers)
        with tracing.span(method, kind="server", attributes=attributes, parent=parent) as span:
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                target = request.get(PATH)
                path = target.path if target is not None else request.raw_path.partition("?")[0]
                span.set("url.path", path)
                span.set("http.response.status_code", status)
                route = request.get(ROUTE, "none")
                if path in own:
                    route = path
                span.set("http.route", route)
                span.rename(f"{method} {route}")
                if status >= 500:
                    span.fail(str(status))

    return trace
