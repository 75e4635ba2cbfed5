"""Values the sidecar writes into the upstream request never split it.

Tokens and claims come from the IdP; a CR, LF or NUL in one must never reach the upstream as
a line break (a second header, or a second request on a pooled connection).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from sidecar.appkeys import SESSIONS
from sidecar.session import SessionRecord
from tests.conftest import make_config

BREAKS = ["\r\nX-Injected: 1", "\nX-Injected: 1", "\rX-Injected: 1", "\x00X-Injected: 1"]


def record(access_token: str, **claims: Any) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        issuer="https://idp.test",
        subject="alice",
        idp_session_id=None,
        claims={"email": "alice@example.com", "email_verified": True, **claims},
        access_token=access_token,
        access_expires_at=now + 300,
        refresh_token=None,
        refresh_expires_at=None,
        id_token=None,
        created_at=now,
        refreshed_at=now,
        expires_at=now + 300,
    )


async def recording_upstream() -> tuple[asyncio.Server, list[bytes]]:
    """A TCP upstream that records every byte it receives and answers each head with 200."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), received


@pytest.mark.parametrize("tail", BREAKS)
async def test_line_break_in_access_token_is_502_and_nothing_sent(
    tail: str, start_sidecar: Any
) -> None:
    """An access token holding CR, LF or NUL gives 502; the upstream receives no byte."""
    server, received = await recording_upstream()
    port = server.sockets[0].getsockname()[1]
    try:
        sc = await start_sidecar(make_config(f"http://127.0.0.1:{port}", public_paths=[]))
        session = await sc.app[SESSIONS].create(record("eyJ.token" + tail))
        async with (
            aiohttp.ClientSession(cookies={"sidecar": session.id}) as s,
            s.get(sc.url("/app"), headers={"Accept": "application/json"}) as r,
        ):
            assert r.status == 502
            body = await r.text()
        assert "X-Injected" not in body and "eyJ" not in body
        assert received == []
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("tail", BREAKS)
async def test_line_break_in_a_claim_is_removed(tail: str, start_sidecar: Any) -> None:
    """A claim value holding CR, LF or NUL is forwarded without them, as one header."""
    server, received = await recording_upstream()
    port = server.sockets[0].getsockname()[1]
    try:
        sc = await start_sidecar(make_config(f"http://127.0.0.1:{port}", public_paths=[]))
        session = await sc.app[SESSIONS].create(record("eyJ.token", groups=["a" + tail]))
        async with (
            aiohttp.ClientSession(cookies={"sidecar": session.id}) as s,
            s.get(sc.url("/app")) as r,
        ):
            assert r.status == 200
        head = b"".join(received).split(b"\r\n\r\n")[0].decode("latin-1")
        lines = head.split("\r\n")
        assert not any(line.startswith("X-Injected") for line in lines)
        assert "X-Forwarded-Groups: aX-Injected: 1" in lines
        assert "\x00" not in head and "\n" not in head.replace("\r\n", "")
    finally:
        server.close()
        await server.wait_closed()
