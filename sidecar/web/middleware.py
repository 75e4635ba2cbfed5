"""The main listener's middlewares: request context and metrics, then errors mapped to short
answers (docs/architecture.md, "Failure policy")."""

from __future__ import annotations

import logging
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.errors import (
    IdPError,
    RefreshUnavailable,
    RequestBodyTimeout,
    SessionEnded,
    SidecarError,
    StoreUnavailable,
    UpstreamError,
)
from sidecar.logging import REQUEST_ID, request_id_for
from sidecar.web.authenticate import unauthenticated
from sidecar.web.keys import METRICS, ROUTE
from sidecar.web.responses import answer_and_close, error_response

__all__ = ["map_errors", "observe"]

log = logging.getLogger("sidecar")

# Methods get their own metrics label; anything else counts as OTHER (bounded cardinality).
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id, and count it, time it and track it in flight."""
    request[REQUEST_ID] = request_id_for(request)
    metrics = request.app[METRICS]
    started = time.perf_counter()
    status = 500
    metrics.in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.in_flight.dec()
        method = request.method
        metrics.request_done(
            request.get(ROUTE, "none"),
            method if method in _METHODS else "OTHER",
            status,
            time.perf_counter() - started,
        )


@web.middleware
async def map_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the sidecar's own errors into short answers; nothing else leaks a traceback."""
    try:
        return await handler(request)
    except UpstreamError as exc:
        retry = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return error_response(request, exc.status, exc.code, str(exc), headers=retry)
    except RequestBodyTimeout as exc:
        return await answer_and_close(
            request,
            error_response(request, exc.status, exc.code, "the request body stopped arriving"),
        )
    except SessionEnded:
        return unauthenticated(request)
    except RefreshUnavailable as exc:
        return error_response(
            request,
            503,
            exc.code,
            "the identity provider is unavailable; try again shortly",
            headers={"Retry-After": str(exc.retry_after)},
        )
    except (StoreUnavailable, IdPError) as exc:
        log.warning("dependency unavailable", extra={"error": type(exc).__name__})
        return error_response(
            request,
            503,
            exc.code,
            "a dependency is unavailable; try again shortly",
            headers={"Retry-After": "5"},
        )
    except web.HTTPException:
        raise
    except SidecarError:
        log.exception("request failed")
        return error_response(request, 500, "internal_error", "the sidecar failed")


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: echo the request id so clients can quote it."""
    request_id = request.get(REQUEST_ID)
    if request_id and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = request_id
