"""Headless Chromium against the real thing: oidc-provider, the sidecar process, Redis, upstream.

The browser opens the app through the sidecar, logs in at the provider's form, stays on the
upstream page while its script calls the API every second across several access-token
expiries (the upstream checks every token at the provider's userinfo endpoint), then signs out
through the provider's end-session page. Screenshots of each step go to `test-output/browser/`.

Chromium is Debian's `/usr/bin/chromium` driven by Playwright for Python (no browser download).
If either is missing the test fails: it never skips.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.chromium import chromium_page, screenshots
from tests.support.configs import config_dict
from tests.support.provider import ProviderHandle
from tests.support.sidecars import SidecarProcess
from tests.support.stores import REDIS_URL, new_prefix
from tests.support.upstreams import Introspection, VerifyingUpstream

ACCESS_TOKEN_TTL = 6  # seconds: several expiries fit in a short test
REFRESH_BEFORE = "3s"
WATCH_SECONDS = 15.0  # >= 2 token lifetimes

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>browser e2e app</title></head>
<body><h1>Hello, <span id="user">{user}</span></h1>
<p>token expires in <b id="left">?</b> s; last API call: <span id="status">waiting</span>;
calls: <span id="count">0</span></p>
<form method="post" action="/oauth2/sign_out"><button id="signout" type="submit">Sign out</button>
</form>
<script>
window.results = [];
async function poll() {{
  let entry;
  try {{
    const r = await fetch("/api/whoami", {{headers: {{Accept: "application/json"}}}});
    const body = r.headers.get("content-type", "").includes("json") ? await r.json() : {{}};
    entry = {{status: r.status, ...body}};
    if (r.ok) document.getElementById("left").textContent = body.token_seconds_left;
  }} catch (e) {{ entry = {{status: 0, error: String(e)}}; }}
  window.results.push(entry);
  document.getElementById("status").textContent = entry.status;
  document.getElementById("count").textContent = window.results.length;
}}
setInterval(poll, 1000); poll();
</script></body></html>
"""


@pytest.fixture
def redis_key_prefix() -> Iterator[str]:
    """`redis_prefix` for this sync test (Playwright's sync API wants no running loop)."""
    import redis

    prefix = new_prefix()
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_browser_login_background_calls_across_expiries_and_logout(
    oidc_provider: Callable[..., ProviderHandle],
    sidecar_process: Callable[..., SidecarProcess],
    redis_key_prefix: str,
) -> None:
    shots = screenshots("browser")

    data = config_dict()
    public_url = data["server"]["public_url"]
    post_logout_url = public_url + "/logged-out"
    provider = oidc_provider(
        public_url,
        client={"post_logout_redirect_uris": [post_logout_url]},
        access_token_ttl=ACCESS_TOKEN_TTL,
    )
    upstream = VerifyingUpstream(
        provider.metadata["userinfo_endpoint"],
        introspection=Introspection(
            provider.metadata["introspection_endpoint"], provider.client_id, provider.client_secret
        ),
        page=PAGE,
    )
    upstream.start()
    try:
        data["upstreams"] = [{"path": "/", "url": upstream.url}]
        data["public_paths"] = []
        data["oidc"] = provider.sidecar_oidc(post_logout_url)
        data["session"] = {**data["session"], "store": "redis"}
        data["redis"] = {"url": REDIS_URL, "key_prefix": redis_key_prefix}
        data["refresh"] = {"before_expiry": REFRESH_BEFORE}
        sidecar = sidecar_process(data)

        def context() -> str:
            return (
                f"\n--- sidecar log ---\n{sidecar.logs()}\n--- provider log ---\n{provider.logs()}"
            )

        with chromium_page() as page:
            # 1. The app through the sidecar sends the browser to the provider's login form.
            page.goto(public_url + "/")
            page.wait_for_url(provider.issuer + "/interaction/**")
            page.screenshot(path=shots / "1-idp-login-form.png")

            # 2. Log in as alice: back on the upstream page, which greets her.
            page.fill("input[name=login]", "alice")
            page.click("button[type=submit]")
            page.wait_for_url(public_url + "/")
            assert page.text_content("#user") == "alice", page.content() + context()
            page.wait_for_function("window.results && window.results.length >= 1")
            page.screenshot(path=shots / "2-upstream-page.png")

            # 3. The page keeps calling the API across >= 2 access-token expiries.
            page.wait_for_timeout(WATCH_SECONDS * 1000)
            results: list[dict[str, Any]] = page.evaluate("window.results")
            page.screenshot(path=shots / "3-after-token-expiries.png")
            assert len(results) >= WATCH_SECONDS - 2, results
            bad = [r for r in results if r.get("status") != 200]
            assert not bad, f"background calls failed: {bad}{context()}"
            assert all(r["user"] == "alice" for r in results), results
            assert all(r["userinfo_status"] == 200 for r in results), results
            assert all(r["sub"] == "alice" for r in results), results
            tokens = list(dict.fromkeys(r["token"] for r in results))
            assert len(tokens) >= 3, f"token changed {len(tokens) - 1} times: {results}"
            stats = provider.stats()
            assert stats["grants"].get("refresh_token", 0) >= 2, stats
            assert stats["grant_errors"] == {}, stats

            # 4. Sign out: the provider's end-session page confirms itself and sends the
            # browser back; the app is protected, so the provider asks for a login again.
            page.click("#signout")
            page.wait_for_url(provider.issuer + "/interaction/**")
            page.screenshot(path=shots / "4-signed-out-login-again.png")
            stats = provider.stats()
            assert stats["end_sessions"] == 1, stats
            assert stats["revocations"] == 1, stats

            # 5. The API answers 401 to this browser now.
            response = page.request.get(
                public_url + "/api/whoami", headers={"Accept": "application/json"}
            )
            assert response.status == 401, response.text() + context()
            page.set_content(
                f"<h1>GET /api/whoami after sign-out: {response.status}</h1>"
                f"<pre>{html.escape(response.text())}</pre>"
            )
            page.screenshot(path=shots / "5-api-401-after-logout.png")
            assert provider.stats()["server_errors"] == []
    finally:
        upstream.stop()
