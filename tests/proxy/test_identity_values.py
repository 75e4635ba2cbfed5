"""Values the sidecar writes into the upstream request never split it.

Tokens and claims come from the IdP; a CR, LF or NUL in one must never reach the upstream as
a line break (a second header, or a second request on a pooled connection).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sidecar.session import SessionRecord
from sidecar.web.keys import SESSIONS
from tests.support.configs import make_config
from tests.support.raw_http import StartRaw
from tests.support.records import record
from tests.support.sidecars import Sidecar, StartSidecar

BREAKS = ["\r\nX-Injected: 1", "\nX-Injected: 1", "\rX-Injected: 1", "\x00X-Injected: 1"]


IDENTITY = {"email": "alice@example.com", "email_verified": True}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def byte_recorder(start_raw: StartRaw) -> tuple[str, list[bytes]]:
    """A TCP upstream that records every byte it receives and answers each read with 200."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
            writer.write(OK)

    _, url = await start_raw(serve)
    return url, received


async def forwarding(
    start_sidecar: StartSidecar, start_raw: StartRaw, session: SessionRecord
) -> tuple[Sidecar, str, list[bytes]]:
    """A sidecar before `byte_recorder`, holding `session`: the sidecar, its id, the bytes."""
    url, received = await byte_recorder(start_raw)
    sc = await start_sidecar(make_config(url, public_paths=[]))
    created = await sc.app[SESSIONS].create(session)
    return sc, created.id, received


@pytest.mark.parametrize("tail", BREAKS)
async def test_line_break_in_access_token_is_502_and_nothing_sent(
    tail: str, start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """An access token holding CR, LF or NUL gives 502; the upstream receives no byte."""
    session = record(access_token="eyJ.token" + tail, claims=IDENTITY)
    sc, session_id, received = await forwarding(start_sidecar, start_raw, session)
    async with (
        aiohttp.ClientSession(cookies={"sidecar": session_id}) as s,
        s.get(sc.url("/app"), headers={"Accept": "application/json"}) as r,
    ):
        assert r.status == 502
        body = await r.text()
    assert "X-Injected" not in body and "eyJ" not in body
    assert received == []


@pytest.mark.parametrize("tail", BREAKS)
async def test_line_break_in_a_claim_is_removed(
    tail: str, start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A claim value holding CR, LF or NUL is forwarded without them, as one header."""
    session = record(access_token="eyJ.token", claims={**IDENTITY, "groups": ["a" + tail]})
    sc, session_id, received = await forwarding(start_sidecar, start_raw, session)
    async with (
        aiohttp.ClientSession(cookies={"sidecar": session_id}) as s,
        s.get(sc.url("/app")) as r,
    ):
        assert r.status == 200
    head = b"".join(received).split(b"\r\n\r\n")[0].decode("latin-1")
    lines = head.split("\r\n")
    assert not any(line.startswith("X-Injected") for line in lines)
    assert "X-Forwarded-Groups: aX-Injected: 1" in lines
    assert "\x00" not in head and "\n" not in head.replace("\r\n", "")
