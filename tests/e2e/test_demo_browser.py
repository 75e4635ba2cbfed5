"""The demo as a new user sees it, in headless Chromium: `auth-sidecar demo` as a real process.

Alice logs in at the dev IdP's chooser; the page's token panel shows token #1; the
"50 requests" button waits until the token is due and fires 50 requests at once: all are
answered, the IdP counts one refresh grant and no reuse, and the panel moves to token #2 with
a "refreshed" line. Alice signs out and lands on the signed-out page; bob then logs in on the
way to /admin/ and gets the sidecar's 403. Screenshots go to `test-output/demo/`.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chromium import chromium_page, screenshots
from tests.support.demo import running_demo


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A running, ready `auth-sidecar demo`: its base URL and its output file."""
    with running_demo(tmp_path) as (port, out):
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port + 3}/readyz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"demo never became ready:\n{out.read_text()}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", out


def test_demo_tells_the_story(demo: tuple[str, Path]) -> None:
    base, out = demo
    shots = screenshots("demo")
    with chromium_page() as page:
        # 1. Log in as alice at the dev IdP's chooser; the page shows token #1.
        page.goto(base + "/")
        page.click("button[value=alice]")
        page.wait_for_url(base + "/")
        assert page.text_content("#user") == "alice"
        page.wait_for_function("document.getElementById('token-number').textContent == '#1'")
        headers = page.eval_on_selector_all(
            "#headers tr.added th", "r => r.map(e => e.textContent)"
        )
        assert "Authorization" in headers and "X-Forwarded-User" in headers, headers
        shown = page.text_content("#headers")
        assert "devidp_session" not in shown and "sidecar_demo" not in shown, shown
        page.screenshot(path=shots / "1-logged-in-token-1.png")

        # 2. 50 requests at once when the token is due: one grant, no reuse, token #2.
        page.click("#burst")
        page.wait_for_function("window.burstResult !== undefined", timeout=45_000)
        burst = page.evaluate("window.burstResult")
        assert burst == {"answers": 50, "ok": 50, "tokens": 1, "grants": 1, "reuse": 0}, (
            burst,
            out.read_text(),
        )
        page.wait_for_function("document.getElementById('token-number').textContent == '#2'")
        log = page.text_content("#log")
        assert "token #2" in log and "refreshed" in log and "before #1 expired" in log, log
        page.screenshot(path=shots / "2-after-50-requests.png")

        # 3. Sign out: the signed-out landing page, no IdP chooser.
        page.click("#signout")
        page.wait_for_url(base + "/signed-out")
        assert "Signed out" in page.text_content("h1")
        page.screenshot(path=shots / "3-signed-out.png")

        # 4. Bob on his way to /admin/: the sidecar's 403.
        page.goto(base + "/admin/")
        page.click("button[value=bob]")
        page.wait_for_url(base + "/admin/")
        assert "not allowed" in page.content(), page.content()
        page.screenshot(path=shots / "4-bob-403-on-admin.png")
