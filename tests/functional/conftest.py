"""Fixtures for the functional tests; raw socket helpers live in tests/support/raw_http.py.

The refresh and Redis topology modules share `idp` (a dev IdP of the module only, issuing
the module's `ACCESS_TTL`-second access tokens), `upstream` (the verifying upstream of
`test_refresh_storm`) and `redis_fleet` (own `redis-server` processes, stopped at the test's
end).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.functional.redis_topologies import Fleet, fleet
from tests.functional.test_refresh_storm import VerifyingUpstream
from tests.idp import ThreadedIdP
from tests.support.login import ready
from tests.support.probe import IssueSite, issue_config
from tests.support.raw_http import RawServer
from tests.support.recording_upstream import RecordingUpstream

# --- the dev IdP, the verifying upstream and own Redis processes -------------------------


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
    server = VerifyingUpstream(idp.issuer)
    yield server
    server.stop()


@pytest.fixture
def redis_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Redis processes of one test (never the shared server), stopped at its end."""
    with fleet(tmp_path / "redis") as started:
        yield started


# --- raw servers ---------------------------------------------------------------------


@pytest.fixture
async def start_raw() -> AsyncIterator[Callable[..., Awaitable[tuple[RawServer, str]]]]:
    """`server, url = await raw_server(handler)` serves `handler(reader, writer)` per connection."""
    servers: list[RawServer] = []

    async def start(
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> tuple[RawServer, str]:
        server = RawServer(handler)
        url = await server.start()
        servers.append(server)
        return server, url

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def issue_site(start_sidecar: Callable[..., Awaitable[Any]]) -> AsyncIterator[IssueSite]:
    """Issue 12's set-up, ready: the sidecar before a strict recording upstream."""
    upstream = RecordingUpstream()
    url = await upstream.start()
    sidecar = await start_sidecar(issue_config(url))
    await ready(sidecar)
    yield IssueSite(sidecar, upstream)
    await upstream.close()
