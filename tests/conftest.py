"""Fixtures of every test folder: the sidecar in-process or as a process, upstreams, IdPs, Redis.

The helpers behind them live in tests/support; folder-specific fixtures are in the folder's
own conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.config import Config
from sidecar.redis.store import RedisSessionStore
from sidecar.refresh import RefreshTiming
from sidecar.session import MemorySessionStore
from sidecar.session.store import SessionStore
from tests.support.environment import CALLER_ENVIRONMENT
from tests.support.idp import ThreadedIdP
from tests.support.ports import free_port
from tests.support.redis_fleet import Fleet, fleet
from tests.support.sidecars import Sidecar, SidecarProcess, StartSidecar
from tests.support.stores import REDIS_URL, new_prefix
from tests.support.upstreams import Serve, VerifyingUpstream


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the caller's sidecar variables (a set `SESSION_KEY` would fill in the
    example configuration's reference), nor their proxies; sidecar processes inherit this."""
    for name in CALLER_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# --- the sidecar -----------------------------------------------------------------------------


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """`await start_sidecar(config[, refresh_timing])` runs the sidecar in-process; closed after
    the test."""
    started: list[Sidecar] = []

    async def start(config: Config, refresh_timing: RefreshTiming | None = None) -> Sidecar:
        sidecar = Sidecar(config, refresh_timing)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in reversed(started):
        await sidecar.close()


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


# --- clients and upstreams -------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that changes nothing: no decompression, no cookie jar."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
async def upstream_app() -> AsyncIterator[Serve]:
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


# --- an IdP and a verifying upstream of the module (refresh and Redis topology tests) --------


@pytest.fixture(scope="module")
def idp(request: pytest.FixtureRequest) -> Iterator[ThreadedIdP]:
    """A dev IdP of the requesting module only, so that its knobs never leak into another's.

    Its access tokens live for the module's `ACCESS_TTL` seconds.
    """
    server = ThreadedIdP(free_port(), access_token_ttl=float(request.module.ACCESS_TTL))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream(idp: ThreadedIdP) -> Iterator[VerifyingUpstream]:
    """The upstream that checks every Bearer token at the IdP: a 200 proves it was accepted."""
    server = VerifyingUpstream(idp.issuer + "/userinfo", refuse_with=502, record=False)
    server.start()
    yield server
    server.stop()


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix unique to the test on the real Redis; its keys are removed afterwards.

    Redis is a hard requirement: a missing server fails the test instead of skipping it.
    """
    import redis.asyncio as redis

    prefix = new_prefix()
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


@pytest.fixture
def redis_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Redis processes of one test (never the shared server), stopped at its end."""
    with fleet(tmp_path / "redis") as started:
        yield started
