"""Liveness and readiness (docs/operations.md, "Probes").

Dependencies report their own state here; the probe handlers only read it, so a probe
never waits on Redis or the IdP. A dependency is required until it has answered once;
afterwards only those in `management.readiness_requires` can make the sidecar unready.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

__all__ = ["READINESS", "Readiness", "healthz", "readyz"]


@dataclass(slots=True)
class _Dependency:
    up: bool = False
    seen_up: bool = False
    detail: str = "starting"


class Readiness:
    """What `/readyz` answers: registered dependencies, and whether we are draining."""

    def __init__(self, strict: Iterable[str] = ()) -> None:
        self._strict = frozenset(strict)
        self._deps: dict[str, _Dependency] = {}
        self._warnings: dict[str, str] = {}
        self.draining = False

    def register(self, name: str) -> None:
        self._deps.setdefault(name, _Dependency())

    def report(self, name: str, up: bool, detail: str = "") -> None:
        dep = self._deps.setdefault(name, _Dependency())
        dep.up = up
        dep.seen_up = dep.seen_up or up
        dep.detail = detail or ("ok" if up else "down")

    def warn(self, name: str, warning: str | None) -> None:
        """Set or clear a dependency's warning: shown in `/readyz`, never unready by itself
        (docs/operations.md, "Probes")."""
        if warning is None:
            self._warnings.pop(name, None)
        else:
            self._warnings[name] = warning

    @property
    def ready(self) -> bool:
        if self.draining:
            return False
        return all(
            dep.up if name in self._strict else dep.seen_up for name, dep in self._deps.items()
        )

    def snapshot(self) -> dict[str, object]:
        body: dict[str, object] = {
            "ready": self.ready,
            "draining": self.draining,
            "dependencies": {
                name: {"up": dep.up, "detail": dep.detail} for name, dep in self._deps.items()
            },
        }
        if self._warnings:
            body["warnings"] = dict(self._warnings)
        return body


READINESS: Final = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    """The process and its event loop answer."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when ready; 503 while starting, draining or a strict dependency is down."""
    body = request.app[READINESS].snapshot()
    return web.json_response(body, status=200 if body["ready"] else 503)
