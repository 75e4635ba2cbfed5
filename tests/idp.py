"""One dev IdP for the whole test session, served from a thread so subprocesses reach it too."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from sidecar.devidp import DevClient, DevIdP, default_users

CLIENT_ID = "app"
CLIENT_SECRET = "test-client-secret"


class ThreadedIdP:
    """A `DevIdP` on 127.0.0.1 in its own event loop and thread."""

    def __init__(self, port: int, access_token_ttl: float = 300.0) -> None:
        self.issuer = f"http://127.0.0.1:{port}"
        self.idp = DevIdP(self.issuer, users=default_users(), access_token_ttl=access_token_ttl)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dev-idp", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("dev IdP did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.idp.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self._port).start())
        self._started.set()
        self._loop.run_forever()

    def register(self, public_url: str) -> None:
        """Let a sidecar at `public_url` log in and out as client `app`."""
        existing = self.idp.clients.get(CLIENT_ID)
        redirects = (existing.redirect_uris if existing else ()) + (
            public_url + "/oauth2/callback",
        )
        afters = (existing.post_logout_redirect_uris if existing else ()) + (public_url + "/",)
        self.call(
            self.idp.register_client,
            DevClient(CLIENT_ID, CLIENT_SECRET, redirects, afters),
        )

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the IdP's loop thread (its state is not thread-safe)."""
        done = asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop)
        return done.result(10)


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


_shared: ThreadedIdP | None = None


def shared_idp() -> ThreadedIdP:
    global _shared
    if _shared is None:
        from tests.conftest import free_port

        _shared = ThreadedIdP(free_port())
    return _shared
