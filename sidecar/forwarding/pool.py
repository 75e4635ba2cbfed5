"""A lean HTTP/1.1 client for proxying: pooled keep-alive connections to one upstream.

aiohttp's `ClientSession` builds a request object, timers, a trace context and a cookie
pass per call; measured behind the sidecar it cost more than everything else on the hot
path together (bench/README.md). A proxy needs none of that: it sends a head it already
has, streams a body, and hands the answer back. Parsing is llhttp's (Node's parser, via
`httptools`); websockets still go through aiohttp's client (forwarding/upstream.py).

What the pool promises:
- one request at a time per connection, no pipelining; a connection is reused only after
  a complete response to a fully sent request, when both sides allow keep-alive;
- a request on a reused connection that the upstream closed before answering a single byte
  is sent again on a new connection, once, and only if its method is idempotent and it has
  no body (RFC 9110 §9.2.2; a keep-alive race, not an upstream failure);
- connecting waits at most `connect_timeout`; every other wait on the upstream (the
  response head once the request is sent, each body chunk, room to write the request body)
  at most `read_timeout`, by one timer per connection rather than a timeout context per wait;
- a response body is buffered up to `_HIGH_WATER` bytes, then reading pauses until the
  client has taken it (backpressure end to end);
- at most `limit` requests are in flight; a request that finds no free slot within
  `pool_timeout` fails with `PoolExhausted` instead of queueing without bound;
- a client that stops sending the body being forwarded fails the request with
  `RequestBodyTimeout` after `body_timeout`, and the half-sent connection is closed, never
  pooled (docs/proxy.md, "Client timeouts and limits").
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Final, cast

import httptools
from aiohttp import StreamReader

from sidecar.errors import RequestBodyTimeout

__all__ = [
    "ConnectFailed",
    "ConnectionPool",
    "PoolExhausted",
    "Slots",
    "UnsafeHeader",
    "UpstreamClosed",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "encode_head",
]

_HIGH_WATER: Final = 256 * 1024  # buffered response bytes before reading pauses
_LOW_WATER: Final = 64 * 1024
_IDLE_TIMEOUT: Final = 15.0  # seconds an idle connection is kept (aiohttp's default too)
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_BODY_STATUS: Final = frozenset({204, 304})
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


class ConnectFailed(OSError):
    """No connection could be opened (refused, unreachable, TLS handshake failed)."""


class PoolExhausted(TimeoutError):
    """Every connection slot stayed in use for `pool_timeout`: the upstream is saturated."""


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class UpstreamProtocolError(ConnectionError):
    """The upstream's answer is not valid HTTP/1.1."""


class UnsafeHeader(ValueError):
    """A header value holds a line break or NUL: sending it would split the request."""


def encode_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request head as bytes; raises `UnsafeHeader` if a value would split it."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend([f"{name}: {value}" for name, value in headers])
    text = "\r\n".join(lines) + "\r\n\r\n"
    breaks = len(lines) + 1  # two C-speed scans instead of one check per header
    if text.count("\n") != breaks or text.count("\r") != breaks or "\x00" in text:
        raise UnsafeHeader("a request header holds a line break or NUL")
    return text.encode("utf-8", "surrogateescape")


class UpstreamResponse:
    """Status, headers and the body of one answer; `release()` must follow, always."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]], conn: _Connection
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received: names in their case, repeats kept
        self._conn = conn

    @property
    def complete(self) -> bool:
        """The whole body has arrived: `buffered()` returns all of it."""
        return self._conn.message_complete

    def buffered(self) -> bytes:
        """The body bytes received so far, taken out of the buffer."""
        return self._conn.take_all()

    async def read(self) -> bytes:
        """The next body bytes as they arrive, b"" at the end.

        Raises `TimeoutError`, `UpstreamClosed` or `UpstreamProtocolError` if the upstream
        stops short."""
        return await self._conn.next_chunk()

    def release(self) -> None:
        """Give the connection back if it can serve another request, else close it."""
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the state of the exchange in flight, if any."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # served a request before this one
        self.idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget the previous exchange."""
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._status = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._until_eof = False
        self._reading_paused = False
        self._got_bytes = False
        self._keep_alive = False
        self.message_complete = False
        self.request_sent = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self._pool.forget(self)
        if self._head is not None and not self.message_complete:
            if self._until_eof and self._head.done():
                self._complete()  # a body delimited by the connection's end (RFC 9112 §6.3)
            else:
                self._fail(UpstreamClosed("the upstream closed the connection"))
        self._end_drain(UpstreamClosed("the upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.message_complete:
            # Bytes nobody asked for: an upstream that does not follow HTTP/1.1.
            self._fail(UpstreamProtocolError("unexpected bytes from the upstream"))
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid response from the upstream: {exc}"))
            self.close()

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        self._end_drain(None)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._head is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue, 103 Early Hints: informational, the real answer follows.
            self._raw_headers.clear()
            self._reason = b""
            return
        self._disarm()
        self._status = status
        framed = False
        headers: list[tuple[str, str]] = []
        for name, value in self._raw_headers:
            framed = framed or name.lower() in _FRAMING
            headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        self._until_eof = not (framed or self._head_only or status in _NO_BODY_STATUS)
        if not self._head.done():
            reason = self._reason.decode("latin-1")
            self._head.set_result(UpstreamResponse(status, reason, headers, self))
        if self._head_only:
            # llhttp would wait for the Content-Length a HEAD answer announces but never sends.
            self._complete()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._status == 0 or self.message_complete:
            return  # the end of an informational answer, or of a HEAD answer's head
        assert self._parser is not None
        # Read now: llhttp resets its flags once the callback returns.
        self._keep_alive = self._parser.should_keep_alive()
        self._complete()

    # --- used by the pool and the response ------------------------------------------------

    def start(self, head: bytes, method: str) -> asyncio.Future[UpstreamResponse]:
        """Send a request head; the future resolves with the response's status and headers.

        The connection is new or was put back by `finish()`: either way its state is reset.
        """
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._head = self._loop.create_future()
        self.transport.write(head)
        return self._head

    def sent(self) -> None:
        """The whole request is out: the upstream has `read_timeout` to start answering."""
        self.request_sent = True
        if self._head is not None and not self._head.done():
            self._arm()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait, at most `read_timeout`, until the upstream has room for more of the body."""
        if self.closed:
            raise UpstreamClosed("the upstream closed the connection")
        if self._drain is not None:
            self._arm()
            try:
                await self._drain
            finally:
                self._disarm()

    @property
    def silent(self) -> bool:
        """No byte of the answer has arrived (a keep-alive race, when the connection drops)."""
        return not self._got_bytes

    async def next_chunk(self) -> bytes:
        """The next body bytes; b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.message_complete:
                return b""
            self._waiter = self._loop.create_future()
            self._arm()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._disarm()
        return self._take(self._chunks.popleft())

    def take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return self._take(data)

    def finish(self) -> None:
        """The response is done with: back to the pool if reusable, else closed."""
        self._disarm()
        reusable = self.message_complete and self.request_sent and self._keep_alive
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
        self._reset()
        if reusable and not self.closed:
            self.reused = True
            self._pool.put_back(self)
        else:
            self.close()
            self._pool.put_back(None)

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    # --- internals -----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._timer = self._loop.call_later(self._pool.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        exc = TimeoutError("the upstream did not answer in time")
        self._fail(exc)
        self._end_drain(exc)
        self.close()

    def _take(self, data: bytes) -> bytes:
        self._buffered -= len(data)
        if self._reading_paused and self._buffered < _LOW_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def _complete(self) -> None:
        self.message_complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._head is not None and not self._head.done():
            _settle(self._head, exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end_drain(self, exc: BaseException | None) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            if exc is None:
                drain.set_result(None)
            else:
                _settle(drain, exc)


def _settle(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail `future`, marked as seen: its awaiter may be gone (the client left), and the
    error is kept in the connection's state for whoever asks next."""
    future.set_exception(exc)
    future.exception()  # no "Future exception was never retrieved" when nobody awaits


class Slots:
    """At most `limit` requests in flight; waiters are served in order, for a bounded time.

    A semaphore whose uncontended take is one comparison: it is on every request's path.
    A released slot is handed straight to the oldest waiter, so a newcomer never overtakes.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        """Take a free slot without waiting; False when there is none."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def wait(self, limit: float) -> None:
        """Wait in line for a slot; `PoolExhausted` after `limit` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(limit):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # `release` handed it a slot
                if isinstance(exc, TimeoutError):
                    return  # as time ran out: the slot is ours
                self.release()  # as the wait was cancelled: pass it on
                raise
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolExhausted("no free connection to the upstream") from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it, still taken
                return
        self._free += 1


class ConnectionPool:
    """Keep-alive connections to one `host:port`, at most `limit` in use at once."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float = 5.0,
        body_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.read_timeout = read_timeout
        self._ssl = ssl.create_default_context() if tls else None
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._body_timeout = body_timeout
        self._slots = Slots(limit)
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()

    async def request(
        self,
        method: str,
        head: bytes,
        body: StreamReader | None,
        *,
        chunked: bool,
    ) -> UpstreamResponse:
        """Send one request (`head` from `encode_head`) and return its answer's head.

        Raises `ConnectFailed`, `PoolExhausted`, `TimeoutError`, `UpstreamClosed`,
        `UpstreamProtocolError`, or `RequestBodyTimeout` when the client stalls its body.
        """
        # Released by the response's release(), or below. A free slot is taken at once; only
        # a request that has to wait pays for a timer.
        if not self._slots.take():
            await self._slots.wait(self._pool_timeout)
        try:
            conn = await self._connection()
            try:
                return await self._exchange(conn, method, head, body, chunked)
            except UpstreamClosed:
                if not (conn.reused and conn.silent and body is None and method in _IDEMPOTENT):
                    raise
            # The upstream dropped an idle connection as we reused it: once more, on a new one.
            conn = await self._open()
            return await self._exchange(conn, method, head, None, chunked)
        except BaseException:
            self._slots.release()
            raise

    async def close(self) -> None:
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    # --- used by connections --------------------------------------------------------------

    def put_back(self, conn: _Connection | None) -> None:
        """A response was released: its slot is free, its connection (if any) idle."""
        if conn is not None:
            self._busy.discard(conn)
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        self._slots.release()

    def forget(self, conn: _Connection) -> None:
        """A closed connection leaves the pool at once."""
        self._busy.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    # --- internals -----------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.closed or now - conn.idle_since > _IDLE_TIMEOUT:
                conn.close()
                continue
            self._busy.add(conn)
            return conn
        return await self._open()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:  # ssl.SSLError is an OSError too
            raise ConnectFailed(f"cannot connect to the upstream: {exc}") from exc
        self._busy.add(conn)
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: StreamReader | None,
        chunked: bool,
    ) -> UpstreamResponse:
        """One request on `conn`; on failure the connection is closed (the caller's slot kept)."""
        answer = conn.start(head, method)
        if body is None:
            conn.sent()
            try:
                return await answer
            except BaseException:
                conn.close()
                raise
        sending = asyncio.ensure_future(_send_body(conn, body, chunked, self._body_timeout))
        try:
            either: set[asyncio.Future[Any]] = {sending, answer}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if sending.done():
                failed = sending.exception()
                if failed is not None:
                    raise failed
                return await answer
            # Answered before the body was sent (413, 401...): pass it on; the connection
            # goes once it is released, since the rest of the body is left unsent.
            sending.cancel()
            return answer.result()
        except BaseException:
            sending.cancel()
            conn.close()
            raise


async def _send_body(
    conn: _Connection, body: StreamReader, chunked: bool, body_timeout: float
) -> None:
    """Copy the client's body upstream, in chunked framing when its length is unknown.

    Each wait for the client's next bytes lasts at most `body_timeout`; bytes already
    buffered are taken without a wait, so a timer is only set when the client is behind.
    """
    while True:
        data = body.read_nowait()
        if not data:
            if body.is_eof():
                break
            data = await _next_body_bytes(body, body_timeout)
            if not data:
                break
        if chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")
    conn.sent()


async def _next_body_bytes(body: StreamReader, limit: float) -> bytes:
    """The client's next body bytes (b"" at the end), or `RequestBodyTimeout` after `limit`."""
    try:
        async with asyncio.timeout(limit):
            return await body.readany()
    except TimeoutError:
        raise RequestBodyTimeout("the client stopped sending the request body") from None
