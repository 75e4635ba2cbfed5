"""Websockets through the proxy: frames, control frames and close codes relayed both ways."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from tests.support.configs import make_config
from tests.support.ports import free_port
from tests.support.raw_http import RawClient, raw_get
from tests.support.sidecars import StartSidecar
from tests.support.upstreams import Serve


class WsUpstream:
    """A websocket upstream that records what it sees; `script` drives each connection."""

    def __init__(self, *, protocols: tuple[str, ...] = (), autoping: bool = True) -> None:
        self.protocols = protocols
        self.autoping = autoping
        self.received: list[tuple[WSMsgType, Any, Any]] = []
        self.close_code: int | None = None
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.ws: web.WebSocketResponse | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.handler)
        return app

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        self.headers = CIMultiDict(request.headers)
        ws = web.WebSocketResponse(protocols=self.protocols, autoping=self.autoping)
        await ws.prepare(request)
        self.ws = ws
        self.connected.set()
        try:
            while True:
                message = await ws.receive()
                self.received.append((message.type, message.data, message.extra))
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if message.type is WSMsgType.TEXT:
                    if message.data == "close-4002":
                        await ws.close(code=4002, message=b"bye")
                    else:
                        await ws.send_str("echo:" + message.data)
                elif message.type is WSMsgType.BINARY:
                    await ws.send_bytes(message.data[::-1])
                elif message.type is WSMsgType.PING:
                    self.received.append((WSMsgType.PONG, b"sent-by-upstream", None))
                    await ws.pong(message.data)
        finally:
            self.close_code = ws.close_code
            self.closed.set()
        return ws


async def start(
    start_sidecar: StartSidecar, upstream_app: Serve, upstream: WsUpstream, **config: Any
) -> Any:
    base = await upstream_app(upstream.app())
    return await start_sidecar(make_config(base, **config))


def ws_url(sidecar: Any) -> str:
    return sidecar.url("/ws").replace("http://", "ws://")


async def test_text_and_binary_frames_relayed(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """Text and binary frames travel both ways unchanged, large ones included."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    big = bytes(range(256)) * 4096  # 1 MiB in one frame
    async with http.ws_connect(ws_url(sidecar), max_msg_size=0) as ws:
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "echo:héllo"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == big[::-1]
    assert [(t, d) for t, d, _ in upstream.received[:2]] == [
        (WSMsgType.TEXT, "héllo"),
        (WSMsgType.BINARY, b"\x00\x01\x02"),
    ]


async def test_ping_reaches_upstream_and_pong_returns(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """A client ping reaches the upstream as a ping, and the upstream's pong comes back."""
    upstream = WsUpstream(autoping=False)
    sidecar = await start(start_sidecar, upstream_app, upstream)
    async with http.ws_connect(ws_url(sidecar), autoping=False) as ws:
        await ws.ping(b"are-you-there")
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.PONG
        assert message.data == b"are-you-there"
    assert upstream.received[0][:2] == (WSMsgType.PING, b"are-you-there")


async def test_upstream_ping_reaches_client(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """An upstream ping reaches the client, and the client's pong reaches the upstream."""
    upstream = WsUpstream(autoping=False)
    sidecar = await start(start_sidecar, upstream_app, upstream)
    async with http.ws_connect(ws_url(sidecar), autoping=False) as ws:
        await asyncio.wait_for(upstream.connected.wait(), 5)
        assert upstream.ws is not None
        await upstream.ws.ping(b"from-upstream")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(message.data)
        await ws.send_str("sync")  # ordered after the pong
        assert await ws.receive_str(timeout=5) == "echo:sync"
    assert upstream.received[0][:2] == (WSMsgType.PONG, b"from-upstream")


async def test_client_close_code_reaches_upstream(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """A client closing with 4001 and a reason closes the upstream with 4001 and that reason."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    ws = await http.ws_connect(ws_url(sidecar))
    await ws.send_str("hi")
    assert await ws.receive_str(timeout=5) == "echo:hi"
    await ws.close(code=4001, message=b"client leaves")
    await asyncio.wait_for(upstream.closed.wait(), 5)
    assert upstream.close_code == 4001
    close = [r for r in upstream.received if r[0] is WSMsgType.CLOSE]
    assert close == [(WSMsgType.CLOSE, 4001, "client leaves")]
    assert ws.close_code == 4001


async def test_upstream_close_code_reaches_client(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """An upstream closing with 4002 'bye' closes the client with 4002 'bye'."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    async with http.ws_connect(ws_url(sidecar), autoclose=False) as ws:
        await ws.send_str("close-4002")
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.CLOSE
        assert (message.data, message.extra) == (4002, "bye")
        await ws.close()
        assert ws.close_code == 4002
    await asyncio.wait_for(upstream.closed.wait(), 5)
    assert upstream.close_code == 4002


@pytest.mark.parametrize(
    ("offered", "upstream_accepts", "expected"),
    [
        (("v2.chat", "v1.chat"), ("v1.chat",), "v1.chat"),
        (("v2.chat", "v1.chat"), ("v2.chat", "v1.chat"), "v2.chat"),
        (("v3.chat",), ("v1.chat",), None),
        ((), ("v1.chat",), None),
    ],
)
async def test_subprotocol_negotiated_by_upstream(
    offered: tuple[str, ...],
    upstream_accepts: tuple[str, ...],
    expected: str | None,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """The client's offered subprotocols reach the upstream, and its choice reaches the client."""
    upstream = WsUpstream(protocols=upstream_accepts)
    sidecar = await start(start_sidecar, upstream_app, upstream)
    async with http.ws_connect(ws_url(sidecar), protocols=offered) as ws:
        assert ws.protocol == expected
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "echo:x"
    if offered:
        sent = upstream.headers["Sec-WebSocket-Protocol"]
        assert [p.strip() for p in sent.split(",")] == list(offered)
    else:
        assert "Sec-WebSocket-Protocol" not in upstream.headers


async def test_handshake_headers_forwarded(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """The upgrade carries the client's own headers and X-Forwarded-*, with one handshake."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    headers = {"X-Custom": "yes", "X-Request-Id": "ws-123", "Origin": "http://app.example"}
    async with http.ws_connect(ws_url(sidecar), headers=headers) as ws:
        assert ws._response.headers["X-Request-Id"] == "ws-123"
    assert upstream.headers["X-Custom"] == "yes"
    assert upstream.headers["Origin"] == "http://app.example"
    assert upstream.headers["X-Request-Id"] == "ws-123"
    assert upstream.headers["X-Forwarded-For"] == "127.0.0.1"
    assert upstream.headers["Upgrade"].lower() == "websocket"


async def test_idle_websocket_outlives_upstream_read_timeout(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """An idle websocket is not cut by the upstream's HTTP read timeout."""
    upstream = WsUpstream()
    base = await upstream_app(upstream.app())
    sidecar = await start_sidecar(make_config(upstreams=[{"url": base, "timeout": "0.3s"}]))
    async with http.ws_connect(ws_url(sidecar)) as ws:
        await asyncio.sleep(0.8)
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=5) == "echo:still here"


@pytest.mark.parametrize("status", [403, 404, 200])
async def test_upstream_refusing_handshake_is_502(
    status: int,
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """An upstream that answers the upgrade without switching protocols gives the client 502."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, text="no websockets here, token=secret")

    app = web.Application()
    app.router.add_get("/ws", refuse)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(ws_url(sidecar))
    assert caught.value.status == 502
    async with http.get(
        sidecar.url("/ws"),
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == 502
        body = await resp.text()
    assert json.loads(body)["error"] == "upstream_unavailable"
    assert "secret" not in body


async def test_websocket_to_refused_upstream_is_502(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """A websocket to an upstream that refuses connections gets 502."""
    sidecar = await start_sidecar(make_config(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(ws_url(sidecar))
    assert caught.value.status == 502


async def test_upstream_vanishing_closes_client(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """When the upstream's connection drops without a close frame, the client is closed."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    async with http.ws_connect(ws_url(sidecar)) as ws:
        await asyncio.wait_for(upstream.connected.wait(), 5)
        assert upstream.ws is not None
        transport = upstream.ws._req.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()
        message = await ws.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.closed or message.type is WSMsgType.CLOSE
    assert ws.close_code in (1001, 1011)


async def test_minimal_handshake_gets_no_client_headers(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    """A bare upgrade request reaches the upstream without User-Agent or Accept* added."""
    upstream = WsUpstream()
    sidecar = await start(start_sidecar, upstream_app, upstream)
    client = await RawClient.connect(sidecar.url("/"))
    try:
        await client.send(
            raw_get(
                "/ws",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            )
        )
        response = await client.response(head_only=True)
        assert response.status == 101
        # RFC 6455 §1.3: the accept value for this key.
        assert response.get("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    finally:
        await client.close()
    await asyncio.wait_for(upstream.connected.wait(), 5)
    for name in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type"):
        assert name not in upstream.headers, name
