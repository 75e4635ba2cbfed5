"""Liveness and readiness (docs/operations.md, "Probes").

Dependencies report their own state here; the probe handlers only read it, so a probe
never waits on Redis or the IdP. A dependency is required until it has answered once;
afterwards only those in `management.readiness_requires` can make the sidecar unready.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def __init__(
        self,
        strict: Iterable[str] = (),
        *,
        on_ready: Callable[[bool, bool], None] = lambda _ready, _flap: None,
        on_report: Callable[[str, bool], None] = lambda _name, _up: None,
    ) -> None:
        """`on_ready(ready, flap)` hears each change of `ready` (a flap: one after the first
        time ready, not caused by draining), `on_report` each dependency's report: the metrics
        behind the readiness alerts (docs/operations.md, "Dashboard and alerts")."""
        self._strict = frozenset(strict)
        self._deps: dict[str, _Dependency] = {}
        self._warnings: dict[str, str] = {}
        self._draining = False
        self._on_ready = on_ready
        self._on_report = on_report
        self._published = False  # what `on_ready` heard last: unready until told otherwise
        self._been_ready = False  # start-up's first change to ready is no flap

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self._publish()

    def register(self, name: str) -> None:
        self._deps.setdefault(name, _Dependency())
        self._publish()

    def report(self, name: str, up: bool, detail: str = "") -> None:
        dep = self._deps.setdefault(name, _Dependency())
        dep.up = up
        dep.seen_up = dep.seen_up or up
        dep.detail = detail or ("ok" if up else "down")
        self._on_report(name, up)
        self._publish()

    def _publish(self) -> None:
        ready = self.ready
        if ready != self._published:
            self._published = ready
            self._on_ready(ready, self._been_ready and not self._draining)
            self._been_ready = self._been_ready or ready

    def warn(self, name: str, warning: str | None) -> None:
        """Set or clear a dependency's warning: shown in `/readyz`, never unready by itself
        (docs/operations.md, "Probes")."""
        if warning is None:
            self._warnings.pop(name, None)
        else:
            self._warnings[name] = warning

    @property
    def ready(self) -> bool:
        if self._draining:
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
