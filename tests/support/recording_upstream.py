"""A strict upstream that parses every byte it receives and records every request it parses.

It reads the sidecar's connections the way a real backend would, with llhttp in its strict
mode (httptools), so a smuggled request hidden in a body is parsed, and recorded, as the
request it would become. Every parse error, upgrade, or message left unfinished at the end
of a connection is an anomaly. Each request is answered with a small keep-alive 200 (body:
`ok <method> <target>`), so the sidecar pools the connection and sends its next request on
it; `hold()` keeps answers back until `release()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools

__all__ = [
    "Anomaly",
    "ConnectionLog",
    "RecordingUpstream",
    "UpstreamRequest",
    "recording_upstream",
]

FRAMING = ("content-length", "transfer-encoding")


@dataclass
class UpstreamRequest:
    """One request as the upstream parsed it."""

    connection: int  # index of the connection in the order they were accepted
    index: int  # position on its connection
    method: str
    target: str  # the raw request target
    version: str
    headers: list[tuple[str, str]]  # in order, names as sent
    body: bytes  # decoded (de-chunked) body
    chunked: bool

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]

    def framing(self) -> list[tuple[str, str]]:
        """The Content-Length and Transfer-Encoding lines."""
        return [(k, v) for k, v in self.headers if k.lower() in FRAMING]


@dataclass
class Anomaly:
    """Something a strict server would not have read as a clean sequence of requests."""

    connection: int
    kind: str  # "parse error", "upgrade", "unfinished message"
    detail: str
    data: bytes  # the bytes that were being parsed


@dataclass
class ConnectionLog:
    index: int
    data: bytearray = field(default_factory=bytearray)  # every byte received
    requests: list[UpstreamRequest] = field(default_factory=list)
    closed: bool = False


class _Parse:
    """httptools callbacks for one connection: builds `UpstreamRequest`s as they complete."""

    def __init__(self, log: ConnectionLog) -> None:
        self.log = log
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[UpstreamRequest] = []
        self.in_message = False
        self._reset()

    def _reset(self) -> None:
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._chunked = False

    def on_message_begin(self) -> None:
        self.in_message = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_chunk_header(self) -> None:
        self._chunked = True

    def on_message_complete(self) -> None:
        self.in_message = False
        request = UpstreamRequest(
            connection=self.log.index,
            index=len(self.log.requests),
            method=self.parser.get_method().decode("latin-1"),
            target=self._url.decode("latin-1"),
            version=self.parser.get_http_version(),
            headers=self._headers,
            body=bytes(self._body),
            chunked=self._chunked,
        )
        self.log.requests.append(request)
        self.done.append(request)


class RecordingUpstream:
    """`url = await upstream.start()`; every parsed request lands in `requests`, in order."""

    def __init__(self) -> None:
        self.connections: list[ConnectionLog] = []
        self.requests: list[UpstreamRequest] = []
        self.anomalies: list[Anomaly] = []
        self._gate = asyncio.Event()
        self._gate.set()
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._gate.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold(self) -> None:
        """Parse and record requests, but answer none until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_for(self, count: int) -> list[UpstreamRequest]:
        """Wait until at least `count` requests were parsed (wrap in `asyncio.timeout`)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    def describe(self) -> str:
        """Everything received, for assertion messages."""
        lines = [f"{len(self.requests)} request(s), {len(self.anomalies)} anomaly(ies)"]
        lines += [
            f"  conn {r.connection}#{r.index}: {r.method} {r.target} {r.headers} {r.body!r}"
            for r in self.requests
        ]
        lines += [f"  anomaly conn {a.connection}: {a.kind}: {a.detail}" for a in self.anomalies]
        lines += [f"  conn {c.index} bytes: {bytes(c.data)!r}" for c in self.connections]
        return "\n".join(lines)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        log = ConnectionLog(len(self.connections))
        self.connections.append(log)
        parse = _Parse(log)
        try:
            await self._read(reader, writer, log, parse)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the sidecar closed the connection, or close() ended the test
        finally:
            log.closed = True
            self._tasks.discard(task)
            writer.close()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        log: ConnectionLog,
        parse: _Parse,
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                if parse.in_message:
                    self._anomaly(log, "unfinished message", "connection closed mid-message", b"")
                return
            log.data += data
            try:
                parse.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._anomaly(log, "upgrade", f"upgrade at offset {exc.args}", data)
                await self._record(parse)
                return
            except httptools.HttpParserError as exc:
                self._anomaly(log, "parse error", f"{type(exc).__name__}: {exc}", data)
                await self._record(parse)
                return
            for request in await self._record(parse):
                await self._gate.wait()
                writer.write(_answer(request))
                await writer.drain()
                if not parse.parser.should_keep_alive():
                    return

    async def _record(self, parse: _Parse) -> list[UpstreamRequest]:
        done, parse.done = parse.done, []
        if done:
            async with self._arrived:
                self.requests.extend(done)
                self._arrived.notify_all()
        return done

    def _anomaly(self, log: ConnectionLog, kind: str, detail: str, data: bytes) -> None:
        self.anomalies.append(Anomaly(log.index, kind, detail, data))


def _answer(request: UpstreamRequest) -> bytes:
    body = f"ok {request.method} {request.target}".encode("latin-1")
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Upstream-Connection: {request.connection}\r\n"
        f"X-Upstream-Request: {request.index}\r\n"
        "\r\n"
    ).encode("latin-1")
    return head if request.method == "HEAD" else head + body


@contextlib.asynccontextmanager
async def recording_upstream() -> AsyncIterator[RecordingUpstream]:
    """`async with recording_upstream() as upstream:` started (see `url`), closed at the end."""
    upstream = RecordingUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()
