"""CSRF defence (docs/security.md, "CSRF"): a request the session cookie authenticates with
an unsafe method must come from this site, or nothing reaches the upstream."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.configs import make_config
from tests.support.login import login_cookie
from tests.support.raw_http import raw_exchange, raw_get
from tests.support.recording_upstream import RecordingUpstream
from tests.support.sidecars import Sidecar, StartSidecar, ready

ALLOWED = "https://admin.example.com"


async def start(start_sidecar: StartSidecar, **csrf: Any) -> tuple[Sidecar, RecordingUpstream, str]:
    upstream = RecordingUpstream()
    await upstream.start()
    sections: dict[str, Any] = {"public_paths": []}
    if csrf:
        sections["csrf"] = csrf
    sc = await start_sidecar(make_config(upstream.url, **sections))
    await ready(sc)
    return sc, upstream, await login_cookie(sc, "alice", path="/oauth2/start?rd=/")


async def send(sc: Sidecar, method: str, cookie: str | None, *headers: str) -> int:
    lines = ["Accept: application/json", "Content-Length: 2", *headers]
    if cookie is not None:
        lines.append(f"Cookie: sidecar={cookie}")
    response = await raw_exchange(sc.url(""), raw_get("/app/x", *lines, method=method, body=b"{}"))
    return response.status


@pytest.fixture
async def site(start_sidecar: StartSidecar) -> Any:
    sc, upstream, cookie = await start(start_sidecar, allowed_origins=[ALLOWED])
    yield sc, upstream, cookie
    await upstream.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "post", "PROPFIND"])
@pytest.mark.parametrize(
    "headers",
    [
        (),  # a browser always says where a state-changing request comes from
        ("Sec-Fetch-Site: cross-site",),
        ("Sec-Fetch-Site: same-site",),  # a sibling subdomain: SameSite=Lax lets it through
        ("Sec-Fetch-Site: cross-site", "Origin: https://evil.example"),
        ("Origin: https://evil.example",),
        ("Origin: null",),
        ("Origin: https://app.example.com.evil.example",),
        ("Sec-Fetch-Site: same-site", "Origin: https://sub.app.example.com"),
    ],
)
async def test_cross_site_requests_with_the_cookie_are_refused(
    site: Any, method: str, headers: tuple[str, ...]
) -> None:
    sc, upstream, cookie = site
    # aiohttp refuses a lower-case method outright (400): refused either way.
    assert await send(sc, method, cookie, *headers) == (403 if method.isupper() else 400)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        ("Sec-Fetch-Site: same-origin",),
        ("Sec-Fetch-Site: none",),  # typed or bookmarked by the user
        (f"Origin: {ALLOWED}",),
        ("Sec-Fetch-Site: same-site", f"Origin: {ALLOWED}"),
    ],
)
async def test_same_origin_and_allowed_origins_pass(site: Any, headers: tuple[str, ...]) -> None:
    sc, upstream, cookie = site
    assert await send(sc, "POST", cookie, *headers) == 200
    assert len(upstream.requests) == 1


async def test_the_public_url_origin_passes(site: Any) -> None:
    sc, upstream, cookie = site
    origin = sc.config.server.public_url
    assert await send(sc, "DELETE", cookie, f"Origin: {origin}") == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_safe_methods_are_not_checked(site: Any, method: str) -> None:
    sc, _, cookie = site
    assert await send(sc, method, cookie, "Sec-Fetch-Site: cross-site") == 200


async def test_the_refusal_is_json_naming_csrf(site: Any) -> None:
    sc, _, cookie = site
    response = await raw_exchange(
        sc.url(""),
        raw_get(
            "/app/x",
            "Accept: application/json",
            f"Cookie: sidecar={cookie}",
            "Sec-Fetch-Site: cross-site",
            "Content-Length: 0",
            method="POST",
        ),
    )
    assert response.status == 403
    assert b'"error": "csrf"' in response.body


async def test_without_a_cookie_there_is_nothing_to_defend(site: Any) -> None:
    sc, upstream, _ = site
    assert await send(sc, "POST", None, "Sec-Fetch-Site: cross-site") == 401
    assert upstream.requests == []


async def test_it_can_be_turned_off(start_sidecar: StartSidecar) -> None:
    sc, upstream, cookie = await start(start_sidecar, enabled=False)
    try:
        assert await send(sc, "POST", cookie, "Sec-Fetch-Site: cross-site") == 200
    finally:
        await upstream.close()
