"""An aiohttp app served from an event loop of its own, in a daemon thread.

A server in a thread answers whatever the test's own loop is doing: sync tests, fixtures of
module scope (which outlive a test's loop) and subprocesses (sidecar replicas) reach it alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["AppThread"]


class AppThread:
    """`app` on 127.0.0.1:`port`, served until `stop()`; `call` runs code on its loop."""

    def __init__(self, app: web.Application, port: int, name: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._app = app
        self._runner: web.AppRunner | None = None
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            raise RuntimeError(f"{name} did not start") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by __init__, in the test's thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the server's loop thread (the app's state is not thread-safe)."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        """Clean the app up (its cleanup contexts run), then end the loop and the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
