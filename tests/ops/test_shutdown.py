"""Graceful shutdown of a real `auth-sidecar run` process on SIGTERM (docs/operations.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.configs import config_dict

SLOW_SECONDS = 2.5  # the in-flight request: longer than shutdown_delay, shorter than the grace


def slow_upstream(started: asyncio.Event, seconds: float) -> web.Application:
    """`/slow` answers after `seconds`; `/fast` at once."""

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(seconds)
        return web.Response(text="slow done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    return app


def shutdown_config(base: str, delay: str, grace: str) -> dict[str, Any]:
    data = config_dict(base)
    data["server"].update(shutdown_delay=delay, shutdown_grace=grace)
    return data


async def status_of(url: str) -> int:
    """GET on a fresh connection; the status code."""
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        await resp.read()
        return resp.status


async def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def wait_exit(proc: Any, within: float) -> int | None:
    """The process's exit code, or None if it is still running after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            return int(proc.proc.returncode)
        await asyncio.sleep(0.02)
    return None


async def test_sigterm_drains_then_exits(upstream_app: Any, sidecar_process: Any) -> None:
    """SIGTERM: /readyz 503 during the delay, in-flight request finishes 200, then exit 0."""
    started = asyncio.Event()
    base = await upstream_app(slow_upstream(started, SLOW_SECONDS))
    delay, grace = 1.0, 4.0
    proc = sidecar_process(shutdown_config(base, f"{delay:g}s", f"{grace:g}s"))
    assert await status_of(proc.management + "/readyz") == 200

    async with aiohttp.ClientSession() as client:

        async def in_flight() -> tuple[int, str]:
            async with client.get(proc.base + "/slow") as resp:
                return resp.status, await resp.text()

        request = asyncio.create_task(in_flight())
        await asyncio.wait_for(started.wait(), 5)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # During the delay: not ready, yet still serving new connections.
        await asyncio.sleep(0.2)
        assert await status_of(proc.management + "/readyz") == 503
        assert await status_of(proc.management + "/healthz") == 200
        assert await status_of(proc.base + "/fast") == 200
        assert time.monotonic() - signalled < delay

        # After the delay: new connections are refused while the slow request still runs.
        while not await refuses_connections(proc.base):
            assert time.monotonic() - signalled < delay + 1.0, "listener still accepting"
            await asyncio.sleep(0.05)
        refused_after = time.monotonic() - signalled
        assert refused_after >= delay - 0.05
        assert not request.done()

        assert await request == (200, "slow done")

    code = await wait_exit(proc, delay + grace + 2)
    assert code == 0, proc.logs()
    assert time.monotonic() - signalled < delay + grace
    messages = [
        json.loads(line)["msg"] for line in proc.logs().splitlines() if line.startswith("{")
    ]
    assert messages.index("draining") < messages.index("stopped")


async def test_request_longer_than_grace_is_cut(upstream_app: Any, sidecar_process: Any) -> None:
    """A request still running when shutdown_grace ends is cut, and the process exits 0."""
    started = asyncio.Event()
    base = await upstream_app(slow_upstream(started, 30))
    grace = 1.0
    proc = sidecar_process(shutdown_config(base, "0s", f"{grace:g}s"))

    async with aiohttp.ClientSession() as client:

        async def in_flight() -> int:
            async with client.get(proc.base + "/slow") as resp:
                await resp.read()
                return resp.status

        request = asyncio.create_task(in_flight())
        await asyncio.wait_for(started.wait(), 5)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await wait_exit(proc, grace + 5)
        elapsed = time.monotonic() - signalled
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(request, 5)

    assert code == 0, proc.logs()
    assert grace - 0.1 <= elapsed < grace + 2


async def test_idle_sidecar_exits_at_once(sidecar_process: Any) -> None:
    """With nothing in flight and no delay, SIGTERM ends the process with 0 right away."""
    proc = sidecar_process(shutdown_config("http://127.0.0.1:9", "0s", "25s"))
    proc.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await wait_exit(proc, 5) == 0, proc.logs()
    assert time.monotonic() - signalled < 1.5


async def test_sigint_also_drains(sidecar_process: Any) -> None:
    """SIGINT (Ctrl-C) shuts down like SIGTERM: exit 0, no traceback."""
    proc = sidecar_process(shutdown_config("http://127.0.0.1:9", "0s", "25s"))
    proc.proc.send_signal(signal.SIGINT)
    assert await wait_exit(proc, 5) == 0, proc.logs()
    assert "Traceback" not in proc.logs()
