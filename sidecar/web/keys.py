"""Typed keys for the shared parts kept in application and request state."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from sidecar.access.admission import Admission
from sidecar.config import Config
from sidecar.forwarding.headers import ForwardedPolicy
from sidecar.forwarding.upstream import PathPrefixes, Router
from sidecar.health import READINESS
from sidecar.metrics import METRICS
from sidecar.oidc import BearerVerifier, OIDCClient
from sidecar.refresh import Refresher
from sidecar.session import SessionManager
from sidecar.session.cookie import Cookies
from sidecar.telemetry import Tracing
from sidecar.web.csrf import CsrfPolicy
from sidecar.web.ratelimit import ClientRateLimiter

__all__ = [
    "ADMISSION",
    "BEARER",
    "CONFIG",
    "COOKIES",
    "CSRF",
    "FORWARDED",
    "LOGIN_LIMITER",
    "METRICS",
    "OIDC",
    "PUBLIC",
    "READINESS",
    "REFRESHER",
    "ROUTE",
    "ROUTER",
    "SESSIONS",
    "TRACING",
]

ADMISSION: Final = web.AppKey("admission", Admission)
CONFIG: Final = web.AppKey("config", Config)
ROUTER: Final = web.AppKey("router", Router)
OIDC: Final = web.AppKey("oidc", OIDCClient)
SESSIONS: Final = web.AppKey("sessions", SessionManager)
COOKIES: Final = web.AppKey("cookies", Cookies)
REFRESHER: Final = web.AppKey("refresher", Refresher)
CSRF: Final = web.AppKey("csrf", CsrfPolicy)
BEARER: Final = web.AppKey("bearer", BearerVerifier)
# Per client address, on `/oauth2/start` (sidecar/web/ratelimit.py).
LOGIN_LIMITER: Final = web.AppKey("login_limiter", ClientRateLimiter)
FORWARDED: Final = web.AppKey("forwarded_policy", ForwardedPolicy)
PUBLIC: Final = web.AppKey("public_paths", PathPrefixes)
# Set only with tracing on (sidecar/telemetry.py): `app.get(TRACING)` is None when off.
TRACING: Final = web.AppKey("tracing", Tracing)
# The metrics label of the request's route: an upstream prefix or a sidecar endpoint.
ROUTE: Final = web.RequestKey("route", str)
