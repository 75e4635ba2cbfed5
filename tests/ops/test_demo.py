"""`auth-sidecar demo` as a user runs it: one command, a login, a token refreshed on the fly.

The demo's access tokens live 30 s and are refreshed in their last 10 s, so this test takes
about 22 s: it keeps calling the echo app's API with one session cookie until the token has
been replaced, and every call must succeed (no logout, no 5xx).
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.demo import running_demo
from tests.support.login import NAVIGATE, browser, local, login, session_cookie
from tests.support.ports import free_ports_in_a_row
from tests.support.sidecars import console_script

COOKIE = "sidecar_demo"
READY_TIMEOUT = 30.0


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A running `auth-sidecar demo --port P`; its port and its output file."""
    with running_demo(tmp_path) as running:
        yield running


def output(path: Path) -> str:
    return path.read_text(errors="replace")


async def wait_ready(http: aiohttp.ClientSession, port: int, out: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with http.get(f"http://127.0.0.1:{port + 3}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"demo never became ready:\n{output(out)}")


async def log_in(base: str, user: str) -> str:
    """The browser's login (tests/support/login.py), landing on the echo app's page that
    names the user; the session cookie."""
    async with browser() as s:
        landing = await login(s, base, "/", user, headers=NAVIGATE)
        async with s.get(local(base, landing), headers=NAVIGATE, allow_redirects=False) as r:
            assert r.status == 200, (landing, r.status)
            assert user in await r.text()
        return session_cookie(s, COOKIE)


async def test_demo_logs_in_and_refreshes_without_logout(demo: tuple[int, Path]) -> None:
    """The demo's sidecar logs alice in, and when her 30 s token is due it is replaced on the
    fly: every background API call meanwhile is answered 200 as alice, and the sidecar
    counts exactly one refresh."""
    port, out = demo
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await wait_ready(http, port, out)
        cookie = await log_in(base, "alice")
        headers = {"Accept": "application/json", "Cookie": f"{COOKIE}={cookie}"}
        lefts: list[float] = []  # seconds the forwarded token had left, per call
        times: list[float] = []
        deadline = time.monotonic() + 35.0
        while time.monotonic() < deadline:
            times.append(time.monotonic())
            async with http.get(base + "/api/whoami", headers=headers) as r:
                assert r.status == 200, (r.status, await r.text())
                who = await r.json()
            assert who["user"] == "alice", who
            lefts.append(float(who["token_seconds_left"]))
            if len(lefts) > 1 and lefts[-1] > lefts[-2] + 5:
                break  # a new token
            await asyncio.sleep(1.0)
        async with http.get(f"http://127.0.0.1:{port + 3}/metrics") as r:
            metrics = await r.text()
    assert len(lefts) > 1 and lefts[-1] > lefts[-2] + 5, f"never refreshed: {lefts}"
    # The old token had entered its 10 s refresh window by the call that replaced it, and
    # had not expired (0.1 s rounding; the sidecar counts from its request, a little earlier).
    old_left = lefts[-2] - (times[-1] - times[-2])
    assert 0 < old_left <= 10.3, (old_left, lefts)
    assert lefts[0] > 20, lefts  # the first token was the login's
    assert 'sidecar_refresh_total{outcome="refreshed"} 1.0' in metrics
    log = output(out)
    assert "open  " + base in log
    assert re.search(r"^\d\d:\d\d:\d\d  refresh\s+alice  refreshed", log, re.MULTILINE), log
    assert cookie not in log  # the session id never reaches the output


async def test_demo_rules_pages_and_quiet_output(demo: tuple[int, Path]) -> None:
    """`/admin` admits only alice (bob gets the designed 403); carol's page says she has no
    groups rather than "None"; and after logins and a sign-out through the dev IdP, the
    demo's output holds no code, ID token or token hint (the dev IdP and the echo app write
    no access lines)."""
    port, out = demo
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await wait_ready(http, port, out)
        statuses = {}
        for user in ("alice", "bob"):
            cookie = await log_in(base, user)
            headers = {**NAVIGATE, "Cookie": f"{COOKIE}={cookie}"}
            async with http.get(base + "/admin/", headers=headers, allow_redirects=False) as r:
                statuses[user] = r.status
        assert statuses == {"alice": 200, "bob": 403}

        carol = await log_in(base, "carol")
        headers = {**NAVIGATE, "Cookie": f"{COOKIE}={carol}"}
        async with http.get(base + "/", headers=headers) as r:
            page = await r.text()
        assert '<b id="groups">none</b>' in page and ">None<" not in page

        async with http.post(
            base + "/oauth2/sign_out", headers=headers, allow_redirects=False
        ) as r:
            assert r.status == 303
            end_session = r.headers["Location"]
        assert "id_token_hint=" in end_session
        async with http.get(end_session, allow_redirects=False) as r:
            assert r.status in (200, 302, 303)
    log = output(out)
    for secret in ("id_token_hint", "code=", "eyJ", carol):
        assert secret not in log, f"{secret!r} in the demo's output:\n{log}"
    # One human line per event, no JSON and no access lines.
    story = re.findall(r"^\d\d:\d\d:\d\d  (\S+(?: \S+)?)\s+(\w+)", log, re.MULTILINE)
    assert ("login", "alice") in story and ("login", "bob") in story, log
    assert ("access denied", "bob") in story and ("logout", "carol") in story, log
    assert not [line for line in log.splitlines() if line.startswith("{")], log
    assert "GET /" not in log and '"path"' not in log, log


def test_busy_port_is_one_line_naming_it(tmp_path: Path) -> None:
    """Anything on one of the demo's four ports: one line that names the port and suggests
    `--port`, exit 1, no traceback (and nothing left listening)."""
    port = free_ports_in_a_row(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        done = subprocess.run(
            [console_script(), "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert str(port + 1) in lines[0] and "--port" in lines[0]
    with socket.socket() as again:  # the demo bound nothing before giving up
        again.bind(("127.0.0.1", port))
