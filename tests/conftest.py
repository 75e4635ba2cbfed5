"""Shared fixtures: configs built from dicts, the sidecar in-process or as a real process."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import build_apps
from sidecar.config import Config
from sidecar.server import main_runner_options, main_site
from sidecar.session import MemorySessionStore, RedisSessionStore
from sidecar.session.store import SessionStore
from tests.support.processes import stop_process

TEST_KEY = base64.b64encode(b"k" * 32).decode()


# Listen ports come from below the kernel's ephemeral range (32768-60999 on Linux): a port the
# OS picked with bind(0) is handed to outgoing connections too, and one of those can take it
# before the process we start binds it. Each pytest process walks its own slice of this range,
# so a test run and a CI run on the same machine do not meet either.
# (Redis Cluster nodes take 10000-11999, their bus ports 20000-21999: see redis_topologies.)
_PORTS = range(22000, 32000)
_next_port = _PORTS.start + (os.getpid() * 97) % len(_PORTS)


def free_port() -> int:
    """A port no earlier call returned and nothing listens on now."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (port + 1 - _PORTS.start) % len(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def config_dict(upstream_url: str = "http://127.0.0.1:9", **sections: Any) -> dict[str, Any]:
    """A minimal valid configuration as a dict; keyword arguments replace whole sections.

    It logs in against the shared dev IdP, keeps sessions in memory, and makes every path
    public (proxy tests); login tests pass `public_paths=[]`.
    """
    from tests.idp import CLIENT_ID, CLIENT_SECRET, shared_idp

    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    idp = shared_idp()
    idp.register(public_url)
    data: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": public_url},
        "management": {"listen": f"127.0.0.1:{free_port()}"},
        "oidc": {
            "issuer": idp.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "post_logout_redirect_url": public_url + "/",
        },
        "session": {
            "store": "memory",
            "cookie_name": "sidecar",
            "cookie_secure": False,
            "encryption_keys": [TEST_KEY],
        },
        "upstreams": [{"path": "/", "url": upstream_url}],
        "public_paths": ["/"],
        "logging": {"level": "info"},
    }
    data.update(sections)
    return data


def make_config(upstream_url: str = "http://127.0.0.1:9", **sections: Any) -> Config:
    return Config.model_validate(config_dict(upstream_url, **sections))


class Sidecar:
    """The in-process sidecar: production's runner options and main listener (`main_site`).

    Not aiohttp's `TestServer`: it forces `handler_cancellation=True`, so a test through it
    would pass even if production stopped cancelling the handlers of departed clients; and
    its plain TCP site would skip the listener's head deadline and parse-error answers.
    """

    __test__ = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app, management = build_apps(config)
        self._main = web.AppRunner(self.app, handle_signals=False, **main_runner_options(config))
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


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[[Config], Awaitable[Sidecar]]]:
    """`await start_sidecar(config)` runs the sidecar in-process; closed after the test."""
    started: list[Sidecar] = []

    async def start(config: Config) -> Sidecar:
        sidecar = Sidecar(config)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in reversed(started):
        await sidecar.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that changes nothing: no decompression, no cookie jar."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
async def upstream_app() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await upstream_app(app, **runner_options)` serves a real aiohttp upstream; its URL.

    Runner options (such as `auto_decompress=False`) go to `start_server`, where aiohttp
    reads them; `TestServer(...)` would drop them without a word.
    """
    servers: list[TestServer] = []

    async def serve(app: web.Application, **options: Any) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**options)
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield serve
    for server in servers:
        await server.close()


def console_script() -> str:
    """`auth-sidecar`, the command the package installs next to this interpreter."""
    script = Path(sys.executable).with_name("auth-sidecar")
    if not script.exists():
        raise RuntimeError(f"{script} is missing: install the package (pip install -e .)")
    return str(script)


class SidecarProcess:
    """`auth-sidecar run` as a real subprocess, for memory, signal and multi-process tests."""

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

    def wait_ready(self, timeout: float = 15.0) -> None:
        import urllib.request

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


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """`sidecar_process(config_dict)` starts a real sidecar process and waits until ready."""
    procs: list[SidecarProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> SidecarProcess:
        proc = SidecarProcess(config, tmp_path, env)
        procs.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        proc.stop()


REDIS_URL = os.environ.get("AUTH_SIDECAR_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix unique to the test on the real Redis; its keys are removed afterwards.

    Redis is a hard requirement: a missing server fails the test instead of skipping it.
    """
    import secrets

    import redis.asyncio as redis

    prefix = f"test-{secrets.token_hex(6)}"
    client = redis.Redis.from_url(REDIS_URL)
    await client.ping()
    yield prefix
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[SessionStore]:
    """Each session store in turn: the memory one, and Redis under the test's own prefix."""
    if request.param == "memory":
        yield MemorySessionStore()
        return
    redis_store = RedisSessionStore.from_url(REDIS_URL, redis_prefix)
    yield redis_store
    await redis_store.close()
