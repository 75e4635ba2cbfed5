"""The wiring works end to end: a request goes through the sidecar to a real upstream."""

from __future__ import annotations

from aiohttp import web

from tests.conftest import make_config


async def test_request_reaches_upstream(start_sidecar, upstream_app, http) -> None:
    """A GET through the sidecar is answered by the upstream."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.raw_path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    base = await upstream_app(app)
    sidecar = await start_sidecar(make_config(base))
    async with http.get(sidecar.url("/x?y=1")) as resp:
        assert resp.status == 200
        assert await resp.text() == "hello /x?y=1"
