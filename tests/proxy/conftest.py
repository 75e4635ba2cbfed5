"""Fixtures of the proxy tests: raw socket upstreams, and issue 12's sidecar before a strict one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.probe import IssueSite, issue_config
from tests.support.raw_http import RawServer, StartRaw
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import StartSidecar, ready


@pytest.fixture
async def start_raw() -> AsyncIterator[StartRaw]:
    """`server, url = await start_raw(handler)` serves `handler(reader, writer)` per connection."""
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
async def issue_site(start_sidecar: StartSidecar) -> AsyncIterator[IssueSite]:
    """Issue 12's set-up, ready: the sidecar before a strict recording upstream."""
    upstream = RecordingUpstream()
    url = await upstream.start()
    sidecar = await start_sidecar(issue_config(url))
    await ready(sidecar)
    yield IssueSite(sidecar, upstream)
    await upstream.close()
