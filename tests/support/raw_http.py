"""Raw HTTP/1.1 on sockets: bytes sent exactly as written, messages read one by one.

aiohttp's client normalises what a test wants to send badly (dot segments, header case,
framing), so the proxy tests that probe odd requests speak HTTP through these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = [
    "RawClient",
    "RawMessage",
    "RawServer",
    "StartRaw",
    "raw_exchange",
    "raw_get",
    "read_body",
    "read_head",
    "read_request",
    "recording_raw_upstream",
]


@dataclass
class RawMessage:
    """One HTTP/1.1 message as read off a socket: start line, header lines, decoded body."""

    start_line: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False

    def get(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def status(self) -> int:
        return int(self.start_line.split(" ")[1])

    @property
    def target(self) -> str:
        return self.start_line.split(" ")[1]

    @property
    def method(self) -> str:
        return self.start_line.split(" ")[0]


async def read_head(reader: asyncio.StreamReader) -> RawMessage | None:
    """The start line and headers of the next message, or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return RawMessage(lines[0], headers)


async def read_body(reader: asyncio.StreamReader, message: RawMessage, *, to_eof: bool) -> None:
    """Read the body of `message` (Content-Length, chunked, or until EOF when `to_eof`)."""
    encoding = (message.get("Transfer-Encoding") or "").lower()
    if "chunked" in encoding:
        message.chunked = True
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are ever sent here
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        message.body = b"".join(parts)
    elif (length := message.get("Content-Length")) is not None:
        message.body = await reader.readexactly(int(length))
    elif to_eof:
        message.body = await reader.read()


async def read_request(reader: asyncio.StreamReader) -> RawMessage | None:
    """The next whole request on a server-side connection, or None when the peer closed."""
    message = await read_head(reader)
    if message is not None:
        await read_body(reader, message, to_eof=False)
    return message


class RawClient:
    """A client connection that sends bytes as they are and reads responses one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        host, _, port = url.split("://", 1)[1].split("/", 1)[0].partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False, wait: float = 5.0) -> RawMessage:
        async with asyncio.timeout(wait):
            response = await read_head(self.reader)
            assert response is not None, "connection closed before a response"
            if not head_only:
                await read_body(self.reader, response, to_eof=True)
            return response

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def raw_exchange(url: str, request: bytes, *, wait: float = 5.0) -> RawMessage:
    """Send `request` bytes as they are to `url`'s host and read one response."""
    client = await RawClient.connect(url)
    try:
        await client.send(request)
        return await client.response(head_only=request.startswith(b"HEAD "), wait=wait)
    finally:
        await client.close()


def raw_get(path: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    """A minimal request: only the header lines given (Host first, unless one is given)."""
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.append("Host: sidecar.test")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RawServer:
    """An asyncio TCP server running `handler` per connection; counts and records connections."""

    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    connections: int = 0
    requests: list[RawMessage] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly; asyncio's stream callback would log a
            # cancelled connection task as an error.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# The `start_raw` fixture: `server, url = await start_raw(handler)`.
StartRaw = Callable[..., Awaitable[tuple[RawServer, str]]]


async def recording_raw_upstream(start_raw: StartRaw, response: bytes) -> tuple[RawServer, str]:
    """A raw keep-alive upstream that records requests and answers each with `response`."""
    server: RawServer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            server.requests.append(request)
            writer.write(response)
            await writer.drain()

    server, url = await start_raw(handler)
    return server, url
