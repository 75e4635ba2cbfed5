"""Runs the two listeners and owns the shutdown sequence.

SIGTERM: `/readyz` turns 503 at once, the listener keeps serving for
`server.shutdown_delay` (while Kubernetes removes the pod from its Service), then stops
accepting and gives in-flight requests `server.shutdown_grace` to finish; exit 0.

The main listener is `listener.Listener`: aiohttp's server with the client limits of
docs/proxy.md ("Client timeouts and limits"); `main_runner_options` and `main_site` are the
only places its options come from, for production and tests alike.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import web

from sidecar import __version__
from sidecar.access_log import AccessLog
from sidecar.app import build_apps
from sidecar.config import Address, Config
from sidecar.errors import ConfigError
from sidecar.health import READINESS, Readiness
from sidecar.listener import Listener
from sidecar.metrics import METRICS
from sidecar.supervisor import WORKER_DIR_ENV, run_workers, write_worker_status

__all__ = ["main_runner_options", "main_site", "run", "run_until_done", "serve"]

log = logging.getLogger("sidecar")

# Connections the kernel may queue before they are accepted (capped by net.core.somaxconn).
# aiohttp's default, 128, overflows when a few hundred clients connect at once, and every
# SYN dropped then costs its client a one-second retry (bench/README.md, refresh storm).
_BACKLOG: Final = 2048


async def serve(
    config: Config, stop: asyncio.Event | None = None, *, worker_slot: int | None = None
) -> None:
    """Serve until `stop` is set (by default: until SIGTERM or SIGINT).

    As one of several workers (`worker_slot`), share the port with SO_REUSEPORT, leave the
    management listener to the supervisor and report readiness to it through a file.
    """
    main, management = build_apps(config)
    stop = stop or _stop_on_signals()
    main_runner = web.AppRunner(main, handle_signals=False, **main_runner_options(config, main))
    management_runner = web.AppRunner(management, handle_signals=False, access_log=None)
    await main_runner.setup()
    await management_runner.setup()
    reporter: asyncio.Task[None] | None = None
    try:
        listen = config.server.listen
        shared = worker_slot is not None
        site = main_site(main_runner, config, listen.host, listen.port, reuse_port=shared)
        await _start(site, listen, "server.listen")
        if worker_slot is None:
            address = config.management.listen
            management_site = web.TCPSite(
                management_runner,
                address.host,
                address.port,
                backlog=_BACKLOG,
                reuse_address=True,
            )
            await _start(management_site, address, "management.listen")
        else:
            reporter = asyncio.create_task(_report_status(main[READINESS], worker_slot))
        # What start-up built (modules, config, routes, pools) lives as long as the process:
        # out of the collector's sight, full collections stop walking it (shorter GC pauses).
        gc.freeze()
        log.info(
            "listening",
            extra={
                "version": __version__,
                "listen": str(config.server.listen),
                "management": str(config.management.listen),
                "worker": worker_slot,
            },
        )
        await stop.wait()
        main[READINESS].draining = True
        log.info("draining", extra={"delay_s": config.server.shutdown_delay})
        await asyncio.sleep(config.server.shutdown_delay)
    finally:
        await main_runner.cleanup()
        await management_runner.cleanup()
        if reporter is not None:
            reporter.cancel()
    log.info("stopped")


async def _report_status(readiness: Readiness, slot: int) -> None:
    directory = Path(os.environ[WORKER_DIR_ENV])
    while True:
        write_worker_status(directory, slot, readiness.snapshot())
        await asyncio.sleep(0.5)


def main_runner_options(
    config: Config, app: web.Application, access_stream: TextIO | None = None
) -> dict[str, Any]:
    """How the main listener handles `app`'s connections; tests start their servers with
    these too. With the access log on, `app` writes it from start-up to cleanup, to
    `access_stream` (default: stderr; docs/operations.md, "Access log")."""
    server = config.server
    options: dict[str, Any] = {
        "access_log": None,
        "handler_cancellation": True,  # a client that goes away cancels its upstream request
        "auto_decompress": False,  # bodies pass through as the client compressed them
        "shutdown_timeout": server.shutdown_grace,
        "keepalive_timeout": server.keepalive_timeout,
        # aiohttp checks the request line against max_line_size and each header line (name
        # and value) against max_field_size: one limit for both, as nginx's buffers do.
        "max_line_size": server.max_header_size,
        "max_field_size": server.max_header_size,
        "max_headers": server.max_headers,
    }
    if config.logging.access_log:
        access = AccessLog(app[METRICS].access_log_dropped.inc, access_stream)
        app.cleanup_ctx.append(access.run)
        options["access_log_class"] = access.logger_class()
        options["access_log"] = logging.getLogger("sidecar.access")
    return options


def main_site(
    runner: web.AppRunner, config: Config, host: str, port: int, *, reuse_port: bool = False
) -> Listener:
    """The main listener on `host:port` (0: the kernel picks), not yet started."""
    return Listener(
        runner,
        host,
        port,
        header_timeout=config.server.header_timeout,
        backlog=_BACKLOG,
        reuse_port=reuse_port,
    )


async def _start(site: web.BaseSite, address: Address, key: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        # A port in use or a host that is not ours: the operator's to fix, not a crash.
        reason = exc.strerror or str(exc)
        raise ConfigError([f"{key}: cannot listen on {address}: {reason}"]) from None


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run(config: Config, config_path: str, worker_slot: int | None = None) -> None:
    """Run the sidecar: in this process, as a worker, or as the supervisor of workers."""
    if worker_slot is None and config.server.workers > 1:
        run_until_done(run_workers(config, config_path))
    else:
        run_until_done(serve(config, worker_slot=worker_slot))


def run_until_done(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on uvloop when it is installed."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
