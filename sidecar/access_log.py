"""The access log: one JSON line per request, formatted cheaply and written in batches.

Through `logging` each request paid for a LogRecord, the JSON formatter, the handler's lock and
one unbuffered write on the event loop: a third of the authenticated row's throughput (issue
18). Here a line is one f-string of pre-escaped constants and the request's few fields, added
to a buffer on the event loop; a thread of its own writes the buffer to stderr in batches.
Each line is the one `JSONFormatter` would write for the same record (docs/operations.md,
"Access log"); docs/decisions.md says what was traded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from json.encoder import encode_basestring_ascii
from typing import ClassVar, Final, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from sidecar.forwarding.paths import PATH
from sidecar.logging import REQUEST_ID

__all__ = ["FLUSH_INTERVAL", "MAX_PENDING", "AccessLog", "AccessLogger", "json_string"]

FLUSH_INTERVAL: Final = 0.1  # seconds a line may wait in the buffer; SIGKILL loses at most this
FLUSH_SIZE: Final = 64 * 1024  # buffered bytes that start a write at once
# Bytes handed to the writer and not yet written. A stderr that stops draining must not grow
# memory or block the event loop: beyond this, batches are dropped and counted.
MAX_PENDING: Final = 8 * 1024 * 1024
# A write of at most PIPE_BUF bytes to a pipe is never interleaved with another process's
# (POSIX write(2)): workers sharing one stderr cannot cut each other's lines.
_PIPE_BUF: Final = select.PIPE_BUF
_CLOSE_TIMEOUT: Final = 5.0  # at shutdown, how long a stuck stderr may hold the exit
_CUT: Final = 256  # characters kept of a raw path or a User-Agent


# A string as a JSON string, exactly as `json.dumps` writes it (ASCII; quotes, backslashes,
# control characters and every non-ASCII code point escaped): the C function json.dumps
# itself calls, without its per-call overhead.
json_string: Final[Callable[[str], str]] = encode_basestring_ascii


class AccessLog:
    """Lines buffered on the event loop and written by a thread, so that a slow stderr never
    blocks a request; flushed every `FLUSH_INTERVAL`, past `FLUSH_SIZE`, and by `close`."""

    def __init__(self, dropped: Callable[[int], object], stream: TextIO | None = None) -> None:
        self._dropped = dropped  # called with the number of lines lost (from either thread)
        self._stream = stream  # None: sys.stderr as it is at start-up
        self._lines: list[str] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._batches: queue.SimpleQueue[tuple[list[str], int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._handed = 0  # bytes given to the writer; the event loop's count
        self._written = 0  # bytes the writer is done with; the writer's count

    def logger_class(self) -> type[AccessLogger]:
        """aiohttp's `access_log_class`, writing here."""

        class Bound(AccessLogger):
            __slots__ = ()

        Bound.sink = self
        return Bound

    async def run(self, _: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx`: write from start-up to cleanup, which comes after the last
        request has been answered and logged."""
        self.start()
        yield
        await self.close()

    def start(self) -> None:
        """Start the writer; call on the event loop that will serve the requests."""
        self._loop = asyncio.get_running_loop()
        write = _writer(self._stream if self._stream is not None else sys.stderr)
        self._thread = threading.Thread(
            target=self._write_batches, args=(write,), name="access-log", daemon=True
        )
        self._thread.start()

    def append(self, line: str) -> None:
        """Buffer one line (ASCII, ending in a newline); the per-request hot path."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_SIZE:
            self.flush()
        elif self._timer is None:
            assert self._loop is not None, "AccessLog.start() was not called"
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Hand the buffered lines to the writer, or drop them when it is too far behind."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, size = self._lines, self._size
        if not lines:
            return
        self._lines, self._size = [], 0
        if self._handed - self._written + size > MAX_PENDING:
            self._dropped(len(lines))
            return
        self._handed += size
        self._batches.put((lines, size))

    async def close(self) -> None:
        """Write every buffered line, then stop the writer (SIGTERM loses none)."""
        self.flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._batches.put(None)
            await asyncio.to_thread(thread.join, _CLOSE_TIMEOUT)

    def _write_batches(self, write: Callable[[str], None]) -> None:
        while (batch := self._batches.get()) is not None:
            lines, size = batch
            left = len(lines)
            try:
                for chunk, count in _chunks(lines):
                    write(chunk)
                    left -= count
            except (OSError, ValueError):  # a closed pipe or stream, a full disk
                self._dropped(left)
            self._written += size


def _chunks(lines: list[str]) -> Iterator[tuple[str, int]]:
    """Whole lines joined into writes of at most PIPE_BUF bytes (a longer line goes alone)."""
    start = size = 0
    for i, line in enumerate(lines):
        if size + len(line) > _PIPE_BUF and i > start:
            yield "".join(lines[start:i]), i - start
            start, size = i, 0
        size += len(line)
    yield "".join(lines[start:]), len(lines) - start


def _writer(stream: TextIO) -> Callable[[str], None]:
    """Writes text to `stream`: to its file descriptor when it has one, since the Python-level
    buffer of sys.stderr also serves the logging handler on the event loop's thread."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no descriptor

        def write_stream(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write_stream

    def write_fd(text: str) -> None:
        data = memoryview(text.encode("ascii"))
        while data:
            data = data[os.write(fd, data) :]

    return write_fd


class AccessLogger(AbstractAccessLogger):
    """aiohttp's per-connection hook: one line per request with method, path (without
    query), status, size, duration, request id, peer and User-Agent.

    The path is the canonical one every decision was taken on (docs/security.md); a request
    refused before it had one logs its raw path, cut to 256 characters. On when the
    `sidecar.access` logger is enabled for INFO, so `logging.level: warning` turns it off."""

    __slots__ = ("_head",)
    sink: ClassVar[AccessLog]

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # Everything between the time and the request id is the same on every line.
        self._head = (
            f', "level": "info", "logger": {json_string(logger.name)}, "pid": {os.getpid()}, '
            '"msg": "request", "request_id": '
        )

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        canonical = request.get(PATH)
        if canonical is not None:
            path = canonical.path
        else:
            path = request.raw_path.partition("?")[0][:_CUT]
        remote = request.remote
        request_id = request.get(REQUEST_ID, "")
        self.sink.append(
            f'{{"ts": {round(time.time(), 3)!r}{self._head}{json_string(request_id)}'
            f', "method": {json_string(request.method)}, "path": {json_string(path)}'
            f', "status": {response.status:d}, "bytes": {response.body_length:d}'
            f', "duration_ms": {round(time_ * 1000, 2)!r}'
            f', "remote": {"null" if remote is None else json_string(remote)}'
            f', "user_agent": {json_string(request.headers.get("User-Agent", "")[:_CUT])}}}\n'
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
