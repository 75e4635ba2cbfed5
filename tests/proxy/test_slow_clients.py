"""Slow and oversized clients: the head deadline, the body idle timeout, the keep-alive idle
timeout, header limits, and the upstream pool bound (docs/proxy.md, "Client timeouts and
limits"). Timeouts are configured short (0.5-1 s) so that every wait here is short too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.configs import config_dict
from tests.support.raw_http import (
    RawClient,
    StartRaw,
    read_head,
    read_request,
    recording_raw_upstream,
)
from tests.support.sidecars import SidecarProcess, StartSidecar
from tests.support.upstreams import Serve

SECRET = "s3cr3t-cookie-value"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def limits(upstream_url: str, upstream: dict[str, Any] | None = None, **server: Any) -> Any:
    """A config dict with `server` keys and keys of the one upstream set."""
    data = config_dict(upstream_url)
    data["server"].update(server)
    data["upstreams"][0].update(upstream or {})
    return data


def ok_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def read_until_closed(client: RawClient, wait: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(wait):
        return await client.reader.read()


# --- the head deadline ----------------------------------------------------------------------


async def test_a_trickled_head_is_cut_at_the_deadline(
    upstream_app: Serve, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    """A head sent a byte every 0.1 s is cut 1 s after it began: bytes do not move the deadline.

    Production's process: the listener `server.serve` starts is the one tested.
    """
    base = await upstream_app(ok_app())
    proc = sidecar_process(limits(base, header_timeout="1s", keepalive_timeout="30s"))
    client = await RawClient.connect(proc.base)
    started = time.monotonic()
    closed = asyncio.ensure_future(read_until_closed(client))
    sent = 0
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while not closed.done() and time.monotonic() - started < 5:
            await asyncio.sleep(0.1)
            try:
                await client.send(b"a")
            except ConnectionError:
                break
            sent += 1
        answer = await closed
    finally:
        closed.cancel()
        await client.close()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.8, elapsed
    assert sent >= 7  # the client kept sending right up to the deadline
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer


async def test_a_silent_connection_is_closed_at_the_deadline(start_sidecar: StartSidecar) -> None:
    """A client that connects and sends nothing is let go after header_timeout, silently."""
    sidecar = await start_sidecar(
        _config(limits("http://127.0.0.1:9", header_timeout="500ms", keepalive_timeout="30s"))
    )
    client = await RawClient.connect(sidecar.url("/"))
    started = time.monotonic()
    try:
        assert await read_until_closed(client) == b""
    finally:
        await client.close()
    assert 0.4 < time.monotonic() - started < 1.3


@pytest.mark.parametrize(
    "segments",
    [
        pytest.param(
            [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n"],
            id="after-a-head",
        ),
        pytest.param(
            [b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n"],
            id="after-a-body",
        ),
        pytest.param(
            [
                b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n",
            ],
            id="after-a-chunked-body",
        ),
        pytest.param(
            [b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n"],
            id="during-a-response",
        ),
    ],
)
async def test_a_pipelined_partial_head_counts_from_the_response(
    segments: list[bytes], upstream_app: Serve, start_sidecar: StartSidecar
) -> None:
    """Half a head sent behind a whole request gets header_timeout from that request's answer."""
    base = await upstream_app(ok_app())
    sidecar = await start_sidecar(
        _config(limits(base, header_timeout="500ms", keepalive_timeout="30s"))
    )
    client = await RawClient.connect(sidecar.url("/"))
    try:
        for segment in segments:
            await client.send(segment)
            await asyncio.sleep(0.1)
        first = await client.response()
        answered = time.monotonic()
        assert first.status == 200 and first.body == b"ok"
        rest = await read_until_closed(client)
    finally:
        await client.close()
    assert 0.3 < time.monotonic() - answered < 1.3
    assert rest.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connections_are_not_cut_by_the_head_deadline(
    upstream_app: Serve, start_sidecar: StartSidecar
) -> None:
    """Between whole requests of every framing, idling past header_timeout is keep-alive."""
    base = await upstream_app(ok_app())
    sidecar = await start_sidecar(
        _config(limits(base, header_timeout="500ms", keepalive_timeout="30s"))
    )
    requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    client = await RawClient.connect(sidecar.url("/"))
    try:
        for request in requests:
            await client.send(request)
            assert (await client.response()).status == 200
            await asyncio.sleep(0.7)
    finally:
        await client.close()


# --- the keep-alive idle timeout --------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed(
    upstream_app: Serve, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    """After a response, a connection with nothing more to say is closed after keepalive_timeout."""
    base = await upstream_app(ok_app())
    proc = sidecar_process(limits(base, header_timeout="10s", keepalive_timeout="1s"))
    client = await RawClient.connect(proc.base)
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await client.response()
        answered = time.monotonic()
        assert response.status == 200
        assert (response.get("Connection") or "").lower() != "close"
        assert await read_until_closed(client) == b""
    finally:
        await client.close()
    assert 0.8 < time.monotonic() - answered < 2.5


# --- the body idle timeout --------------------------------------------------------------------


async def test_an_unfinished_body_is_answered_408_and_its_upstream_connection_dropped(
    start_raw: StartRaw, start_sidecar: StartSidecar
) -> None:
    """Content-Length: 1000 and 100 bytes sent: 408 after body_timeout, both connections
    closed at once, and the next request goes upstream on a new connection."""
    upstream_saw_close = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_request(reader)) is not None:
                server.requests.append(request)
                writer.write(OK)
                await writer.drain()
        finally:
            upstream_saw_close.set()

    server, url = await start_raw(upstream)
    sidecar = await start_sidecar(_config(limits(url, body_timeout="500ms")))
    client = await RawClient.connect(sidecar.url("/"))
    started = time.monotonic()
    try:
        await client.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
        )
        response = await client.response(wait=3)
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert json.loads(response.body)["error"] == "request_timeout"
        # Closed right after the answer: no lingering for the 900 bytes that never come.
        assert await read_until_closed(client, wait=1) == b""
    finally:
        await client.close()
    assert 0.4 < elapsed < 1.5, elapsed
    async with asyncio.timeout(2):
        await upstream_saw_close.wait()
    assert server.requests == []  # the half-sent request never completed upstream

    async with aiohttp.ClientSession() as http, http.get(sidecar.url("/next")) as resp:
        assert resp.status == 200
    assert server.connections == 2  # a new connection: the half-sent one was not pooled
    assert [r.target for r in server.requests] == ["/next"]


async def test_a_slow_but_steady_body_is_forwarded(
    start_raw: StartRaw, start_sidecar: StartSidecar
) -> None:
    """body_timeout bounds each wait, not the whole body: 3 s of 0.2 s gaps gets through."""

    server, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(_config(limits(url, body_timeout="500ms")))
    client = await RawClient.connect(sidecar.url("/"))
    try:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n")
        for _ in range(15):
            await asyncio.sleep(0.2)
            await client.send(b"y")
        response = await client.response()
    finally:
        await client.close()
    assert response.status == 200
    assert server.requests[0].body == b"y" * 15


# --- the upstream pool bound ------------------------------------------------------------------


async def test_a_full_pool_answers_503_with_retry_after(
    start_raw: StartRaw, start_sidecar: StartSidecar
) -> None:
    """max_connections: 1, held by a slow request: the next one waits pool_timeout, then 503."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            arrived.set()
            await release.wait()
            writer.write(OK)
            await writer.drain()

    server, url = await start_raw(upstream)
    pool = {"max_connections": 1, "pool_timeout": "500ms", "timeout": "10s"}
    sidecar = await start_sidecar(_config(limits(url, pool)))
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> tuple[int, str, bytes]:
            async with http.get(sidecar.url(path)) as resp:
                return resp.status, resp.headers.get("Retry-After", ""), await resp.read()

        holder = asyncio.ensure_future(get("/slow"))
        async with asyncio.timeout(3):
            await arrived.wait()
        started = time.monotonic()
        status, retry_after, body = await get("/other")
        waited = time.monotonic() - started
        assert status == 503
        assert retry_after == "1"
        assert json.loads(body)["error"] == "upstream_busy"
        assert 0.4 < waited < 1.5, waited
        release.set()
        assert (await holder)[0] == 200
        assert (await get("/after"))[0] == 200  # the slot is free again
        async with http.get(sidecar.management_url("/metrics")) as resp:
            metrics = await resp.text()
    assert server.connections == 1
    assert _sample(metrics, "sidecar_upstream_errors_total", upstream="/", kind="pool_exhausted")


# --- header limits and malformed heads ----------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            f"GET / HTTP/1.1\r\nHost: x\r\nCookie: sidecar={SECRET}{'a' * 1100}\r\n\r\n",
            id="header-line",
        ),
        pytest.param(f"GET /{SECRET}{'a' * 1100} HTTP/1.1\r\nHost: x\r\n\r\n", id="request-line"),
        pytest.param(
            "GET / HTTP/1.1\r\nHost: x\r\n"
            + "".join(f"X-H{i}: {SECRET}\r\n" for i in range(8))
            + "\r\n",
            id="too-many-headers",
        ),
    ],
)
async def test_oversized_heads_are_431(
    head: str, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """A request line or header line over max_header_size, or over max_headers header lines:
    431 with a fixed body, and one log line that holds no byte of the head."""
    caplog.set_level(logging.DEBUG)
    sidecar = await start_sidecar(
        _config(limits("http://127.0.0.1:9", max_header_size=1024, max_headers=8))
    )
    answer = await _exchange(sidecar.url("/"), head.encode())
    assert answer.startswith((b"HTTP/1.0 431 ", b"HTTP/1.1 431 "))
    assert SECRET.encode() not in answer
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"] == "header_too_large"
    _assert_one_clean_log_line(caplog, 431)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(f"GET / HTTP/1.1\r\nHost: x\r\nno colon {SECRET}\r\n\r\n", id="no-colon"),
        pytest.param(f"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {SECRET}\r\n\r\n", id="cl"),
        pytest.param(f"GET / HTTP/9.{SECRET}\r\nHost: x\r\n\r\n", id="version"),
        pytest.param(f"G(T /{SECRET} HTTP/1.1\r\nHost: x\r\n\r\n", id="method"),
    ],
)
async def test_malformed_heads_are_400_without_echo(
    head: str, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other unparsable head: 400 with a fixed body; nothing of it echoed or logged."""
    caplog.set_level(logging.DEBUG)
    sidecar = await start_sidecar(_config(limits("http://127.0.0.1:9")))
    answer = await _exchange(sidecar.url("/"), head.encode())
    assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
    assert SECRET.encode() not in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request"
    _assert_one_clean_log_line(caplog, 400)


async def test_heads_within_the_limits_pass(
    upstream_app: Serve, start_sidecar: StartSidecar
) -> None:
    """Exactly max_headers header lines, one of them max_header_size bytes long: forwarded."""
    base = await upstream_app(ok_app())
    sidecar = await start_sidecar(_config(limits(base, max_header_size=1024, max_headers=8)))
    long_line = "X-Long: " + "a" * (1024 - len("X-Long: "))
    head = "GET / HTTP/1.1\r\nHost: x\r\n" + long_line + "\r\n"
    head += "".join(f"X-H{i}: v\r\n" for i in range(6)) + "\r\n"
    answer = await _exchange(sidecar.url("/"), head.encode(), close=False)
    assert answer.startswith(b"HTTP/1.1 200 ")


# --- helpers ----------------------------------------------------------------------------------


def _config(data: dict[str, Any]) -> Any:
    from sidecar.config import Config

    return Config.model_validate(data)


async def _exchange(url: str, head: bytes, *, close: bool = True) -> bytes:
    """Send `head`; everything answered until the sidecar closes (or one response)."""
    client = await RawClient.connect(url)
    try:
        await client.send(head)
        if close:
            return await read_until_closed(client)
        async with asyncio.timeout(5):
            response = await read_head(client.reader)
        assert response is not None
        return response.start_line.encode() + b"\r\n"
    finally:
        await client.close()


def _assert_one_clean_log_line(caplog: pytest.LogCaptureFixture, status: int) -> None:
    refused = [r for r in caplog.records if r.getMessage() == "malformed request refused"]
    assert len(refused) == 1
    assert refused[0].__dict__["status"] == status
    assert refused[0].__dict__["peer"] == "127.0.0.1"
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert SECRET not in repr(vars(record))


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None
