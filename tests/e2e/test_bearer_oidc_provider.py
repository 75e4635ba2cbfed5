"""Machine clients with the certified `oidc-provider`: its access tokens are opaque, so the
sidecar asks its introspection endpoint (RFC 7662) about each new one (`bearer.introspection`)
and forwards the token; the upstream checks every token it receives at the provider's
userinfo endpoint, so "forwarded" means "a token the provider accepts"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from tests.support.browse import browse
from tests.support.configs import config_dict
from tests.support.login import JSON, browser
from tests.support.provider import ProviderHandle
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL
from tests.support.upstreams import Serve, VerifyingUpstream


async def test_an_opaque_token_is_introspected_and_forwarded(
    oidc_provider: Callable[..., ProviderHandle],
    sidecar_process: Callable[..., SidecarProcess],
    upstream_app: Serve,
    redis_prefix: str,
) -> None:
    data = config_dict()
    public_url = data["server"]["public_url"]
    provider = oidc_provider(public_url)
    upstream = VerifyingUpstream(provider.metadata["userinfo_endpoint"])
    upstream_url = await upstream_app(upstream.app())
    data.update(
        upstreams=[
            {
                "path": "/",
                "url": upstream_url,
                "rules": [{"paths": ["/api/orders/**"], "scopes": ["email"]}],
            }
        ],
        public_paths=[],
        oidc=provider.sidecar_oidc(public_url + "/"),
        session={**data["session"], "store": "redis"},
        redis={"url": REDIS_URL, "key_prefix": redis_prefix},
        bearer={
            "introspection": {
                "endpoint": provider.metadata["introspection_endpoint"],
                "client_id": provider.client_id,
                "client_secret": provider.client_secret,
            }
        },
    )
    sidecar = sidecar_process(data)

    # A browser logs in; the access token the sidecar forwards is what a machine client holds.
    async with browser() as s:
        _, status, _ = await browse(s, public_url + "/", login="alice")
        assert status == 200, (sidecar.logs(), provider.logs())
        async with s.get(public_url + "/api/x", headers=JSON) as r:
            token = (await r.json())["authorization"].removeprefix("Bearer ")
    assert token.count(".") != 2, "oidc-provider's access tokens should be opaque here"

    async def call(path: str, bearer: str) -> tuple[int, Any]:
        headers = {**JSON, "Authorization": f"Bearer {bearer}"}
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s,
            s.get(public_url + path, headers=headers) as r,
        ):
            return r.status, await r.json()

    status, body = await call("/api/orders/1", token)
    assert status == 200, body
    assert body["ok"] is True and body["user"] == "alice"
    assert body["authorization"] == f"Bearer {token}"
    assert (await call("/api/orders/2", token))[0] == 200  # the cached answer

    status, body = await call("/api/orders/1", "not-a-token-the-provider-issued")
    assert status == 401 and body["error"] == "invalid_token"
    assert body["error_description"] == "token is not active"
    assert token not in sidecar.logs()
