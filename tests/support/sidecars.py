"""The sidecar under test: in-process (`Sidecar`) or as a real `auth-sidecar run` process.

The fixtures that start and stop them are `start_sidecar` and `sidecar_process`
(tests/conftest.py); the classes are here for the tests that need their types or more control.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml
from aiohttp import web

from sidecar.app import build_apps
from sidecar.config import Config
from sidecar.refresh import RefreshTiming
from sidecar.server import main_runner_options, main_site
from tests.support.processes import stop_process

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "Sidecar",
    "SidecarProcess",
    "StartProcess",
    "StartSidecar",
    "console_script",
    "ready",
]


class Sidecar:
    """The in-process sidecar: production's runner options and main listener (`main_site`).

    Not aiohttp's `TestServer`: it forces `handler_cancellation=True`, so a test through it
    would pass even if production stopped cancelling the handlers of departed clients; and
    its plain TCP site would skip the listener's head deadline and parse-error answers.
    """

    __test__ = False

    def __init__(
        self,
        config: Config,
        refresh_timing: RefreshTiming | None = None,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """`span_exporter`: where spans go with `telemetry.otlp_endpoint` set (memory)."""
        self.config = config
        self.app, management = build_apps(
            config, refresh_timing=refresh_timing, span_exporter=span_exporter
        )
        options = main_runner_options(config, self.app)
        self._main = web.AppRunner(self.app, handle_signals=False, **options)
        self._management = web.AppRunner(management, handle_signals=False, access_log=None)
        self._base = self._management_base = ""

    async def start(self) -> None:
        self._base = await _start_on_free_port(self._main, self.config)
        self._management_base = await _start_on_free_port(self._management)

    async def close(self) -> None:
        await self._main.cleanup()
        await self._management.cleanup()

    def url(self, path: str) -> str:
        return self._base + path

    def management_url(self, path: str) -> str:
        return self._management_base + path


async def _start_on_free_port(runner: web.AppRunner, config: Config | None = None) -> str:
    """Bind port 0 directly: the kernel's pick is ours at once, nothing can take it first.

    With `config`, the site is the main listener, exactly as `server.serve` starts it.
    """
    await runner.setup()
    site: web.BaseSite
    if config is None:
        site = web.TCPSite(runner, "127.0.0.1", 0)
    else:
        site = main_site(runner, config, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


StartSidecar = Callable[[Config], Awaitable[Sidecar]]


async def ready(sc: Sidecar, attempts: int = 250) -> None:
    """Wait until the in-process sidecar's /readyz says 200 (its IdP discovery is done)."""
    async with aiohttp.ClientSession() as s:
        for _ in range(attempts):
            async with s.get(sc.management_url("/readyz")) as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.02)
    raise AssertionError("sidecar not ready")


def console_script() -> str:
    """`auth-sidecar`, the command the package installs next to this interpreter."""
    script = Path(sys.executable).with_name("auth-sidecar")
    if not script.exists():
        raise RuntimeError(f"{script} is missing: install the package (pip install -e .)")
    return str(script)


class SidecarProcess:
    """`auth-sidecar run` as a real subprocess, for memory, signal and multi-process tests.

    It inherits the test's environment (tests/conftest.py has removed the caller's sidecar
    variables from it) plus `env`.
    """

    def __init__(self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None):
        self.config = config
        self.path = tmp_path / f"sidecar-{config['server']['listen'].rsplit(':', 1)[1]}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        # One log per process: replicas of one test must not write over each other.
        self.log_path = tmp_path / f"sidecar-{config['server']['listen'].rsplit(':', 1)[1]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [console_script(), "run", "--config", str(self.path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.base = "http://" + config["server"]["listen"]
        self.management = "http://" + config["management"]["listen"]

    def url(self, path: str) -> str:
        return self.base + path

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {self.logs()}")
            try:
                with urllib.request.urlopen(self.management + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"sidecar not ready after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            stop_process(self.proc, 30)
        self._log.close()
        return self.proc.returncode


StartProcess = Callable[..., SidecarProcess]
