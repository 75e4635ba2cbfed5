"""`server.workers > 1`: N worker processes share the port (SO_REUSEPORT); this one supervises.

The supervisor serves the management listener for all of them: `/metrics` aggregates the
workers' Prometheus files (multiprocess mode), `/readyz` is ready only when every worker
says it is, and SIGTERM is passed on so every worker drains. A worker that dies is started
again after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from sidecar.config import Config

__all__ = ["WORKER_DIR_ENV", "run_workers", "write_worker_status"]

log = logging.getLogger("sidecar.supervisor")

WORKER_DIR_ENV: Final = "AUTH_SIDECAR_WORKER_DIR"
_STATUS_STALE: Final = 5.0  # seconds without a status write before a worker counts as stuck
_RESTART_DELAY: Final = 1.0  # pause before starting a worker that died
_POLL: Final = 0.25


def write_worker_status(directory: Path, slot: int, status: dict[str, object]) -> None:
    """A worker's readiness, for the supervisor's /readyz (atomic rename: never half-read)."""
    target = directory / f"worker-{slot}.json"
    scratch = target.with_suffix(".tmp")
    scratch.write_text(json.dumps(status))
    scratch.replace(target)


def _admin_api(management: web.Application, config: Config) -> None:
    """The admin API, served here with a store connection of its own (the workers serve none
    of the management listener); its `admin` logout counts are logged, not in /metrics."""
    if not config.admin.tokens:
        return
    from sidecar.app import open_sessions
    from sidecar.backend import open_backend
    from sidecar.web.admin import add_admin_routes

    store = open_backend(config).store
    add_admin_routes(
        management, config.admin.tokens, open_sessions(config, store), config.oidc.issuer
    )

    async def close_store(_: web.Application) -> None:
        await store.close()

    management.on_cleanup.append(close_store)


class _Workers:
    def __init__(self, config: Config, config_path: str, directory: Path) -> None:
        self._config = config
        self._config_path = config_path
        self._dir = directory
        self._metrics_dir = directory / "metrics"
        self._metrics_dir.mkdir()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def spawn(self, slot: int) -> None:
        env = {
            **os.environ,
            WORKER_DIR_ENV: str(self._dir),
            "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir),
        }
        command = [sys.executable, "-m", "sidecar", "run", "--config", self._config_path]
        self.procs[slot] = subprocess.Popen([*command, "--worker-slot", str(slot)], env=env)  # noqa: S603
        log.info("worker started", extra={"slot": slot, "pid": self.procs[slot].pid})

    async def watch(self) -> None:
        """Start again any worker that exits while we are not stopping."""
        while not self.stopping:
            await asyncio.sleep(_POLL)
            for slot, proc in list(self.procs.items()):
                if proc.poll() is None or self.stopping:
                    continue
                log.error("worker exited", extra={"slot": slot, "code": proc.returncode})
                mark_process_dead(proc.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
                (self._dir / f"worker-{slot}.json").unlink(missing_ok=True)
                await asyncio.sleep(_RESTART_DELAY)
                if not self.stopping:
                    self.spawn(slot)

    def statuses(self) -> dict[str, object]:
        now = time.time()
        workers: dict[str, object] = {}
        for slot, proc in self.procs.items():
            path = self._dir / f"worker-{slot}.json"
            try:
                status = json.loads(path.read_text())
                fresh = now - path.stat().st_mtime < _STATUS_STALE
            except (OSError, ValueError):
                status, fresh = {"ready": False, "detail": "starting"}, False
            alive = proc.poll() is None
            status["ready"] = bool(status.get("ready")) and fresh and alive
            workers[str(slot)] = status
        return workers

    async def stop(self, grace: float) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Child exits are not asyncio events: poll them.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            p.poll() is None for p in self.procs.values()
        ):
            await asyncio.sleep(_POLL)
        for proc in self.procs.values():
            if proc.poll() is None:
                log.error("worker did not stop in time; killing it", extra={"pid": proc.pid})
                proc.kill()
                proc.wait()

    def metrics(self) -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)


async def run_workers(config: Config, config_path: str) -> None:
    """Supervise `server.workers` processes until SIGTERM/SIGINT, then drain them all."""
    directory = Path(tempfile.mkdtemp(prefix="auth-sidecar-"))
    workers = _Workers(config, config_path, directory)
    draining = False

    async def healthz(request: web.Request) -> web.Response:
        alive = all(p.poll() is None for p in workers.procs.values())
        return web.json_response({"status": "ok" if alive else "worker down"})

    async def readyz(request: web.Request) -> web.Response:
        statuses = workers.statuses()
        ready = not draining and all(s["ready"] for s in statuses.values())  # type: ignore[index]
        body = {"ready": ready, "draining": draining, "workers": statuses}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=workers.metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    management = web.Application()
    management.router.add_get("/healthz", healthz)
    management.router.add_get("/readyz", readyz)
    management.router.add_get("/metrics", metrics)
    _admin_api(management, config)
    runner = web.AppRunner(management, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = config.management.listen
    watcher: asyncio.Task[None] | None = None
    try:
        await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
        for slot in range(config.server.workers):
            workers.spawn(slot)
        watcher = asyncio.create_task(workers.watch())
        log.info("supervising", extra={"workers": config.server.workers})
        await stop.wait()
        draining = True
        server = config.server
        await workers.stop(server.shutdown_delay + server.shutdown_grace + 5.0)
    finally:
        workers.stopping = True
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await workers.stop(5.0)
        await runner.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    log.info("stopped")
