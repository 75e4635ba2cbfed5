"""The main listener: aiohttp's HTTP/1.1 server, with a deadline for request heads and short
answers to heads that cannot be parsed (docs/proxy.md, "Client timeouts and limits").

aiohttp bounds a request head only by its keep-alive timer, so a client that trickles a head
one byte at a time holds its connection for as long as it likes (slowloris). Here a head must
be complete within `server.header_timeout` of its start: the connection being opened, or the
first byte after the previous response (bytes pipelined before that response count from
its end, noticed within a second). Bytes that trickle in do not move the deadline.

On a head it cannot parse, aiohttp answers 400 with a body that quotes the offending bytes,
and logs them with a traceback: a Cookie header can end up in both. Here an oversized
request line or header line, or too many header lines, is answered 431 (RFC 6585 §5) and any
other malformed head 400, both with a fixed body; one log line names the error class and
the peer, never the bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from sidecar.web.responses import error_response

__all__ = ["GuardedRequestHandler", "Listener"]

log = logging.getLogger("sidecar")

_END: Final = b"\r\n\r\n"  # the end of a head, of a chunked body, of trailers
# A head pipelined behind unanswered requests gets its deadline at most this late.
_PIPELINE_POLL: Final = 1.0

_TIMEOUT_BODY: Final = json.dumps(
    {"error": "request_timeout", "message": "the request head took too long"}
).encode()
# Written straight to the socket: no request exists yet to build a response for.
_HEAD_TIMED_OUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a whole-head deadline and non-echoing parse errors.

    One timer per connection, re-armed lazily like aiohttp's keep-alive timer. A head that
    arrives whole in one read, the common case, costs a few attribute checks and no clock
    reading: the clock starts only when a read leaves a head incomplete.
    """

    __slots__ = (
        "_body",
        "_head_since",
        "_head_timer",
        "_header_timeout",
        "_heard",
        "_pipelined",
    )

    def __init__(self, manager: web.Server, *, header_timeout: float, **options: Any) -> None:
        super().__init__(manager, **options)
        self._header_timeout = header_timeout
        self._head_since = 0.0  # loop time the pending head started; 0.0: none pending
        self._head_timer: asyncio.TimerHandle | None = None
        self._heard = False  # any byte arrived: a timed-out head gets a 408, not silence
        self._body: StreamReader | None = None  # the body of the latest request parsed
        self._pipelined = False  # a head began behind requests not yet answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not data:  # aiohttp re-parsing what it buffered while reading was paused
            super().data_received(data)
            return
        self._heard = True
        body = self._body  # of the latest request parsed, if it has one
        fed = -1 if body is None or body.is_eof() else body.total_bytes
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # Heads completed: whatever preceded the last one's end belonged to requests.
            payload = self._messages[-1][1]
            self._body = None if payload is EMPTY_PAYLOAD else payload
            self._head_since = 0.0
            self._pipelined = False
            if not data.endswith(_END) and _goes_on(data, payload):
                self._head_pending()
        elif fed >= 0:  # `data` continued a body
            if body is not None and body.is_eof() and _past_body(data, body, fed):
                self._head_pending()  # the segment that ended the body started a head
        elif not self._head_since:
            self._head_pending()  # `data` started a head and did not finish it

    def _head_pending(self) -> None:
        """A read left a head incomplete: its deadline runs from now, or, behind requests
        not yet answered, from when they are (found by polling; see `_check_head`)."""
        if self._request_in_progress or self._messages:
            self._pipelined = True
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._poll, self._check_head)
        elif not self._head_since:
            self._start_clock()

    @property
    def _poll(self) -> float:
        """How often a head queued behind a request checks whether its turn has come."""
        return min(self._header_timeout, _PIPELINE_POLL)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The client's malformed request: a fixed 431 or 400; anything else: aiohttp's 5xx."""
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started: no room for an error answer")
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, HttpProcessingError) and exc.message.startswith("Too many headers")
        )
        status = 431 if too_large else 400
        # Non-HTTP bytes (TLS to a plain port, scanners) are routine: not worth a warning.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(
            level,
            "malformed request refused",
            extra={"status": status, "error": type(exc).__name__, "peer": request.remote},
        )
        if too_large:
            response = error_response(
                request, 431, "header_too_large", "request header fields too large"
            )
        else:
            response = error_response(request, 400, "bad_request", "malformed request")
        response.force_close()
        return response

    # --- the head deadline ---------------------------------------------------------------

    def _start_clock(self) -> None:
        now = self._loop.time()
        self._head_since = now
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(now + self._header_timeout, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        busy = self._request_in_progress or bool(self._messages)
        if self._pipelined:
            if busy:
                self._head_timer = self._loop.call_later(self._poll, self._check_head)
            else:
                self._pipelined = False  # the requests before it are answered
                self._start_clock()
            return
        since = self._head_since
        if not since or busy:
            return
        deadline = since + self._header_timeout
        if self._loop.time() < deadline:  # armed for an earlier head
            self._head_timer = self._loop.call_at(deadline, self._check_head)
            return
        log.info(
            "request head timed out",
            extra={"peer": _host(self.peername), "header_timeout_s": self._header_timeout},
        )
        if self._heard:
            self.transport.write(_HEAD_TIMED_OUT)
        self.force_close()  # closing the transport sends what was written first


def _goes_on(data: bytes, body: StreamReader) -> bool:
    """Whether `data`, whose parse completed a head with `body` and which does not end in
    CRLF CRLF, holds bytes past that message.

    A head, a chunked body and trailers end in CRLF CRLF; a partial next head cannot. A
    Content-Length body complete in `data` must directly follow its head's CRLF CRLF. A
    crafted body can fake that; the keep-alive timer still bounds such a head.
    """
    if not body.is_eof():
        return False
    size = body.total_bytes
    return size == 0 or data[-size - 4 : -size] != _END


def _past_body(data: bytes, body: StreamReader, fed: int) -> bool:
    """Whether `data`, which ended `body` (`fed` bytes of it came before), holds more."""
    return len(data) > body.total_bytes - fed and not data.endswith(_END)


def _host(peername: Any) -> str | None:
    return str(peername[0]) if isinstance(peername, tuple) else None


class Listener(web.BaseSite):
    """A TCP site like `web.TCPSite`, whose connections are `GuardedRequestHandler`s.

    The handlers get the runner's options (`server.main_runner_options`), exactly as
    aiohttp's `Server` would pass them to its own handler class.
    """

    __slots__ = ("_bound_port", "_header_timeout", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        header_timeout: float,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._header_timeout = header_timeout
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (the kernel's pick for port 0), else the one asked."""
        return self._port if self._bound_port is None else self._bound_port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        options = server._kwargs  # what `Server.__call__` gives aiohttp's own handler
        header_timeout = self._header_timeout

        def handler() -> GuardedRequestHandler:
            return GuardedRequestHandler(
                server, loop=loop, header_timeout=header_timeout, **options
            )

        self._server = await loop.create_server(
            handler,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
