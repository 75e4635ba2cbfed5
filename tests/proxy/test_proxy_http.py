"""The reverse proxy over plain HTTP: methods, paths, bodies, headers, routing, pooling."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.config import Config
from tests.support.configs import config_dict, make_config
from tests.support.raw_http import (
    RawClient,
    StartRaw,
    raw_exchange,
    raw_get,
    recording_raw_upstream,
)
from tests.support.sidecars import StartSidecar
from tests.support.upstreams import Serve, echo_app, headers_of


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_methods_are_forwarded(
    method: str, start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """Every method, a custom one included, reaches the upstream as sent, with its body."""
    sidecar = await start_sidecar(make_config(await upstream_app(echo_app())))
    body = f"body of {method}".encode()
    async with http.request(method, sidecar.url("/m"), data=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["method"] == method
    assert data["size"] == len(body)
    assert data["sha256"] == hashlib.sha256(body).hexdigest()


async def test_head_keeps_content_length_and_has_no_body(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A HEAD answer keeps the upstream's Content-Length and carries no body."""
    upstream, url = await recording_raw_upstream(
        start_raw, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
    )
    sidecar = await start_sidecar(make_config(url))
    # Two HEADs on one connection: stray body bytes would be read as the second answer.
    client = await RawClient.connect(sidecar.url("/"))
    try:
        for _ in range(2):
            await client.send(raw_get("/h", method="HEAD"))
            response = await client.response(head_only=True)
            assert response.status == 200
            assert response.get("Content-Length") == "1234"
            assert response.get("Transfer-Encoding") is None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.reader.read(1)  # nothing follows the headers
    finally:
        await client.close()
    assert [r.method for r in upstream.requests] == ["HEAD", "HEAD"]


async def test_head_through_http_client(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """A HEAD from a regular client gets the GET's Content-Length and an empty body."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 777)

    app = web.Application()
    app.router.add_get("/page", page)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    async with http.head(sidecar.url("/page")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "777"
        assert await resp.read() == b""


# --- raw path and query ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/a/b?x=%20&y=%2F", "/a/b?x=%20&y=%2F"),
        ("/%7Euser/", "/~user/"),
        ("//x", "/x"),
        ("//x//y/?q=a%2Bb&q=c+d&empty=&flag", "/x/y/?q=a%2Bb&q=c+d&empty=&flag"),
        ("/%E2%82%AC/./../dots?%3D=%26", "/dots?%3D=%26"),
        ("/%e2%82%ac/x?%2e", "/%E2%82%AC/x?%2e"),
    ],
)
async def test_canonical_path_and_raw_query(
    target: str, forwarded: str, start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """The upstream's request line carries the canonical path and the client's raw query."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get(target, "Connection: close"))
    assert response.status == 200
    assert upstream.requests[0].start_line == f"GET {forwarded} HTTP/1.1"


async def test_encoded_slash_forwarded_only_where_allowed(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """%2F reaches an upstream that opted in, byte for byte; any other answers 400."""
    base = await upstream_app(echo_app())
    upstreams = [
        {"path": "/", "url": base},
        {"path": "/files", "url": base, "allow_encoded_slashes": True},
    ]
    sidecar = await start_sidecar(make_config(base, upstreams=upstreams))
    prefix = sidecar.url("/").rstrip("/")
    async with http.get(URL(prefix + "/files/a%2fb?x=%2F", encoded=True)) as resp:
        assert (await resp.json())["raw_path"] == "/files/a%2Fb?x=%2F"
    async with http.get(URL(prefix + "/a%2Fb", encoded=True)) as resp:
        assert resp.status == 400


# --- bodies ------------------------------------------------------------------------------


async def test_upload_with_content_length_keeps_it(
    start_sidecar: StartSidecar, start_raw: StartRaw, http: aiohttp.ClientSession
) -> None:
    """An upload with Content-Length arrives with the same Content-Length, not chunked."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    body = bytes(range(256)) * 1000
    async with http.put(sidecar.url("/up"), data=body) as resp:
        assert resp.status == 200
    seen = upstream.requests[0]
    assert seen.get("Content-Length") == str(len(body))
    assert not seen.chunked
    assert seen.body == body


async def test_chunked_upload_arrives_chunked_and_intact(
    start_sidecar: StartSidecar, start_raw: StartRaw, http: aiohttp.ClientSession
) -> None:
    """A chunked upload of unknown length arrives chunked, byte for byte."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    parts = [b"first;", b"", b"second\r\n0\r\n\r\n", b"x" * 100_000]
    async with http.post(sidecar.url("/up"), data=chunks(*parts)) as resp:
        assert resp.status == 200
    seen = upstream.requests[0]
    assert seen.chunked
    assert seen.get("Content-Length") is None
    assert seen.body == b"".join(parts)


async def test_upload_is_streamed_not_buffered(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """The upstream reads the first part of an upload while the client still holds the rest."""
    first_seen = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        first = await request.content.readexactly(5)
        first_seen.set()
        rest = await request.content.read()
        return web.Response(body=first + b"|" + rest)

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.wait_for(first_seen.wait(), 5)
        yield b"second"

    app = web.Application()
    app.router.add_post("/up", sink)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    async with http.post(sidecar.url("/up"), data=slow_body()) as resp:
        assert await resp.read() == b"first|second"


async def test_download_is_streamed_not_buffered(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """The client reads the first part of a response while the upstream still holds the rest."""
    client_got_first = asyncio.Event()

    async def source(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(client_got_first.wait(), 5)
        await response.write(b"second")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/down", source)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    async with http.get(sidecar.url("/down")) as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert await resp.content.readexactly(5) == b"first"
        client_got_first.set()
        assert await resp.content.read() == b"second"


async def test_download_with_content_length_keeps_it(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A response with Content-Length reaches the client with that Content-Length, unchunked."""
    body = b"0123456789" * 10_000
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    _, url = await recording_raw_upstream(start_raw, head + body)
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/d"))
    assert response.get("Content-Length") == str(len(body))
    assert response.get("Transfer-Encoding") is None
    assert response.body == body


async def test_chunked_download_arrives_intact(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A chunked response reaches the client chunked and byte for byte."""
    parts = [b"a" * 10, b"0\r\n\r\n", b"b" * 70_000]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    _, url = await recording_raw_upstream(
        start_raw, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire
    )
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/d"))
    assert response.chunked
    assert response.get("Content-Length") is None
    assert response.body == b"".join(parts)


async def test_gzip_response_passes_untouched(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """A gzip response reaches the client with identical bytes and Content-Encoding."""
    compressed = gzip.compress(b"compressible " * 5000)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    app = web.Application()
    app.router.add_get("/z", page)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    async with http.get(sidecar.url("/z"), headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(compressed))
        assert await resp.read() == compressed


async def test_gzip_upload_passes_untouched(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """A gzip upload reaches the upstream with identical bytes, Content-Encoding and length."""
    compressed = gzip.compress(b"compressible " * 5000)
    # The upstream must not decompress either, so it reports what was on the wire.
    base = await upstream_app(echo_app(), auto_decompress=False)
    sidecar = await start_sidecar(make_config(base))
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with http.post(sidecar.url("/z"), data=compressed, headers=headers) as resp:
        data = await resp.json()
    seen = headers_of(data)
    assert seen["content-encoding"] == ["gzip"]
    assert seen["content-length"] == [str(len(compressed))]
    assert data["size"] == len(compressed)
    assert data["sha256"] == hashlib.sha256(compressed).hexdigest()


# --- headers -----------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_removed(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """Hop-by-hop request headers, and those named in Connection, do not reach the upstream."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    request = raw_get(
        "/h",
        "Connection: keep-alive, X-Hop-One",
        "Connection: x-hop-two",
        "X-Hop-One: 1",
        "X-Hop-Two: 2",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Trailer: X-Checksum",
        "Proxy-Authorization: Basic c2VjcmV0",
        "Proxy-Connection: keep-alive",
        "X-End-To-End: kept",
    )
    assert (await raw_exchange(sidecar.url("/"), request)).status == 200
    seen = upstream.requests[0]
    for name in (
        "x-hop-one",
        "x-hop-two",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert name not in seen.names(), name
    assert seen.getall("X-End-To-End") == ["kept"]
    # aiohttp's own Connection handling is allowed; the client's tokens are not forwarded.
    assert all("hop" not in v.lower() for v in seen.getall("Connection"))


async def test_hop_by_hop_response_headers_removed(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """Hop-by-hop response headers, and those named in Connection, do not reach the client."""
    _, url = await recording_raw_upstream(
        start_raw,
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Resp-Hop\r\n"
        b"X-Resp-Hop: 1\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-End-To-End: kept\r\n"
        b"Content-Length: 2\r\n\r\nok",
    )
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/h"))
    assert response.status == 200
    for name in ("x-resp-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in response.names(), name
    assert all("x-resp-hop" not in v.lower() for v in response.getall("Connection"))
    assert response.getall("X-End-To-End") == ["kept"]
    assert response.body == b"ok"


async def test_response_without_content_type_gets_none(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A response without Content-Type reaches the client without one, so it can sniff."""
    _, url = await recording_raw_upstream(
        start_raw, b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>hi</html>"
    )
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/page"))
    assert response.status == 200
    assert response.get("Content-Type") is None
    assert response.body == b"<html>hi</html>"


async def test_response_content_type_kept(start_sidecar: StartSidecar, start_raw: StartRaw) -> None:
    """The upstream's Content-Type reaches the client unchanged."""
    _, url = await recording_raw_upstream(
        start_raw,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=latin-1\r\n"
        b"Content-Length: 2\r\n\r\nok",
    )
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/page"))
    assert response.getall("Content-Type") == ["text/html; charset=latin-1"]


async def test_set_cookie_passed_through_and_not_kept(
    start_sidecar: StartSidecar, upstream_app: Serve
) -> None:
    """Several Set-Cookie headers reach the client; the proxy does not replay them upstream."""
    cookies_seen: list[str | None] = []

    async def login(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        response.headers.add("Set-Cookie", "c=3; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT")
        return response

    app = web.Application()
    app.router.add_get("/c", login)
    # By host name: a cookie jar that stores cookies at all ignores those of IP addresses.
    base = (await upstream_app(app)).replace("127.0.0.1", "localhost")
    sidecar = await start_sidecar(make_config(base))
    # A client with no cookie jar, so only the proxy could add a Cookie header.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for _ in range(2):
            async with client.get(sidecar.url("/c")) as resp:
                assert resp.headers.getall("Set-Cookie") == [
                    "a=1; Path=/; HttpOnly",
                    "b=2; Path=/",
                    "c=3; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
                ]
    assert cookies_seen == [None, None]


async def test_client_cookie_header_forwarded(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A client's Cookie header reaches the upstream unchanged."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    await raw_exchange(sidecar.url("/"), raw_get("/", "Cookie: a=1; b=2"))
    assert upstream.requests[0].getall("Cookie") == ["a=1; b=2"]


@pytest.mark.parametrize(
    ("method", "body_headers"),
    [("GET", ()), ("POST", ("Content-Length: 4",)), ("POST", ("Transfer-Encoding: chunked",))],
)
async def test_proxy_client_adds_no_headers_of_its_own(
    method: str, body_headers: tuple[str, ...], start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A minimal request reaches the upstream without User-Agent, Accept*, Content-Type."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    body = b"4\r\nbody\r\n0\r\n\r\n" if "chunked" in "".join(body_headers) else b"body"
    request = raw_get("/min", *body_headers, method=method, body=body if body_headers else b"")
    assert (await raw_exchange(sidecar.url("/"), request)).status == 200
    seen = upstream.requests[0]
    for name in ("user-agent", "accept-encoding", "content-type", "accept", "cookie"):
        assert name not in seen.names(), name
    allowed = {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
    assert seen.names() <= allowed
    assert seen.get("Host") == "sidecar.test"
    if body_headers:
        assert seen.body == b"body"


# --- X-Forwarded-* -----------------------------------------------------------------------

SPOOFED = (
    "X-Forwarded-For: 203.0.113.7",
    "X-Forwarded-For: 198.51.100.1",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Host: original.example",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Prefix: /evil",
    "Forwarded: for=203.0.113.7;proto=https",
    "X-Real-Ip: 203.0.113.7",
)


async def test_forwarded_headers_set_and_spoofs_dropped(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """From an untrusted peer, X-Forwarded-* are the sidecar's own; Forwarded, X-Real-Ip go."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    await raw_exchange(sidecar.url("/"), raw_get("/f", "Host: app.example:8443", *SPOOFED))
    seen = upstream.requests[0]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["app.example:8443"]
    for name in ("forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix"):
        assert name not in seen.names(), name


async def test_forwarded_headers_without_client_copies(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A request without forwarding headers gets X-Forwarded-For/-Proto/-Host from the sidecar."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    await raw_exchange(sidecar.url("/"), raw_get("/f"))
    seen = upstream.requests[0]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["sidecar.test"]


async def test_forwarded_headers_from_trusted_proxy_appended(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """From a trusted proxy, the peer is appended to every X-Forwarded-For hop; others are kept."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    data = config_dict(url)
    data["server"]["trusted_proxies"] = ["127.0.0.0/8"]
    sidecar = await start_sidecar(Config.model_validate(data))
    await raw_exchange(sidecar.url("/"), raw_get("/f", "Host: app.example:8443", *SPOOFED))
    seen = upstream.requests[0]
    assert seen.getall("X-Forwarded-For") == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    assert seen.getall("X-Forwarded-Host") == ["original.example"]
    assert seen.getall("Forwarded") == ["for=203.0.113.7;proto=https"]
    assert seen.getall("X-Real-Ip") == ["203.0.113.7"]


# --- X-Request-Id ------------------------------------------------------------------------


async def test_well_formed_request_id_passed_and_echoed(
    start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A well-formed client X-Request-Id reaches the upstream once and is echoed back."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/r", "X-Request-Id: abc-123.x:y_z"))
    assert upstream.requests[0].getall("X-Request-Id") == ["abc-123.x:y_z"]
    assert response.getall("X-Request-Id") == ["abc-123.x:y_z"]


@pytest.mark.parametrize("given", ["has space", "<script>", "a" * 129, "id\u00e9"])
async def test_malformed_request_id_replaced(
    given: str, start_sidecar: StartSidecar, start_raw: StartRaw
) -> None:
    """A malformed X-Request-Id is replaced by a fresh id, the same upstream and in the answer."""
    upstream, url = await recording_raw_upstream(start_raw, OK)
    sidecar = await start_sidecar(make_config(url))
    response = await raw_exchange(sidecar.url("/"), raw_get("/r", f"X-Request-Id: {given}"))
    sent = upstream.requests[0].getall("X-Request-Id")
    assert len(sent) == 1
    assert sent[0] != given
    assert len(sent[0]) == 32
    assert int(sent[0], 16) >= 0
    assert response.getall("X-Request-Id") == sent


# --- routing -----------------------------------------------------------------------------


async def test_longest_prefix_routing(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """The longest matching prefix wins, /apix is not /api, strip_prefix and base paths apply."""
    root = await upstream_app(echo_app("root"))
    api = await upstream_app(echo_app("api"))
    v2 = await upstream_app(echo_app("v2"))
    config = make_config(
        upstreams=[
            {"path": "/", "url": root},
            {"path": "/api", "url": api + "/backend"},
            {"path": "/api/v2", "url": v2 + "/base/", "strip_prefix": True},
        ]
    )
    sidecar = await start_sidecar(config)
    expected = {
        "/x": ("root", "/x"),
        "/apix": ("root", "/apix"),
        "/api": ("api", "/backend/api"),
        "/api/": ("api", "/backend/api/"),
        "/api/x?q=1": ("api", "/backend/api/x?q=1"),
        "/api/v2x": ("api", "/backend/api/v2x"),
        "/api/v2": ("v2", "/base/"),
        "/api/v2/": ("v2", "/base/"),
        "/api/v2/items/7?a=%2F": ("v2", "/base/items/7?a=%2F"),
    }
    for path, (name, upstream_path) in expected.items():
        async with http.get(URL(sidecar.url("/").rstrip("/") + path, encoded=True)) as resp:
            assert resp.status == 200, path
            assert resp.headers["X-Upstream"] == name, path
            assert (await resp.json())["raw_path"] == upstream_path, path


async def test_unrouted_path_is_404(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """A path no upstream serves gets a short JSON 404 that echoes nothing."""
    sidecar = await start_sidecar(
        make_config(upstreams=[{"path": "/api", "url": "http://127.0.0.1:9"}])
    )
    async with http.get(sidecar.url("/secret-token-abc")) as resp:
        assert resp.status == 404
        body = await resp.text()
    assert json.loads(body)["error"] == "no_upstream"
    assert "secret-token-abc" not in body


# --- connection pooling ------------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    start_sidecar: StartSidecar, start_raw: StartRaw, http: aiohttp.ClientSession
) -> None:
    """Sequential requests of every body kind share one pooled upstream connection."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    upstream, url = await recording_raw_upstream(start_raw, chunked)
    sidecar = await start_sidecar(make_config(url))
    for i in range(3):
        async with http.get(sidecar.url(f"/g{i}")) as resp:
            assert await resp.read() == b"ok"
        async with http.post(sidecar.url(f"/p{i}"), data=b"x" * 1000) as resp:
            assert await resp.read() == b"ok"
        async with http.post(sidecar.url(f"/c{i}"), data=chunks(b"a", b"b")) as resp:
            assert await resp.read() == b"ok"
    assert len(upstream.requests) == 9
    assert upstream.connections == 1


async def test_aiohttp_upstream_sees_one_peer(
    start_sidecar: StartSidecar, upstream_app: Serve, http: aiohttp.ClientSession
) -> None:
    """An aiohttp upstream sees all sequential requests come from one client socket."""
    peers: set[Any] = set()

    async def page(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(body=b"y" * 10_000)

    app = web.Application()
    app.router.add_get("/p", page)
    sidecar = await start_sidecar(make_config(await upstream_app(app)))
    for _ in range(5):
        async with http.get(sidecar.url("/p")) as resp:
            assert len(await resp.read()) == 10_000
    assert len(peers) == 1
