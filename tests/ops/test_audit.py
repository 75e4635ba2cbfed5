"""Audit events (docs/operations.md, "Audit events"): one line on `sidecar.audit` per login,
logout with its kind, refresh outcome, access denial and admin action, naming the session by
its hash and never carrying a token, a cookie or the session id."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from sidecar.session import session_hash
from tests.support.configs import make_config
from tests.support.idp import ThreadedIdP, shared_idp
from tests.support.login import JSON, browser, login, session_cookie
from tests.support.sidecars import StartSidecar, ready
from tests.support.upstreams import Serve, echo_app

ACCESS_TTL = 2.0  # the module's `idp` fixture: tokens that need a refresh within the test
ADMIN_TOKEN = "admin-token-for-the-tests-0123456789"
REFRESH_ID = "a1b2c3d4e5f60718a1b2c3d4e5f60718"


def events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {
            k: getattr(r, k, None)
            for k in (
                "event",
                "session",
                "iss",
                "sub",
                "kind",
                "outcome",
                "scope",
                "client_ip",
                "request_id",
                "action",
            )
        }
        for r in caplog.records
        if r.name == "sidecar.audit"
    ]


async def test_login_denial_refresh_and_logout_each_leave_one_line(
    start_sidecar: StartSidecar,
    upstream_app: Serve,
    idp: ThreadedIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.audit")
    base = await upstream_app(echo_app())
    config = make_config(
        base,
        idp=idp,
        public_paths=[],
        upstreams=[
            {"path": "/admin", "url": base, "access": {"allowed_groups": ["nobody"]}},
            {"path": "/", "url": base},
        ],
    )
    sc = await start_sidecar(config)
    await ready(sc)
    async with browser() as s:
        await login(s, sc, "/app")
        cookie = session_cookie(s)
        h = session_hash(cookie)
        async with s.get(sc.url("/admin/x"), headers=JSON) as r:
            assert r.status == 403
        await asyncio.sleep(ACCESS_TTL)
        # The request that starts a refresh is named in its line.
        async with s.get(sc.url("/app"), headers={**JSON, "X-Request-Id": REFRESH_ID}) as r:
            assert r.status == 200
        async with s.post(sc.url("/oauth2/sign_out"), headers={**JSON, "Origin": sc.url("")}) as r:
            assert r.status == 200
    seen = events(caplog)
    assert [e["event"] for e in seen] == ["login", "access_denied", "refresh", "logout"], seen
    for entry in seen:
        assert (entry["session"], entry["sub"], entry["iss"]) == (h, "alice", idp.issuer)
    assert seen[1]["scope"] == "/admin"
    assert seen[2]["outcome"] == "refreshed"
    assert seen[3]["kind"] == "rp"
    for entry in seen:
        assert entry["client_ip"] == "127.0.0.1" and entry["request_id"]
    assert seen[2]["request_id"] == REFRESH_ID
    text = "".join(str(vars(r)) for r in caplog.records if r.name == "sidecar.audit")
    assert cookie not in text and "Bearer" not in text and "ey" + "J" not in text


async def test_back_channel_and_admin_ends_are_audited_per_session(
    start_sidecar: StartSidecar, upstream_app: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.audit")
    base = await upstream_app(echo_app())
    sc = await start_sidecar(make_config(base, public_paths=[], admin={"tokens": [ADMIN_TOKEN]}))
    await ready(sc)
    idp = shared_idp()
    cookies = []
    for _ in range(2):
        async with browser() as s:
            await login(s, sc, "/app", "bob")
            cookies.append(session_cookie(s))
    token = idp.call(lambda: idp.idp.backchannel_logout_token("app", sub="bob"))
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url("/oauth2/backchannel-logout"), data={"logout_token": token}) as r:
            assert r.status == 200
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with s.delete(sc.management_url("/admin/sessions?sub=bob"), headers=headers) as r:
            assert r.status == 200
    seen = events(caplog)
    logouts = [e for e in seen if e["event"] == "logout"]
    assert sorted(e["session"] for e in logouts) == sorted(session_hash(c) for c in cookies)
    assert {e["kind"] for e in logouts} == {"backchannel"}
    admin = [e for e in seen if e["event"] == "admin"]
    assert [e["action"] for e in admin] == ["end sessions"]
