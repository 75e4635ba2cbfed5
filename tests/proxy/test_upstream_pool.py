"""The sidecar's own HTTP/1.1 upstream client (`sidecar/forwarding/pool.py`) against raw servers.

What a pooled keep-alive client must get right that the general proxy tests do not reach:
an upstream closing an idle connection just as it is reused, informational answers, bodies
delimited by the connection's end, `Connection: close`, bytes nobody asked for, answers that
are not HTTP, request heads that a header value would split, and the pool's limit.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.forwarding.pool import ConnectionPool, UnsafeHeader, encode_head
from tests.support.configs import upstream_config
from tests.support.ports import free_port
from tests.support.raw_http import RawServer, StartRaw, raw_exchange, raw_get, read_request
from tests.support.sidecars import StartSidecar
from tests.support.tls import TlsFiles, make_tls

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def gets_through_sidecar(
    start_sidecar: StartSidecar,
    start_raw: StartRaw,
    upstream: Handler,
    times: int,
    expect: tuple[int, bytes] = (200, b"ok"),
) -> RawServer:
    """`times` GETs through a sidecar in front of `upstream`, each answered `expect`."""
    server, url = await start_raw(upstream)
    sidecar = await start_sidecar(upstream_config(url))
    for i in range(times):
        response = await raw_exchange(sidecar.url("/"), raw_get(f"/{i}"))
        assert (response.status, response.body) == expect
    return server


async def test_idle_connection_closed_by_upstream_is_retried_once_for_get(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """The upstream drops each connection after one answer, without saying so.

    The second GET goes out on the pooled connection, meets its end before a byte of answer
    and is sent again on a new one: the client never sees the keep-alive race.
    """

    async def one_then_gone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        # Close only once the next request is on its way: the race, made certain.
        await reader.read(1)
        writer.transport.abort()

    server = await gets_through_sidecar(start_sidecar, start_raw, one_then_gone, 3)
    # /0 on connection 1; /1 met its end, then connection 2; /2 the same, then connection 3.
    assert server.connections == 3


async def test_request_with_body_is_not_sent_twice(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A POST that meets a dropped connection is answered 502, never sent again."""
    posts: list[bytes] = []

    async def one_then_gone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_request(reader)
        assert first is not None
        posts.append(first.body)
        writer.write(OK)
        await writer.drain()
        await reader.read(1)
        writer.transport.abort()

    server, url = await start_raw(one_then_gone)
    sidecar = await start_sidecar(upstream_config(url))
    first = await raw_exchange(
        sidecar.url("/"), raw_get("/a", "Content-Length: 3", method="POST", body=b"one")
    )
    assert first.status == 200
    second = await raw_exchange(
        sidecar.url("/"), raw_get("/b", "Content-Length: 3", method="POST", body=b"two")
    )
    assert second.status == 502
    await asyncio.sleep(0.1)
    assert posts == [b"one"]
    assert server.connections == 1


async def test_informational_answers_are_skipped(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """100 Continue and 103 Early Hints before the answer: the client gets the answer."""

    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone")
            await writer.drain()

    server, url = await start_raw(hints)
    sidecar = await start_sidecar(upstream_config(url))
    for _ in range(2):
        response = await raw_exchange(sidecar.url("/"), raw_get("/x"))
        assert (response.status, response.body) == (201, b"done")
        assert response.get("X-Final") == "yes"
        assert response.get("Link") is None
    assert server.connections == 1  # the connection stays usable after the hints


async def test_body_delimited_by_the_connection_end(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """No Content-Length, not chunked: the body is what comes until the upstream closes."""

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for part in (b"first ", b"second ", b"last"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    expect = (200, b"first second last")
    server = await gets_through_sidecar(start_sidecar, start_raw, until_close, 2, expect)
    assert server.connections == 2


async def test_connection_close_is_honoured(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """An answer with `Connection: close` is the connection's last: the next opens another."""

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keeps the socket open (a lenient server) but asks the client not to reuse it.
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()

    server = await gets_through_sidecar(start_sidecar, start_raw, closing, 3)
    assert server.connections == 3


async def test_unsolicited_bytes_retire_an_idle_connection(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """Bytes after a complete answer (a broken upstream) are never read as the next answer."""

    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # the connection should be gone by now
        writer.write(OK)
        await writer.drain()

    server, url = await start_raw(extra)
    sidecar = await start_sidecar(upstream_config(url))
    assert (await raw_exchange(sidecar.url("/"), raw_get("/a"))).status == 200
    await asyncio.sleep(0.3)
    second = await raw_exchange(sidecar.url("/"), raw_get("/b"))
    assert (second.status, second.body) == (200, b"ok")
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ],
    ids=["not-http", "bad-length", "two-lengths"],
)
async def test_answer_that_is_not_http_is_502(
    answer: bytes, start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """An answer llhttp cannot parse is a short 502, the connection is dropped."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(3600)

    _, url = await start_raw(garbage)
    sidecar = await start_sidecar(upstream_config(url, timeout="5s"))
    response = await raw_exchange(sidecar.url("/"), raw_get("/x"), wait=3)
    assert response.status == 502


def test_request_head_cannot_be_split_by_a_header_value() -> None:
    """A value with CR or LF (a token or claim from a broken IdP) never reaches the wire."""
    assert encode_head("GET", "/x", [("A", "1"), ("B", "2")]) == (
        b"GET /x HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"
    )
    for bad in ("v\r\nX-Admin: yes", "v\nX-Admin: yes", "v\rX"):
        with pytest.raises(UnsafeHeader):
            encode_head("GET", "/x", [("Authorization", f"Bearer {bad}")])


async def test_pool_limit_queues_requests(start_raw: StartRaw) -> None:
    """With a limit of 2, a third request waits until a response is released."""
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await release.wait()
            writer.write(OK)
            await writer.drain()

    server, url = await start_raw(slow)
    port = int(url.rsplit(":", 1)[1])
    pool = ConnectionPool("127.0.0.1", port, tls=False, limit=2, connect_timeout=1, read_timeout=5)
    head = encode_head("GET", "/", [("Host", "x")])

    async def call() -> int:
        response = await pool.request("GET", head, None, chunked=False)
        try:
            assert response.complete and response.buffered() == b"ok"
            return response.status
        finally:
            response.release()

    try:
        calls = [asyncio.ensure_future(call()) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert server.connections == 2
        assert not any(c.done() for c in calls)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [200, 200, 200]
        assert server.connections == 2  # the third reused a released connection
    finally:
        await pool.close()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[TlsFiles, int]]:
    """An aiohttp upstream on HTTPS with a certificate from a CA of the test's own."""
    files = make_tls(tmp_path / "tls", "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello over {request.scheme}")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield files, port
    await runner.cleanup()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_https_upstream_is_verified(
    host: str,
    tls_upstream: tuple[TlsFiles, int],
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An https upstream is reached only when its certificate chains to a trusted CA.

    Trusted here through SSL_CERT_FILE (OpenSSL's default verify paths); without it, the
    system store does not know the test's CA and the answer is 502, never a 200 over an
    unverified connection.
    """
    files, port = tls_upstream
    url = f"https://{host}:{port}"
    untrusting = await start_sidecar(upstream_config(url))
    async with http.get(untrusting.url("/hello")) as response:
        assert response.status == 502

    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca_cert))
    trusting = await start_sidecar(upstream_config(url))
    for _ in range(2):  # the second on the pooled TLS connection
        async with http.get(trusting.url("/hello")) as response:
            assert response.status == 200
            assert await response.text() == "hello over https"
