"""Streaming reverse proxy: HTTP bodies are never buffered, websockets are relayed frame by frame.

Each upstream owns a pool of keep-alive HTTP/1.1 connections (`upstream_http`, the hot path)
and, for websockets, an aiohttp `ClientSession` configured to change nothing on the way:
no automatic headers, no decompression, no cookie jar, no redirects followed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from sidecar.config import UpstreamConfig
from sidecar.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from sidecar.forwarding.headers import (
    WEBSOCKET_HANDSHAKE,
    ForwardedPolicy,
    RequestHeaderFilter,
    response_headers,
)
from sidecar.forwarding.paths import PATH, CanonicalPath
from sidecar.forwarding.pool import (
    ConnectFailed,
    ConnectionPool,
    PoolExhausted,
    UnsafeHeader,
    UpstreamResponse,
    encode_head,
)
from sidecar.metrics import Metrics
from sidecar.telemetry import Tracing

__all__ = ["PathPrefixes", "Router", "Upstream", "is_websocket", "path_matches"]

log = logging.getLogger("sidecar.proxy")

# Headers aiohttp's client would otherwise add by itself; the upstream must see the
# client's request, not ours.
_NO_AUTO_HEADERS: Final = ("User-Agent", "Accept-Encoding", "Accept", "Content-Type")
_POOL_SIZE: Final = 1024  # connections per upstream; aiohttp's default of 100 starves a proxy
_WS_CLOSE_TIMEOUT: Final = 10.0  # seconds to wait for the peer's close frame
# Close codes that only describe a connection and may not be sent in a frame (RFC 6455 §7.4.1).
_UNSENDABLE_CLOSE: Final = {1005: 1000, 1006: 1011, 1015: 1011}


class Upstream:
    """One configured upstream and its connection pool."""

    def __init__(
        self,
        config: UpstreamConfig,
        policy: ForwardedPolicy,
        metrics: Metrics,
        *,
        drop: frozenset[str] = frozenset(),
        cookie_filter: Callable[[str], str] | None = None,
        body_timeout: float = 30.0,
        tracing: Tracing | None = None,
    ) -> None:
        """`drop`: client headers never forwarded; `cookie_filter`: edits the `Cookie` header;
        `body_timeout`: longest wait for a client's next body bytes (`server.body_timeout`);
        `tracing`: each exchange is a client span whose context goes upstream."""
        self.config = config
        self.prefix = config.path
        base = URL(config.url)
        self._origin = str(base.origin())
        self._base_path = base.raw_path.rstrip("/")
        self._authority = base.raw_authority  # the Host header when the client's is not passed
        self._pass_host = config.pass_host_header
        self._strip = (
            self.prefix.rstrip("/") if config.strip_prefix and self.prefix != "/" else None
        )
        self._headers = RequestHeaderFilter(policy, drop=drop, cookie_filter=cookie_filter)
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.timeout
        )
        # Opens connections only when used; nothing to start.
        self._pool = ConnectionPool(
            base.raw_host or "",
            base.port or 80,
            tls=base.scheme == "https",
            limit=config.max_connections,
            connect_timeout=config.connect_timeout,
            read_timeout=config.timeout,
            pool_timeout=config.pool_timeout,
            body_timeout=body_timeout,
        )
        self._session: aiohttp.ClientSession | None = None
        self._tracing = tracing
        self._span_attributes: dict[str, str | int] = {
            "server.address": base.raw_host or "",
            "server.port": base.port or 80,
            "url.scheme": base.scheme,
            "sidecar.upstream": self.prefix,
        }

    def refuses(self, target: CanonicalPath) -> str | None:
        """Why this upstream will not take `target`, when it uses a form it did not opt into."""
        if target.encoded_slash and not self.config.allow_encoded_slashes:
            return "the path holds an encoded / or \\"
        if target.params and not self.config.allow_path_params:
            return "the path holds ; parameters"
        return None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_POOL_SIZE, enable_cleanup_closed=True),
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
            raise_for_status=False,
        )

    async def close(self) -> None:
        await self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream used before start() or after close()")
        return self._session

    def path(self, request: web.BaseRequest) -> str:
        """The upstream request target: the canonical path the sidecar decided on, then the
        query byte for byte (origin-form, RFC 9112 §3.2.1)."""
        path = request[PATH].path
        if self._strip is not None and path_matches(path, self.prefix):
            path = path[len(self._strip) :]
            if not path.startswith("/"):
                path = "/" + path
        _, mark, query = request.raw_path.partition("?")
        return self._base_path + path + mark + query

    def target(self, request: web.BaseRequest) -> URL:
        """The upstream URL, percent-encoding untouched."""
        return URL(self._origin + self.path(request), encoded=True)

    async def forward(
        self,
        request: web.Request,
        extra: Iterable[tuple[str, str]] = (),
        *,
        websocket: bool | None = None,
        ended: asyncio.Event | None = None,
    ) -> web.StreamResponse:
        """Send `request` upstream and stream the answer back; `extra` headers are added.

        `websocket`: whether it is an upgrade, when the caller knows already. `ended`: for a
        websocket, set when its session ends; both sides are then closed with 1008 (policy
        violation).
        """
        headers = self._headers(request)
        headers.extend(extra)
        if websocket is None:
            websocket = is_websocket(request)
        if self._tracing is not None:
            return await self._traced(self._tracing, request, headers, websocket, ended)
        if websocket:
            return await self._forward_websocket(request, headers, ended)
        return await self._forward_http(request, headers)

    async def _traced(
        self,
        tracing: Tracing,
        request: web.Request,
        headers: list[tuple[str, str]],
        websocket: bool,
        ended: asyncio.Event | None,
    ) -> web.StreamResponse:
        """`forward` in an `upstream` client span; the upstream receives its `traceparent`
        (the client's was dropped with the other headers the sidecar owns)."""
        attributes: dict[str, str | int] = {
            **self._span_attributes,
            "http.request.method": request.method,
            "url.path": self.path(request).partition("?")[0],
        }
        with tracing.span("upstream", kind="client", attributes=attributes) as span:
            tracing.inject(headers)
            if websocket:
                response = await self._forward_websocket(request, headers, ended)
            else:
                response = await self._forward_http(request, headers)
            span.set("http.response.status_code", response.status)
            if response.status >= 500:
                span.fail(str(response.status))
            return response

    async def _forward_http(
        self, request: web.Request, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        # The sidecar owns framing: one Host, and one of Content-Length or chunked, matching
        # the body as aiohttp's strict parser framed it (docs/security.md).
        host = request.headers.get(hdrs.HOST) if self._pass_host else None
        headers.append(("Host", host or self._authority))
        # aiohttp's parser accepted the length as digits only, and never beside chunked.
        length = request.headers.get(hdrs.CONTENT_LENGTH)
        chunked = length is None and request.body_exists
        body = request.content if chunked or (length and int(length)) else None
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif length is not None:
            headers.append(("Content-Length", str(int(length))))
        try:
            head = encode_head(request.method, self.path(request), headers)
            upstream = await self._pool.request(request.method, head, body, chunked=chunked)
        except (OSError, TimeoutError, UnsafeHeader) as exc:
            raise self._error(exc, "request") from exc

        try:
            response = _ProxiedResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(response_headers(upstream.headers))
            if upstream.complete:
                # The whole body is already here: headers and body leave in one write.
                response._send_headers_immediately = False
                await response.prepare(request)
                data = upstream.buffered()
                if data:
                    await response.write(data)
            else:
                await response.prepare(request)
                if not await self._stream(request, response, upstream):
                    return response
            await response.write_eof()
            return response
        except ConnectionResetError:
            # The client hung up before or during the answer (the peer's reset may be seen
            # before its connection_lost cancels us): routine, nobody to tell. Not an error.
            log.debug("client went away during the response", extra={"route": self.prefix})
            return response
        finally:
            upstream.release()

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, upstream: UpstreamResponse
    ) -> bool:
        """Copy the body as it comes; False if the upstream stopped short."""
        while True:
            try:
                chunk = await upstream.read()
            except (OSError, TimeoutError) as exc:
                # Headers are out: the only honest signal left is to cut the connection,
                # so the client cannot take a truncated body for a whole one.
                self._error(exc, "response body")
                if request.transport is not None:
                    request.transport.abort()
                return False
            if not chunk:
                return True
            await response.write(chunk)

    async def _forward_websocket(
        self, request: web.Request, headers: list[tuple[str, str]], ended: asyncio.Event | None
    ) -> web.StreamResponse:
        headers = [(k, v) for k, v in headers if k.lower() not in WEBSOCKET_HANDSHAKE]
        protocols = [
            p.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in value.split(",")
            if p.strip()
        ]
        try:
            upstream = await self.session.ws_connect(
                self.target(request),
                headers=headers,
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=_WS_CLOSE_TIMEOUT),
            )
        except aiohttp.WSServerHandshakeError as exc:
            self._metrics.upstream_errors.labels(self.prefix, "websocket_handshake").inc()
            raise UpstreamUnavailable(f"upstream refused the websocket ({exc.status})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._error(exc, "websocket") from exc

        async with upstream:
            client = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (),
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=False,
            )
            await client.prepare(request)
            relays = [
                asyncio.create_task(_relay(client, upstream)),
                asyncio.create_task(_relay(upstream, client)),
            ]
            watch = asyncio.create_task(ended.wait()) if ended is not None else None
            watching: list[asyncio.Task[Any]] = [*relays, *([watch] if watch else [])]
            try:
                await asyncio.wait(watching, return_when=asyncio.FIRST_COMPLETED)
                if watch is not None and watch.done():
                    for task in relays:
                        task.cancel()
                    await asyncio.gather(*relays, return_exceptions=True)
                    await asyncio.gather(
                        client.close(code=WSCloseCode.POLICY_VIOLATION, message=b"session ended"),
                        upstream.close(code=WSCloseCode.POLICY_VIOLATION, message=b"session ended"),
                        return_exceptions=True,
                    )
                # One side closed; give the other its closing handshake, then stop.
                await asyncio.wait(relays, timeout=_WS_CLOSE_TIMEOUT)
            finally:
                for task in watching:
                    task.cancel()
                await asyncio.gather(*relays, return_exceptions=True)
                if not client.closed:
                    await client.close(code=1011)
            return client

    def _error(self, exc: BaseException, during: str) -> UpstreamError:
        """Classify a client failure, count it, log it without any header or body."""
        error: UpstreamError
        if isinstance(exc, PoolExhausted):
            kind = "pool_exhausted"
            error = UpstreamBusy("upstream busy; try again shortly", self.config.pool_timeout)
        elif isinstance(exc, TimeoutError):
            kind, error = "timeout", UpstreamTimeout(f"upstream timed out ({during})")
        elif isinstance(exc, UnsafeHeader):
            kind, error = "header", UpstreamError("a request header could not be sent")
        else:
            connect = isinstance(exc, ConnectFailed | aiohttp.ClientConnectorError)
            kind = "connect" if connect else "io"
            error = UpstreamUnavailable(f"upstream unavailable ({during})")
        self._metrics.upstream_errors.labels(self.prefix, kind).inc()
        log.warning(
            "upstream error",
            extra={
                "upstream": self.prefix,
                "kind": kind,
                "during": during,
                "error": type(exc).__name__,
            },
        )
        return error


class _ProxiedResponse(web.StreamResponse):
    """A response that sends the upstream's headers without inventing a Content-Type.

    aiohttp gives a body without Content-Type `application/octet-stream`; a proxy must not:
    the recipient may then examine the data to find its type (RFC 9110 §8.3), and a browser
    would otherwise download a page it should have shown.
    """

    async def _prepare_headers(self) -> None:
        had_type = hdrs.CONTENT_TYPE in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall(hdrs.CONTENT_TYPE, None)


def is_websocket(request: web.BaseRequest) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay(source: WebSocket, sink: WebSocket) -> None:
    """Copy frames from `source` to `sink` until either side closes; close codes carry over."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif kind is WSMsgType.PING:
            await sink.ping(message.data)
        elif kind is WSMsgType.PONG:
            await sink.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            code = _UNSENDABLE_CLOSE.get(message.data, message.data)
            reason = (message.extra or "").encode()
            await asyncio.gather(
                sink.close(code=code, message=reason),
                source.close(code=code, message=reason),
                return_exceptions=True,
            )
            return
        else:  # CLOSING, CLOSED, ERROR: the source is gone without a close frame
            if not sink.closed:
                await sink.close(code=1011 if kind is WSMsgType.ERROR else 1001)
            return


class PathPrefixes:
    """A set of path prefixes with `path_matches` semantics, checked with one `startswith`."""

    __slots__ = ("_all", "_below", "_exact")

    def __init__(self, prefixes: Iterable[str]) -> None:
        prefixes = tuple(prefixes)
        self._all = "/" in prefixes
        self._exact = frozenset(prefixes)
        self._below = tuple(p if p.endswith("/") else p + "/" for p in prefixes)

    def __contains__(self, path: str) -> bool:
        return self._all or path in self._exact or path.startswith(self._below)


class Router:
    """Picks the upstream with the longest path prefix matching the request path."""

    def __init__(self, upstreams: Iterable[Upstream]) -> None:
        self._by_length = tuple(sorted(upstreams, key=lambda u: len(u.prefix), reverse=True))

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._by_length

    @property
    def has_rules(self) -> bool:
        """Whether any upstream has route rules or access rules of its own."""
        return any(u.config.rules or u.config.access for u in self._by_length)

    def match(self, path: str) -> Upstream | None:
        for upstream in self._by_length:
            if path_matches(path, upstream.prefix):
                return upstream
        return None


def path_matches(path: str, prefix: str) -> bool:
    """`/api` matches `/api` and `/api/x` but not `/apix`; `/api/` matches what is below it."""
    if prefix == "/" or path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix) and path[len(prefix)] == "/"
