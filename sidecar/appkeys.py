"""Typed keys for the shared parts kept in application and request state."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from sidecar.config import Config
from sidecar.health import READINESS
from sidecar.metrics import Metrics
from sidecar.proxy import Router

__all__ = ["CONFIG", "METRICS", "READINESS", "ROUTE", "ROUTER"]

CONFIG: Final = web.AppKey("config", Config)
METRICS: Final = web.AppKey("metrics", Metrics)
ROUTER: Final = web.AppKey("router", Router)
# The metrics label of the request's route: an upstream prefix or a sidecar endpoint.
ROUTE: Final = web.RequestKey("route", str)
