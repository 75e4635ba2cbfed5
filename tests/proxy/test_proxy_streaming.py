"""Timeouts, truncation, cancellation, and large transfers in flat memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support.configs import config_dict, upstream_config
from tests.support.ports import free_port
from tests.support.raw_http import RawClient, StartRaw, raw_exchange, raw_get, read_request
from tests.support.sidecars import StartSidecar
from tests.support.upstreams import Serve, body_digest


def assert_short_json_error(body: bytes, code: str) -> None:
    assert len(body) < 200
    data = json.loads(body)
    assert data["error"] == code
    assert "s3cr3t" not in body.decode()


# --- timeouts and failures before the response -------------------------------------------


async def test_upstream_that_never_answers_is_504(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """An upstream that accepts but never answers gets a short JSON 504 after its timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(3600)

    _, url = await start_raw(silent)
    sidecar = await start_sidecar(upstream_config(url))
    started = time.monotonic()
    response = await raw_exchange(
        sidecar.url("/"), raw_get("/slow?token=s3cr3t", "Cookie: s=s3cr3t"), wait=5
    )
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert 0.4 < elapsed < 3
    assert (response.get("Content-Type") or "").startswith("application/json")
    assert_short_json_error(response.body, "upstream_timeout")


@pytest.fixture
def unaccepting_listener() -> Iterator[str]:
    """A listening socket whose accept queue is full, so new connections hang in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # Linux queues backlog + 1; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the handshake completes or never does
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)  # let the handshakes that can complete, complete
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_upstream_that_never_accepts_is_504(
    start_sidecar: StartSidecar, unaccepting_listener: str
) -> None:
    """An upstream whose connections never complete gets a 504 after the connect timeout."""
    sidecar = await start_sidecar(upstream_config(unaccepting_listener, timeout="30s"))
    started = time.monotonic()
    response = await raw_exchange(sidecar.url("/"), raw_get("/x?token=s3cr3t"), wait=5)
    assert response.status == 504
    assert time.monotonic() - started < 3
    assert_short_json_error(response.body, "upstream_timeout")


async def test_connection_refused_is_502(start_sidecar: StartSidecar) -> None:
    """An upstream port with nothing listening gets a short JSON 502 at once."""
    sidecar = await start_sidecar(upstream_config(f"http://127.0.0.1:{free_port()}"))
    response = await raw_exchange(sidecar.url("/"), raw_get("/x?token=s3cr3t"))
    assert response.status == 502
    assert_short_json_error(response.body, "upstream_unavailable")


async def test_upstream_closing_before_answer_is_502(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """An upstream that reads the request and hangs up gets a short JSON 502."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    _, url = await start_raw(hang_up)
    sidecar = await start_sidecar(upstream_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/x?token=s3cr3t"))
    assert response.status == 502
    assert_short_json_error(response.body, "upstream_unavailable")


async def test_navigation_error_is_short_html(start_sidecar: StartSidecar) -> None:
    """A browser navigation gets the 502 as a short HTML page that echoes nothing."""
    sidecar = await start_sidecar(upstream_config(f"http://127.0.0.1:{free_port()}"))
    response = await raw_exchange(
        sidecar.url("/"), raw_get("/page?token=s3cr3t", "Accept: text/html,*/*;q=0.8")
    )
    assert response.status == 502
    assert (response.get("Content-Type") or "").startswith("text/html")
    assert b"s3cr3t" not in response.body
    assert len(response.body) < 400


# --- failures after the response started -------------------------------------------------

STALLS = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n" + b"a" * 10 + b"\r\n",
}


@pytest.mark.parametrize("framing", list(STALLS))
@pytest.mark.parametrize("then", ["stall", "hang-up"])
async def test_upstream_failing_mid_body_aborts_client(
    framing: str,
    then: str,
    start_sidecar: StartSidecar,
    start_raw: StartRaw,
    http: aiohttp.ClientSession,
) -> None:
    """When the upstream stalls or hangs up mid-body, the client sees an aborted response."""

    async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STALLS[framing])
        await writer.drain()
        if then == "stall":
            await asyncio.sleep(3600)
        writer.transport.abort()

    _, url = await start_raw(partial)
    sidecar = await start_sidecar(upstream_config(url))
    async with asyncio.timeout(5), http.get(sidecar.url("/big")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_upstream_failing_mid_body_seen_by_raw_client(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A stalled chunked body ends without its last chunk: the connection is cut, not finished."""

    async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STALLS["chunked"])
        await writer.drain()
        await asyncio.sleep(3600)

    _, url = await start_raw(partial)
    sidecar = await start_sidecar(upstream_config(url))
    client = await RawClient.connect(sidecar.url("/"))
    try:
        await client.send(raw_get("/big"))
        response = await client.response(head_only=True)
        assert response.chunked is False and response.get("Transfer-Encoding") == "chunked"
        async with asyncio.timeout(5):
            rest = await client.reader.read()  # until the sidecar closes
    finally:
        await client.close()
    assert rest.startswith(b"a\r\naaaaaaaaaa\r\n")
    assert not rest.endswith(b"0\r\n\r\n")


# --- cancellation ------------------------------------------------------------------------


class Watcher:
    """A raw upstream that notes when a request arrived and when its connection was lost."""

    def __init__(self, read_whole_request: bool = True) -> None:
        self.read_whole_request = read_whole_request
        self.arrived = asyncio.Event()
        self.lost = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.read_whole_request:
            await read_request(reader)
        else:
            await reader.readuntil(b"\r\n\r\n")
        self.arrived.set()
        try:
            while await reader.read(65536):
                pass
        finally:
            self.lost.set()


async def test_client_disconnect_while_waiting_cancels_upstream(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A client that leaves while the upstream thinks makes the upstream connection close."""
    watcher = Watcher()
    _, url = await start_raw(watcher)
    sidecar = await start_sidecar(upstream_config(url, timeout="30s"))
    client = await RawClient.connect(sidecar.url("/"))
    await client.send(raw_get("/slow"))
    await asyncio.wait_for(watcher.arrived.wait(), 5)
    client.writer.transport.abort()
    await asyncio.wait_for(watcher.lost.wait(), 1)


async def test_client_disconnect_mid_upload_cancels_upstream(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A client that leaves half-way through an upload makes the upstream connection close."""
    watcher = Watcher(read_whole_request=False)
    _, url = await start_raw(watcher)
    sidecar = await start_sidecar(upstream_config(url, timeout="30s"))
    client = await RawClient.connect(sidecar.url("/"))
    await client.send(raw_get("/up", "Content-Length: 1000000", method="POST", body=b"x" * 1000))
    await asyncio.wait_for(watcher.arrived.wait(), 5)
    client.writer.transport.abort()
    await asyncio.wait_for(watcher.lost.wait(), 1)


async def test_client_disconnect_mid_download_cancels_upstream(
    start_sidecar: StartSidecar, upstream_app: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves during an endless download cancels the upstream handler; its
    going away is routine, not an error with a traceback in the logs."""
    cancelled = asyncio.Event()
    writing = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"z" * 65536)
                writing.set()
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise

    app = web.Application()
    app.router.add_get("/endless", endless)
    sidecar = await start_sidecar(upstream_config(await upstream_app(app), timeout="30s"))
    client = await RawClient.connect(sidecar.url("/"))
    await client.send(raw_get("/endless"))
    await client.response(head_only=True)
    await asyncio.wait_for(writing.wait(), 5)
    client.writer.transport.abort()
    await asyncio.wait_for(cancelled.wait(), 1)
    await asyncio.sleep(0.1)  # the sidecar's handler has seen the broken write by now
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [(r.name, r.getMessage()) for r in errors]


# --- large transfers in flat memory ------------------------------------------------------

MiB = 1024 * 1024
TRANSFER_CHUNKS = 200  # of 1 MiB: 200 MiB each way
RSS_GROWTH_LIMIT = 80 * MiB


def chunk(index: int, pattern: bytes) -> bytes:
    """Chunk `index` of a generated stream: distinct per index, so reordering shows."""
    return index.to_bytes(8, "big") + pattern[8:]


class RssSampler:
    """Samples a process's resident set size from a thread, so a busy event loop cannot skip it."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[int] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples)


@pytest.fixture
async def transfer_upstream(upstream_app: Serve) -> tuple[str, bytes, dict[str, Any]]:
    """An upstream that hashes uploads (`/sink`) and streams a generated download (`/source`)."""
    pattern = bytes(range(256)) * (MiB // 256)
    seen: dict[str, Any] = {}

    async def sink(request: web.Request) -> web.Response:
        size, sha256 = await body_digest(request)
        seen.update(size=size, sha256=sha256, chunked=request.headers.get("Transfer-Encoding"))
        return web.json_response({"size": size, "sha256": sha256})

    async def source(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("chunks", TRANSFER_CHUNKS))
        response = web.StreamResponse()
        response.content_length = count * MiB
        await response.prepare(request)
        for index in range(count):
            await response.write(chunk(index, pattern))
        await response.write_eof()
        return response

    app = web.Application(client_max_size=0)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    return await upstream_app(app), pattern, seen


def expected_digest(count: int, pattern: bytes) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(chunk(index, pattern))
    return digest.hexdigest()


async def generated(count: int, pattern: bytes) -> AsyncIterator[bytes]:
    for index in range(count):
        yield chunk(index, pattern)


async def warm_up(client: aiohttp.ClientSession, base: str, pattern: bytes) -> None:
    """A few small transfers first, so the baseline includes pools, buffers and imports."""
    for _ in range(3):
        async with client.post(base + "/sink", data=generated(4, pattern)) as resp:
            assert resp.status == 200
        async with client.get(base + "/source?chunks=4") as resp:
            async for _ in resp.content.iter_chunked(MiB):
                pass


async def test_large_upload_in_flat_memory(
    transfer_upstream: tuple[str, bytes, dict[str, Any]],
    sidecar_process: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    """A 200 MiB streamed upload arrives intact while the sidecar's RSS grows < 80 MiB."""
    upstream, pattern, seen = transfer_upstream
    sidecar = sidecar_process(config_dict(upstream))
    await warm_up(http, sidecar.base, pattern)
    baseline = psutil.Process(sidecar.proc.pid).memory_info().rss
    with RssSampler(sidecar.proc.pid) as rss:
        async with http.post(
            sidecar.base + "/sink", data=generated(TRANSFER_CHUNKS, pattern)
        ) as resp:
            assert resp.status == 200
            result = await resp.json()
    assert result["size"] == TRANSFER_CHUNKS * MiB
    assert result["sha256"] == expected_digest(TRANSFER_CHUNKS, pattern)
    assert seen["chunked"] == "chunked"
    assert len(rss.samples) > 10  # sampled throughout the transfer, not just at its ends
    assert rss.peak - baseline < RSS_GROWTH_LIMIT, (baseline, rss.peak)


async def test_large_download_in_flat_memory(
    transfer_upstream: tuple[str, bytes, dict[str, Any]],
    sidecar_process: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    """A 200 MiB streamed download arrives intact while the sidecar's RSS grows < 80 MiB."""
    upstream, pattern, _ = transfer_upstream
    sidecar = sidecar_process(config_dict(upstream))
    await warm_up(http, sidecar.base, pattern)
    baseline = psutil.Process(sidecar.proc.pid).memory_info().rss
    digest = hashlib.sha256()
    size = 0
    with RssSampler(sidecar.proc.pid) as rss:
        async with http.get(sidecar.base + "/source") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(TRANSFER_CHUNKS * MiB)
            async for part in resp.content.iter_any():
                digest.update(part)
                size += len(part)
    assert size == TRANSFER_CHUNKS * MiB
    assert digest.hexdigest() == expected_digest(TRANSFER_CHUNKS, pattern)
    assert len(rss.samples) > 10  # sampled throughout the transfer, not just at its ends
    assert rss.peak - baseline < RSS_GROWTH_LIMIT, (baseline, rss.peak)


async def test_client_gone_before_the_answer_is_not_an_error(
    sidecar_process: Callable[..., Any], upstream_app: Serve
) -> None:
    """Clients that send requests and hang up at once (as a load generator does when it
    stops) leave no error or traceback in a real sidecar process's log, whenever the answer
    meets the closed connection."""

    async def hello(request: web.Request) -> web.Response:
        await asyncio.sleep(0.001 * (int(request.query.get("n", "0")) % 5))
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    config = config_dict(await upstream_app(app))
    config["logging"] = {"level": "info", "access_log": False}
    sidecar = sidecar_process(config)
    base = f"http://{config['server']['listen']}"

    async def hang_up(n: int) -> None:
        client = await RawClient.connect(base + "/")
        for i in range(n % 4):  # some connections are kept alive for a few requests first
            await client.send(raw_get(f"/hello?n={i}"))
            await client.response()
        await client.send(raw_get(f"/hello?n={n}") * (1 + n % 3))  # some pipelined
        await asyncio.sleep(0.0005 * (n % 7))
        if n % 2:
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.writer.transport.abort()  # RST, as a client that is killed
        else:
            await client.close()

    for _ in range(5):
        await asyncio.gather(*(hang_up(n) for n in range(200)))
    await asyncio.sleep(0.3)  # every answer has met its closed connection by now
    log = sidecar.logs()
    assert '"level": "error"' not in log and "Traceback" not in log, log[-2000:]
