"""The wiring works end to end: a request goes through the sidecar to a real upstream."""

from __future__ import annotations

from tests.support.configs import make_config
from tests.support.upstreams import echo_app


async def test_request_reaches_upstream(start_sidecar, upstream_app, http) -> None:
    """A GET through the sidecar is answered by the upstream."""
    base = await upstream_app(echo_app())
    sidecar = await start_sidecar(make_config(base))
    async with http.get(sidecar.url("/x?y=1")) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream"] == "echo"
        assert (await resp.json())["raw_path"] == "/x?y=1"
